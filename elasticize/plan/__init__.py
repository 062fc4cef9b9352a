"""The plan (what is elastic, as frozen typed records), its strict parsing, migration, building and applying.

* :mod:`~elasticize.plan.core`: the frozen :class:`Plan` record and its constants;
* :mod:`~elasticize.plan.types`: its parts (:class:`Group`, :class:`Axis`, :class:`Segments`, :class:`Tensor`,
  :class:`Attr`, :class:`Stage`, :class:`SwitchableNorm`, :class:`MacTerm`, :class:`NotElastic`), frozen dataclasses;
* :mod:`~elasticize.plan.manifest`: the typed, frozen :class:`Manifest` of a file;
* :mod:`~elasticize.plan.migrate`: the format versions and one registered migration step per old one;
* :mod:`~elasticize.plan.parse`: bounded JSON and the typed field checks every file reader uses;
* :mod:`~elasticize.plan.check`: the strict check of a plan read from a file;
* :mod:`~elasticize.plan.builder`: :class:`PlanBuilder`, the one writer of a plan (choices, exclusions,
  stages, switchable norms, MAC terms), used by both planners;
* :mod:`~elasticize.plan.build`: ``Analysis -> Plan``;
* :mod:`~elasticize.plan.apply`: the surgery (``apply_plan``) and its undoing;
* :mod:`~elasticize.plan.ranges`: the prefix ranges a sub-network reads of each tensor.
"""

from .apply import ElasticState, apply_plan, remove_elastic
from .build import build_plan
from .builder import DEPTH_MODES, PlanBuilder
from .core import (DIMENSIONS, KIND_DIM, NORM_SITES, NORM_TENSORS, PLAN_VERSION, Plan, axis_entry, entry_groups,
                   is_segmented, segment_entries, stage_outputs, stage_ranks)
from .migrate import MANIFEST_FORMAT, PLAN_FORMAT, Format
from .ranges import slice_ranges, tensor_ranges
from .types import Attr, Axis, Group, MacTerm, NotElastic, Segments, Stage, SwitchableNorm, Tensor

__all__ = ["Plan", "PLAN_VERSION", "PlanBuilder", "DEPTH_MODES", "build_plan", "apply_plan", "remove_elastic",
           "ElasticState", "DIMENSIONS", "KIND_DIM", "NORM_TENSORS", "NORM_SITES", "axis_entry", "stage_ranks",
           "stage_outputs", "is_segmented", "segment_entries", "entry_groups",
           "tensor_ranges", "slice_ranges", "Group", "Axis", "Segments", "Tensor", "Attr", "Stage", "SwitchableNorm",
           "MacTerm", "NotElastic", "Format", "MANIFEST_FORMAT", "PLAN_FORMAT"]
