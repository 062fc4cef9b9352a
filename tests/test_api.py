"""The public surface: what ``import elasticize`` exports, PEP 561 typing, the ElasticModel's repr and summary."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import elasticize

from toy_models import ToyCNN

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_exports_save_subnet_register_adapter_and_convert_options():
    from elasticize import adapters, checkpoint, model

    assert elasticize.save_subnet is checkpoint.save_subnet
    assert elasticize.register_adapter is adapters.register_adapter
    assert elasticize.Adapter is adapters.Adapter
    assert elasticize.ConvertOptions is model.ConvertOptions
    for name in elasticize.__all__:
        assert getattr(elasticize, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        elasticize.nope  # noqa: B018


def test_register_adapter_from_the_package_registers_loudly():
    @elasticize.register_adapter("test_api_family")
    class Family(elasticize.Adapter):
        pass

    try:
        from elasticize.adapters import get_adapter

        assert isinstance(get_adapter("test_api_family"), Family)
        with pytest.raises(ValueError, match="test_api_family"):
            elasticize.register_adapter("test_api_family")(Family)
    finally:
        from elasticize.adapters import _ADAPTERS

        _ADAPTERS.pop("test_api_family", None)


def test_the_wheel_ships_py_typed(tmp_path):
    """PEP 561: type checkers read elasticize's hints only if the installed package holds ``py.typed``."""
    build_meta = pytest.importorskip("setuptools.build_meta")
    assert (ROOT / "elasticize" / "py.typed").is_file()
    src = tmp_path / "src"
    shutil.copytree(ROOT / "elasticize", src / "elasticize", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    import os

    cwd = os.getcwd()
    os.chdir(src)
    try:
        wheel = build_meta.build_wheel(str(tmp_path / "dist"))
    finally:
        os.chdir(cwd)
    assert "elasticize/py.typed" in zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()


def _toy():
    torch.manual_seed(0)
    return elasticize.elasticize(ToyCNN().eval(), torch.randn(1, 1, 8, 8))


def test_repr_shows_the_active_sub_networks_sizes():
    """At every preset, the model's repr reads like the extracted module's: the same layers with
    the sizes the sub-network runs at, and a skipped block as one line."""
    em = _toy()
    assert "active='full'" in repr(em)
    for preset in em.presets:
        em.set_subnet(preset)
        shown = re.sub(r"Elastic(\w+)\(skipped\)", "Identity()", repr(em.model)).replace("Elastic", "")
        assert shown == repr(em.extract(preset)), preset
        assert f"active={preset!r}" in repr(em)
        assert f"macs={em.macs(preset):,} of {em.macs('full'):,}" in repr(em)
    em.set_subnet("tiny")
    assert "ElasticConv2d(1, 4," in repr(em) and "ElasticBlock(skipped)" in repr(em)
    em.set_subnet({"width": {"stem.0:out": 12}})
    assert "active=custom" in repr(em) and "ElasticConv2d(1, 12," in repr(em)
    em.set_subnet(None)
    assert "ElasticConv2d(1, 16," in repr(em) and "(skipped)" not in repr(em)  # nothing left frozen


def test_summary_is_a_rich_table_of_the_active_sub_network():
    from rich.console import Console
    from rich.table import Table

    em = _toy()
    em.set_subnet("medium")
    table = em.summary()
    assert isinstance(table, Table)
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "at 'medium'" in text
    cfg = em.resolve("medium")
    for g in em.plan.groups:
        row = rf"{re.escape(g.name)}\s+│\s+width\s+│\s+{cfg['width'][g.name]}\s+│\s+{g.size}\s"
        assert re.search(row, text), g.name
    assert re.search(r"stage\s+│\s+depth\s+│\s+2\s+│\s+3\s", text)
    assert f"MACs per sample {em.macs('medium'):,} of {em.macs('full'):,}" in text
    other = Console(record=True, width=200)
    other.print(em.summary("tiny"))
    assert "at 'tiny'" in other.export_text() and em.active_name() == "medium"
    with pytest.raises(KeyError, match="no preset"):
        em.summary("nope")
