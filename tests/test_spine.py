"""The typed spine: the plan and manifest are frozen, their JSON round-trips exactly, old formats migrate."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import elasticize
from elasticize.checkpoint import FORMAT_VERSION, load_manifest
from elasticize.modules import GroupState
from elasticize.plan import MANIFEST_FORMAT, Axis, Plan, Segments
from elasticize.plan.apply import axis_state
from elasticize.plan.types import Tensor, axis_from_json, frozen_map
from elasticize.plan.manifest import Manifest
from elasticize.plan.parse import ManifestError
from elasticize.testing.zoo import build

FIXTURES = Path(__file__).parent / "fixtures"


def _exact(plan: Plan) -> None:
    """to_json(from_json(x)) == x, byte for byte as the writer serializes it, and to_json is a fixed point."""
    data = plan.to_json()
    again = Plan.from_json(json.loads(json.dumps(data)))
    assert again == plan
    assert json.dumps(again.to_json(), separators=(",", ":")) == json.dumps(data, separators=(",", ":"))


@pytest.fixture(scope="module")
def lstm_plan() -> Plan:
    model, inputs = build("rnn")
    return elasticize.elasticize(model.eval(), inputs, dims=("width", "depth")).plan


def test_plan_parts_are_frozen(lstm_plan):
    plan = lstm_plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tracer = "export"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.groups[0].size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.tensors["x"] = plan.tensors[next(iter(plan.tensors))]  # type: ignore[index]
    fqn, info = next((f, t) for f, t in plan.tensors.items() if t.axes)
    with pytest.raises(TypeError):
        info.axes[0] = Axis("g")  # type: ignore[index]
    with pytest.raises(AttributeError):
        plan.groups.append(plan.groups[0])  # type: ignore[attr-defined]
    assert plan.tensors[fqn].axes[next(iter(info.axes))].group in {g.name for g in plan.groups}
    assert plan.group(plan.groups[0].name) is plan.groups[0]


def test_round_trip_lstm(lstm_plan):
    assert any(s.module is not None for s in lstm_plan.stages)  # the LSTM's layer stage, with its tensors
    _exact(lstm_plan)


def test_round_trip_timm_resnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=5).eval()
    em = elasticize.elasticize(model, torch.randn(1, 3, 32, 32), dims=("width",), sort=None)
    assert em.plan.groups and em.plan.mac_terms and em.plan.attrs  # switchable norms: the cnn_skippable_v2 fixture
    _exact(em.plan)


def test_round_trip_hf_bert():
    T = pytest.importorskip("transformers")
    model = T.BertForSequenceClassification(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=48, vocab_size=100,
                                                         max_position_embeddings=64)).eval()
    em = elasticize.elasticize(model, dims=("width", "heads", "depth", "hidden"))
    assert any(g.kind == "heads" for g in em.plan.groups) and em.plan.stages[0].drop == "remove"
    _exact(em.plan)


@pytest.mark.parametrize("name", ["cnn_v1", "cnn_v2", "cnn_skippable_v2", "lstm", "vit_named", "bert"])
def test_fixture_plans_round_trip(name):
    """Plans written before the typing come back equal; as bytes too, except the pre-builder HF planner's key order."""
    raw = elasticize.read_manifest(FIXTURES / f"{name}.safetensors", presets=False)["plan"]
    typed = Plan.from_json(raw).to_json()
    assert typed == raw
    if name != "bert":
        assert json.dumps(typed) == json.dumps(raw)


def test_format_1_fixture_migrates_to_the_typed_manifest():
    path = FIXTURES / "cnn_v1.safetensors"
    raw = elasticize.read_manifest(path, presets=False)
    m = load_manifest(path)
    assert isinstance(m, Manifest) and m.format_version == raw["format_version"] == 1
    assert not m.bn_stats and not m.files and set(m.presets) == set(raw["presets"])
    assert m.plan == Plan.from_json(raw["plan"]) and m.presets["full"].macs == raw["presets"]["full"]["macs"]
    migrated = MANIFEST_FORMAT.migrate(raw, 1)  # one registered step per old version
    assert [s.source for s in MANIFEST_FORMAT.steps] == [1, 2, 3] and migrated["format_version"] == MANIFEST_FORMAT.current
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.kind = "sub-network"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.recipe["name"] = "other"  # type: ignore[index]


def test_version_rule_comes_from_the_registry():
    assert MANIFEST_FORMAT.oldest_for({"presets": {}}) == 1
    assert MANIFEST_FORMAT.oldest_for({"bn_stats": {"a": {}}}) == 2
    assert MANIFEST_FORMAT.oldest_for({"bn_stats": {}, "files": {}}) == 3
    with pytest.raises(ManifestError, match="calibrated statistics need format version 2"):
        MANIFEST_FORMAT.check_keys({"bn_stats": {}}, 1)
    with pytest.raises(ManifestError, match="stored files need format version 3"):
        MANIFEST_FORMAT.check_keys({"files": {"a": 1}}, 2)
    MANIFEST_FORMAT.check_keys({"bn_stats": {}, "files": {}}, 3)
    assert MANIFEST_FORMAT.current == FORMAT_VERSION == 4  # one source: the registry
    for key in ("measurements", "bias_compensation", "layout"):
        assert MANIFEST_FORMAT.oldest_for({"bn_stats": {}, key: {}}) == 4
    with pytest.raises(ManifestError, match="manifest key layout: a nested byte layout needs format version 4"):
        MANIFEST_FORMAT.check_keys({"layout": {}}, 3)
    with pytest.raises(ManifestError, match="manifest key bias_compensation: needs format version 4"):
        MANIFEST_FORMAT.check_keys({"bias_compensation": {}}, 3)


def test_segments_round_trip_and_read_per_segment():
    e = [["a", 2], 5, ["b", 1, 2]]
    seg = axis_from_json(e)
    assert seg == Segments((Axis("a", 2), 5, Axis("b", 1, 2))) and seg.groups == ("a", "b") and seg.to_json() == e
    assert axis_from_json(["a", 2]) == Axis("a", 2) and Axis("a", 2).groups == ("a",)
    groups = {"a": GroupState("a", 4, 1), "b": GroupState("b", 8, 1)}
    groups["a"].active, groups["b"].active = 2, 4
    state, chunks, div = axis_state(seg, groups)
    assert (chunks, div, state.size, state.active) == (1, 1, 2 * 4 + 5 + 4, 2 * 2 + 5 + 2)
    assert state.ranges() == ((0, 2), (4, 6), (8, 15))  # each chunk's prefix, the whole 5, b's half-rows' prefix
    plan = Plan(tensors=frozen_map({"w": Tensor((17,), True, frozen_map({0: seg}))}))
    assert copy.deepcopy(plan) is plan and copy.copy(plan.tensors["w"]) is plan.tensors["w"]  # immutable: itself
