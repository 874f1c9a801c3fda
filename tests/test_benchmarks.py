"""Smoke test of the benchmark harness: it runs, and every contender agrees on the step.

Runs ``benchmarks/run.py --quick`` on the tiny workload only (two children at a time, no
generation-cost runs) and checks the report's structure; it asserts nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"

pytest.importorskip("torch")


def test_quick_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--workloads", "tiny", "--gen", "none",
         "--jobs", "2", "--seconds", "0.05", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "results.md").read_text(encoding="utf-8")
    assert "## Step time" in report
    assert "tiny N=1" in report
    assert "generated numpy" in report and "torch.nn eager autograd" in report
    assert "## Targets (issue 5)" in report
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {r["contender"]: r for r in data["results"]}
    for name in ("numpy-gen", "torch-gen", "torch-gen-module", "torch-eager", "numpy-hand",
                 "floor-numpy", "floor-torch"):
        assert rows[name]["median_ms"] > 0, rows[name]
        if not name.startswith("floor"):
            assert rows[name]["max_rel_err"] < 1e-4, rows[name]
            assert rows[name]["peak_bytes"] is not None
    jax_row = rows["jax-jit"]
    assert "median_ms" in jax_row or "skipped" in jax_row
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in report
    else:
        assert (out / "chart.png").stat().st_size > 1000
