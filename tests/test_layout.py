"""The package keeps the redesign's limits: no module over 500 lines, no class over 300, no function
over 80, and no import cycle (``scripts/layout.py --check``, which prints what passes a limit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layout_limits_and_no_import_cycle():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "layout.py"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "import cycles: 0" in p.stdout


def test_the_check_finds_a_cycle():
    sys.path.insert(0, str(ROOT / "scripts"))
    import layout

    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert layout._cycles(graph) == [["a", "b", "c"]]
    assert layout._cycles({"a": {"b"}, "b": set()}) == []
