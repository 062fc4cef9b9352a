"""Typed conversion options: :class:`ConvertOptions`, what :func:`elasticize.elasticize` and
:func:`elasticize.convert` take as ``options=`` or as keyword options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

__all__ = ["ConvertOptions", "options_from", "SORTS"]

#: The values of ``sort`` (None keeps the original order).
SORTS = ("auto", "magnitude", "activation", None)

_SEQUENCES = ("dims", "width_ratios", "heads_ratios", "exclude")


@dataclass(frozen=True)
class ConvertOptions:
    """Typed conversion options, as ``LoraConfig`` is for PEFT: what :func:`elasticize.elasticize`
    makes elastic and how it orders the units. Every field is JSON-native (:meth:`to_json`).

    Attributes:
        dims: elastic dimensions: ``"width"`` (channels/features per coupling group), ``"heads"``
            (attention heads), ``"depth"`` (residual blocks per stage), ``"modules"`` (parallel
            modules of :class:`elasticize.tac.TACLinear` blocks; Subnetwork-to-go's width), and
            for transformers ``"hidden"`` (the FFN's inner width).
        depth_mode: ``"prefix"`` (SortedNet, arXiv 2309.00255: keep the first k blocks of each
            stage) or ``"skippable"`` (Adaptive Depth Networks, arXiv 2312.16392: each stage's
            second half is one skippable sub-path; norms in the mandatory half are switchable).
            Transformers also take ``"spaced"`` (a depth-k sub-network drops layers evenly and
            keeps the last, :mod:`elasticize.adapters.hf`).
        width_ratios: fractions of each width group offered (SortedNet Table 1 uses 100/75/50/25%).
        heads_ratios: fractions of each attention's heads offered.
        modules_ratios: fractions of each TAC block's modules offered; None offers every ``w <= W``.
        exclude: ``fnmatch`` patterns of group or stage names to keep at full size.
        sort: ``"magnitude"``, ``"activation"``, ``"auto"`` or None; see :func:`elasticize.elasticize`.

    Raises:
        TypeError: a string where a sequence belongs (``dims="width"``), or a ``depth_mode`` that is
            not a string.
        ValueError: an unknown ``sort``. Unknown dimensions and depth modes are refused when the
            plan is built.
    """

    VERSION: ClassVar[int] = 1

    dims: tuple[str, ...] = ("width", "heads", "depth", "modules")
    depth_mode: str = "prefix"
    width_ratios: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    heads_ratios: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    modules_ratios: tuple[float, ...] | None = None
    exclude: tuple[str, ...] = ()
    sort: str | None = "auto"

    def __post_init__(self) -> None:
        for name in _SEQUENCES + (("modules_ratios",) if self.modules_ratios is not None else ()):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise TypeError(f"{name} takes a sequence (e.g. a tuple), not {type(value).__name__} {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.depth_mode, str):
            raise TypeError(f"depth_mode takes a string, not {type(self.depth_mode).__name__}")
        if self.sort not in SORTS:
            raise ValueError(f"sort must be 'auto', 'magnitude', 'activation' or None, not {self.sort!r}")

    def plan_options(self) -> dict[str, Any]:
        """The options a family's planner takes (:meth:`elasticize.adapters.Adapter.plan`)."""
        return dict(dims=self.dims, depth_mode=self.depth_mode, width_ratios=self.width_ratios,
                    heads_ratios=self.heads_ratios, exclude=self.exclude)

    def replace(self, **changes: Any) -> "ConvertOptions":
        """A copy with ``changes`` (field name -> value); unknown names raise ``TypeError``."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The options as JSON-native values, with ``"version"``."""
        out: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, data: Any) -> "ConvertOptions":
        """Options from :meth:`to_json`'s output; missing fields take their defaults.

        Raises:
            TypeError: ``data`` is not a dict, or a field has the wrong type.
            ValueError: a version newer than this elasticize reads (named), a missing or bad
                version, or an unknown key.
        """
        if not isinstance(data, dict):
            raise TypeError(f"conversion options are a JSON object, not {type(data).__name__}")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"conversion options need a version (1 to {cls.VERSION}), not {version!r}")
        if version > cls.VERSION:
            raise ValueError(f"conversion options of version {version} are newer than this elasticize reads "
                             f"({cls.VERSION}); upgrade elasticize")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in conversion options of version {version}; "
                             f"known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k != "version"})


def options_from(options: ConvertOptions | None, **given: Any) -> ConvertOptions:
    """The options of a call that takes ``options=`` alongside the keyword options (``given``, with
    their defaults where not passed): ``options`` when given, else ``ConvertOptions(**given)``.

    Raises:
        TypeError: ``options`` is not a :class:`ConvertOptions`, or both it and a keyword option
            that differs from its default were given (say it once).
    """
    from_keywords = ConvertOptions(**given)
    if options is None:
        return from_keywords
    if not isinstance(options, ConvertOptions):
        raise TypeError(f"options takes an elasticize.ConvertOptions, not {type(options).__name__}")
    default = ConvertOptions()
    both = [f.name for f in dataclasses.fields(default) if getattr(from_keywords, f.name) != getattr(default, f.name)]
    if both:
        raise TypeError(f"{', '.join(both)} given both as keyword(s) and in options=; set them in one place "
                        f"(options.replace({both[0]}=...))")
    return options
