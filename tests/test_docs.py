"""The README and the documentation stay true: its size and set-up, links, the headline figures
against the benchmarks' results files, those files' shape, and the file-format page's reader
against ``load_subnet``. (``mkdocs build --strict`` itself runs in ``.ci/run``.)"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def _slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"`([^`]*)`", r"\1", heading), "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", md.read_text(), re.M)}


def test_readme_is_short_and_has_the_two_setup_commands():
    assert len(README.splitlines()) <= 300
    setup = _section(README, "Set-up")
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert commands == ['python3 -m venv .venv && .venv/bin/pip install -e ".[all]" && '
                        ".venv/bin/python examples/minilm.py --out minilm-elastic",
                        ".venv/bin/python -m pytest"]
    assert "| full | 1.43G | 100.0% | 1.0000 |" in setup  # the main job's output


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    """Every relative link names an existing file, and an existing heading when it has an anchor.

    (mkdocs checks the docs' links too; this also covers the README, which the site does not build.)"""
    pytest.importorskip("markdown")  # the docs extra: headings are slugged as the site slugs them
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve()
        if dest.parent == ROOT / "docs" / "reference" and not dest.exists():
            continue  # reference pages are written at build time (docs/hooks.py)
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {path}"


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+(?:\.\d+)?", text)


def test_readme_headline_figures_are_in_the_results_files():
    rows = [r for r in _section(README, "Headline numbers").splitlines() if r.startswith("| ") and "---" not in r]
    checked, source = 0, None
    for row in rows[1:]:
        _, figure, details = [c.strip() for c in row.strip("|").split(" | ")]
        m = re.search(r"\(benchmarks/results/([\w.]+\.json)\)", details)
        source = m.group(1) if m else source
        assert source, row
        doc = json.loads((RESULTS / source).read_text())
        text = json.dumps(doc, ensure_ascii=False)
        figure = re.sub(r"\([^)]*\)", "", figure)  # references and targets, not measured here
        for n, total in re.findall(r"(\d+) of (\d+)", figure):  # "79 of 79": the full sweep's rows without a failure
            rows_ok = [r for t in doc["runs"][0]["tables"] for r in t["rows"]
                       if not any(c.startswith("failed") for c in r)]
            assert int(n) == len(rows_ok) == int(total), (source, figure)
            figure = figure.replace(f"{n} of {total}", "")
        for num in _numbers(figure):
            assert num in text, f"README headline {num} ({row[:60]}...) is not in benchmarks/results/{source}"
            checked += 1
    assert checked >= 10


def test_results_files_are_well_formed_and_shown():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")}
    files = {p.stem for p in RESULTS.glob("*.json")}
    assert files <= scripts, "a results file without its script"
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in files:
        doc = json.loads((RESULTS / f"{name}.json").read_text())
        assert doc["script"] == f"{name}.py"
        assert f"<!-- results: {name}" in page, f"docs/benchmarks.md does not show {name}"
        for run in doc["runs"]:
            assert run["command"] and run["machine"] and run["source"], name
            for t in run["tables"]:
                assert all(len(r) == len(t["columns"]) for r in t["rows"]), (name, t.get("title"))
    for name in scripts:  # every benchmark records its figures
        assert "_results.write(" in (ROOT / "benchmarks" / f"{name}.py").read_text() or name == "bench_hf_coverage"


def test_results_helper_replaces_a_run_of_the_same_command(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    dest = str(tmp_path / "r.json")
    t = _results.table(["a", "b|c"], [[1, "x"]], title="t")
    assert _results.markdown(t) == "| a | b\\|c |\n|---|---|\n| 1 | x |"
    _results.write("bench_x.py", [t], dest=dest, argv=["--steps", "3", "--results", dest])
    _results.write("bench_x.py", [t], dest=dest, argv=["--steps", "4"])
    _results.write("bench_x.py", [_results.table(["a"], [[2]])], dest=dest, argv=["--steps", "3"])
    runs = json.loads(Path(dest).read_text())["runs"]
    assert [r["command"] for r in runs] == ["python benchmarks/bench_x.py --steps 3",
                                            "python benchmarks/bench_x.py --steps 4"]
    assert runs[0]["tables"][0]["rows"] == [["2"]]
    assert _results.write("bench_x.py", [t], quick=True) is None  # smoke runs write only where told


def test_docs_hook_renders_results_and_reference_pages():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)

    class Page:
        class file:
            src_uri = "benchmarks.md"

    out = hooks.on_page_markdown((ROOT / "docs" / "benchmarks.md").read_text(), Page, None, None)
    assert "<!-- results:" not in out
    assert ("| conversion (`elasticize(model)`, including the run of the smallest sub-network that checks it) "
            "| 0.44 s |") in out
    with pytest.raises(Exception, match="no run with id"):
        hooks.on_page_markdown("<!-- results: bench_core#nope -->", Page, None, None)


def test_file_format_reader_cuts_what_load_subnet_loads(tmp_path):
    """The reader on the file-format page (safetensors + JSON only) gives load_subnet's tensors,
    calibrated BatchNorm statistics included."""
    import elasticize
    from elasticize.train import recalibrate_bn
    from toy_models import DigitsResNet

    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "guides" / "file-format.md").read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, "file-format.md", "exec"), ns)
    torch.manual_seed(0)
    em = elasticize.elasticize(DigitsResNet(c=8))
    recalibrate_bn(em, [torch.randn(16, 1, 8, 8) for _ in range(2)], num_batches=2)
    path = elasticize.save(em, tmp_path / "d.safetensors")
    for preset in em.presets:
        mine = ns["cut"](str(path), preset)
        ref = elasticize.load_subnet(path, preset, model=DigitsResNet(c=8)).state_dict()
        assert set(mine) == set(ref), preset
        for name, t in ref.items():
            assert np.array_equal(mine[name], t.numpy()), (preset, name)
