"""The README's first set-up command runs ``examples/minilm.py``; this runs it small, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import elasticize

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_main_job_runs_and_writes_its_calibrated_file(tmp_path):
    out = tmp_path / "minilm-elastic"
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "minilm.py"), "--out", str(out), "--sentences", "16",
                          "--refine-rounds", "1"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for row in ("full", "large", "medium", "small", "tiny", "budget-50", "budget-25", "minilm-half"):
        assert row in res.stdout, row
    measured = out / "minilm.measured.safetensors"
    m = elasticize.read_manifest(measured)
    assert {"budget-50", "budget-25"} <= set(m["presets"])
    full = m["presets"]["full"]["macs"]
    assert m["presets"]["budget-50"]["macs"] <= 0.5 * full and m["presets"]["budget-25"]["macs"] <= 0.25 * full
    assert m.get("measurements"), "the main job's file holds its measurements"
