"""Sampling sub-networks from a search space (SortedNet, arXiv 2309.00255, Eq. 1).

At every iteration SortedNet draws one index per dimension, ``b_j ~ P_{B_j}``, and
truncates the super-network along each dimension to that index; the sub-network is the
intersection of the truncations (Eq. 1). Here a dimension is ``width``, ``heads``,
``depth`` or ``modules`` (the parallel modules of TAC blocks, Subnetwork-to-go's width, so
its "one random depth x width sub-network" is one draw per dimension) and the index is a
position in each group's or stage's list of nested choices (largest first), clamped to the
group's own number of choices. With ``per="group"`` every coupling group and stage draws its
own index instead, which reaches every configuration of the space rather than only the
uniform ones.

The sampler owns a seeded ``torch.Generator``; under ``torch.distributed`` every rank builds
it with the same seed, so every rank draws the same sub-network at every step without
communication. Its state is a uint8 tensor, saved with the trainer state for exact resume.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..space import Config, SearchSpace

__all__ = ["SubnetSampler"]

_DIMS = ("width", "heads", "depth", "modules")


class SubnetSampler:
    """Draws sub-network configurations from a :class:`~elasticize.space.SearchSpace`.

    Args:
        space: the model's search space (``em.space``).
        seed: seed of the sampler's own generator (same on every rank).
        distribution: per dimension, probabilities over choice indices (largest first), e.g.
            ``{"width": [0.4, 0.2, 0.2, 0.2]}``; missing dimensions are uniform
            (SortedNet's default ``P_{B_j}``). Normalised to sum to 1.
        per: ``"dimension"`` (one index per dimension, Eq. 1) or ``"group"`` (one per group and stage).

    Raises:
        ValueError: unknown ``per``, a distribution for an unknown dimension, a negative or
            all-zero probability vector, or one whose length is not the dimension's number of choices.
    """

    def __init__(self, space: SearchSpace, *, seed: int = 0, distribution: Mapping[str, Sequence[float]] | None = None,
                 per: str = "dimension") -> None:
        if per not in ("dimension", "group"):
            raise ValueError(f"per must be 'dimension' or 'group', not {per!r}")
        self.space = space
        self.per = per
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._tables = {d: t for d, t in space.dimensions.items() if d in _DIMS}
        self.levels = {d: max([len(c) for c in t.values()] or [1]) for d, t in self._tables.items()}
        self.probs: dict[str, torch.Tensor] = {}
        for dim, n in self.levels.items():
            p = (distribution or {}).get(dim)
            if p is None:
                self.probs[dim] = torch.full((n,), 1.0 / n, dtype=torch.float64)
                continue
            t = torch.tensor([float(v) for v in p], dtype=torch.float64)
            if len(t) != n or (t < 0).any() or t.sum() <= 0:
                raise ValueError(f"distribution[{dim!r}] must be {n} non-negative numbers (one per choice, largest "
                                 f"first) with a positive sum; got {list(p)}")
            self.probs[dim] = t / t.sum()
        unknown = set(distribution or {}) - set(self.levels)
        if unknown:
            raise ValueError(f"distribution names unknown dimensions {sorted(unknown)}; dimensions: {list(self.levels)}")

    # ------------------------------------------------------------------ configs by index
    def at(self, index: Mapping[str, int]) -> Config:
        """The configuration with choice index ``index[dim]`` in every group/stage of each dimension (clamped)."""
        return {d: {k: c[min(int(index.get(d, 0)), len(c) - 1)] for k, c in t.items()} for d, t in self._tables.items()}

    def largest(self) -> Config:
        """The super-network (every dimension at its largest choice)."""
        return self.at({})

    def smallest(self) -> Config:
        """The smallest sub-network (every dimension at its smallest choice; Adaptive Depth's base-net for depth)."""
        return self.at({d: n - 1 for d, n in self.levels.items()})

    def _draw(self, dim: str) -> int:
        return int(torch.multinomial(self.probs[dim], 1, generator=self.generator).item())

    def sample_index(self) -> dict[str, int]:
        """One choice index per dimension, ``b_j ~ P_{B_j}`` (SortedNet Eq. 1)."""
        return {d: self._draw(d) for d in self.levels}

    def sample(self) -> Config:
        """A random sub-network: Eq. 1 with ``per="dimension"``, or an independent draw per group and stage."""
        if self.per == "dimension":
            return self.at(self.sample_index())
        out: Config = {}
        for d, t in self._tables.items():
            out[d] = {}
            for k, c in t.items():
                i = self._draw(d)
                out[d][k] = c[min(i, len(c) - 1)]
        return out

    def nested_along_dims(self, index: Mapping[str, int]) -> list[Config]:
        """``Θ⊥(θ*)`` of SortedNet's stochastic summation: ``θ*`` (at ``index``) and every
        truncation of it along one dimension to a smaller choice, the others fixed."""
        out = [self.at(index)]
        for d, n in self.levels.items():
            for j in range(int(index.get(d, 0)) + 1, n):
                cfg = self.at({**index, d: j})
                if cfg not in out:
                    out.append(cfg)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor | int | str]:
        """The generator's state (uint8 tensor) and the sampler's settings, for exact resume."""
        return {"seed": self.seed, "per": self.per, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: a state from a sampler with another ``per`` setting.
        """
        if state.get("per", self.per) != self.per:
            raise ValueError(f"sampler state was saved with per={state['per']!r}; this sampler uses per={self.per!r}")
        gen = state["generator"]
        if not isinstance(gen, torch.Tensor):
            raise ValueError("sampler state has no generator tensor")
        self.generator.set_state(gen.to(torch.uint8).cpu())
