"""The union-find over tensor-axis *slots* that gives the coupling groups.

Every axis of every tensor is a slot; an op that makes two axes share one channel index
space joins their slots. A set of joined slots is one **coupling group**: a single width
decision slices every member (the dependency-graph idea of Torch-Pruning, Fang et al.,
CVPR 2023). A slot also carries facts that the group inherits: fixed (with the reason it
may never be sliced), its unit (channels that move together), its kind (width, heads,
parallel modules), whether it is an elastic dimension's source (a producer).

A concatenation of different groups along an axis is a *segmented* slot (:meth:`Coupling.segmented`):
its index space is its segments' index spaces side by side, each sliced to its own group's
active prefix; a consumer joined to it reads the concatenation of those prefixes.
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["Coupling"]


class Coupling:
    """Union-find over axis slots, with the facts each slot carries."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}
        self.unit: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.producer: set[int] = set()
        self.tensor_slot: dict[tuple[str, int], int] = {}
        self.chunks: dict[tuple[str, int], int] = {}
        self.attrs: list[tuple[str, str, int, str, int, int]] = []
        self.derived: dict[int, tuple[int, int]] = {}  # slot -> (base slot, chunks): ``chunks`` copies of base
        self.per_unit: dict[tuple[str, int], tuple[int, int]] = {}  # (fqn, axis) -> (slot, channels per entry)
        self.segments: dict[int, list[int]] = {}  # root -> the slots laid side by side along it
        self.divided: dict[int, tuple[int, int]] = {}  # slot -> (base slot, unit): one entry per ``unit`` of base
        self.ordered: dict[int, str] = {}  # slot -> why its group keeps its order (not sorted by importance)
        self.div_roots: dict[int, tuple[int, int]] = {}  # after :meth:`resolver`: root of a divided slot -> its base

    def new(self, size: int, fixed: str | None = None) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(int(size))
        if fixed:
            self.fixed[s] = fixed
        return s

    def find(self, s: int) -> int:
        p = self.parent
        while p[s] != s:
            p[s] = p[p[s]]
            s = p[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            reason = f"axes of sizes {self.size[ra]} and {self.size[rb]} are joined"
            self.fix(ra, reason)
            self.fix(rb, reason)
        self.parent[rb] = ra
        if rb in self.segments:
            self._join_segments(ra, self.segments.pop(rb))
        for d in (self.fixed, self.unit, self.kind):
            if rb in d:
                if d is self.unit and ra in d:
                    d[ra] = math.lcm(d[ra], d.pop(rb))
                else:
                    d.setdefault(ra, d.pop(rb))
        if rb in self.producer:
            self.producer.add(ra)
        return ra

    def _join_segments(self, ra: int, segs: list[int]) -> None:
        """Root ``ra`` takes over the segment list ``segs``; two lists of one layout join segment by segment."""
        mine = self.segments.get(ra)
        if mine is None:
            self.segments[ra] = segs
        elif [self.size[s] for s in mine] == [self.size[s] for s in segs]:
            for a, b in zip(mine, segs):
                self.union(a, b)
        else:
            reason = "concatenations of different layouts are joined"
            for s in (*mine, *segs):
                self.fix(s, reason)

    def segmented(self, parts: list[int]) -> int:
        """A slot whose index space is ``parts`` side by side (a concatenation of different groups).

        A part that is itself segmented contributes its segments (a concatenation of a
        concatenation, DenseNet's running feature map, is flat).
        """
        flat: list[int] = []
        for s in parts:
            flat.extend(self.segments.get(self.find(s), [s]))
        out = self.new(sum(self.size[s] for s in flat))
        self.segments[out] = flat
        return out

    def flat_segments(self, s: int, depth: int = 0) -> list[int] | None:
        """The slots laid side by side along ``s``, flattened (None when ``s`` is not segmented)."""
        segs = self.segments.get(self.find(s))
        if segs is None:
            return None
        if depth > 32:
            raise ValueError("segments nest too deep")
        out: list[int] = []
        for x in segs:
            out.extend(self.flat_segments(x, depth + 1) or [x])
        return out

    def fix(self, s: int, reason: str) -> None:
        self.fixed.setdefault(self.find(s), reason)

    def require_unit(self, s: int, unit: int) -> int:
        """Make ``s``'s group move in multiples of ``unit`` channels (the lcm with the units it has).

        Returns:
            The group's root slot.
        """
        r = self.find(s)
        self.unit[r] = math.lcm(self.unit.get(r, 1), unit)
        return r

    def repeated(self, base: int, chunks: int) -> int:
        """A slot of ``chunks * size(base)`` channels laid out as ``chunks`` copies of ``base``'s index space.

        A bidirectional RNN's output (forward and backward hidden states side by side) is
        ``repeated(hidden, 2)``: a consumer's tensor axis joined to it becomes a member of
        ``base``'s group with ``chunks`` chunks, sliced alike in each.
        """
        s = self.new(self.size[self.find(base)] * chunks)
        self.derived[s] = (base, chunks)
        return s

    def per_entry(self, base: int, unit: int) -> int:
        """A slot of ``size(base) / unit`` entries, entry ``i`` standing for channels ``[i * unit, (i + 1) * unit)``
        of ``base`` (``pixel_shuffle``'s output channels against its input's, ``r * r`` input channels each).

        ``base``'s group moves in whole units; a tensor axis joined to the returned slot keeps one entry
        per active unit of ``base`` (a per-unit axis of ``base``'s group, see :meth:`resolver`).
        """
        self.require_unit(base, unit)
        s = self.new(self.size[self.find(base)] // unit)
        self.divided[s] = (base, unit)
        return s

    def resolver(self) -> Callable[[int], tuple[int, int]]:
        """Once the analysis is done: slot -> (group root, chunks), looking through repeated slots.

        Merges repeated slots that were joined (their bases join too) and passes a repeated
        slot's fixed reason and producer mark on to its base.
        """
        first: dict[int, tuple[int, int]] = {}
        for s, (b, k) in self.derived.items():
            r = self.find(s)
            if r not in first:
                first[r] = (b, k)
            elif first[r][1] == k:
                self.union(first[r][0], b)
            else:
                reason = f"axis repeats hidden sizes {first[r][1]} and {k} times"
                self.fix(first[r][0], reason)
                self.fix(b, reason)
        self._settle_divided()
        roots = {self.find(s): b_k for s, b_k in self.derived.items()}
        div_roots = self.div_roots

        def resolve(s: int) -> tuple[int, int]:
            r, k = self.find(s), 1
            for _ in range(16):
                d = roots.get(r)
                if d is None and r in div_roots:  # a per-unit slot scales with its base
                    r = self.find(div_roots[r][0])
                    continue
                if d is None:
                    break
                r, k = self.find(d[0]), k * d[1]
            return r, k

        self._settle_segments(roots)
        producers = {self.find(p) for p in self.producer}
        for r in roots:
            base = resolve(r)[0]
            if r in self.fixed:
                self.fixed.setdefault(base, self.fixed[r])
            if r in producers:
                self.producer.add(base)
        return resolve

    def divisor(self, s: int) -> int:
        """After :meth:`resolver`: how many of its group's channels one entry of ``s`` stands for (1, or the
        product of the units of the per-unit slots on its way to the group, see :meth:`per_entry`)."""
        repeated = {self.find(x): b for x, (b, _) in self.derived.items()}
        r, div = self.find(s), 1
        for _ in range(16):
            if r in repeated:
                r = self.find(repeated[r])
            elif r in self.div_roots:
                div *= self.div_roots[r][1]
                r = self.find(self.div_roots[r][0])
            else:
                break
        return div

    def _settle_divided(self) -> None:
        """Per-unit slots (:meth:`per_entry`): joined ones of one unit join their bases; a root's fixed reason
        and producer mark pass to its base; one over a concatenation or a repeated slot fixes both."""
        self.div_roots = {}
        for s, (b, u) in self.divided.items():
            r = self.find(s)
            if r not in self.div_roots:
                self.div_roots[r] = (b, u)
            elif self.div_roots[r][1] == u:
                self.union(self.div_roots[r][0], b)
            else:
                reason = f"an axis is read in units of {self.div_roots[r][1]} and {u} channels"
                self.fix(self.div_roots[r][0], reason)
                self.fix(b, reason)
        repeated = {self.find(s) for s in self.derived}
        for r, (b, _) in list(self.div_roots.items()):
            if r in self.segments or r in repeated or self.find(b) in self.segments:
                self.fix(b, "a concatenation or a repeated axis is read per unit")
            if r in self.fixed:
                self.fix(b, self.fixed[r])
            if r in self.producer:
                self.producer.add(self.find(b))
            self.producer.discard(r)

    def _settle_segments(self, derived_roots: dict[int, tuple[int, int]]) -> None:
        """Pass a segmented root's facts on to its segments: its unit (a GroupNorm over a concatenation:
        each segment moves in whole groups, if its size is a multiple); fixed, a unit that cuts across
        a segment, heads or repeated copies fix them, since a segment's prefix would cut across them."""
        for r in list(self.segments):
            if self.find(r) != r:
                continue
            why = self.fixed.get(r)
            unit = self.unit.get(r, 1)
            if why is None and unit > 1:  # a GroupNorm over a concatenation: each segment moves in whole groups
                if all(self.size[x] % unit == 0 for x in self.flat_segments(r) or []):
                    for x in self.flat_segments(r) or []:
                        self.require_unit(x, unit)
                else:
                    why = f"a concatenation moves in units of {unit} channels that cut across its segments"
            if why is None and self.kind.get(r, "width") != "width":
                why = f"a concatenation is used as {self.kind[r]}"
            if why is None and r in derived_roots:
                why = "a concatenation is repeated"
            if why is not None:
                for x in self.flat_segments(r) or []:
                    self.fix(x, why)

    def reason(self, s: int) -> str | None:
        return self.fixed.get(self.find(s))

