"""A built wheel installs into a fresh virtual environment and generates from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

from conftest import EXAMPLES, ROOT


def test_wheel_installs_and_generates(tmp_path: Path) -> None:
    src = tmp_path / "src"
    # Build from a clean copy of the tracked tree so stale build/ folders cannot leak in.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", "test-artifacts",
        "generated", ".pytest_cache", ".ruff_cache"))
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                          "--outdir", str(dist), str(src)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = dist.glob("symbackprop-*.whl")

    env_dir = tmp_path / "venv"
    # The fresh environment sees the machine's numpy/sympy/jinja2/yaml (no network needed)
    # but gets symbackprop only from the wheel.
    venv.EnvBuilder(with_pip=True, system_site_packages=True).create(env_dir)
    py = env_dir / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(EXAMPLES / "seed_mlp.yaml", work)
    where = subprocess.run([str(py), "-c", "import symbackprop; print(symbackprop.__file__)"],
                           cwd=work, capture_output=True, text=True, timeout=120)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr
    res = subprocess.run([str(env_dir / "bin" / "symbackprop"), "generate", "seed_mlp.yaml"],
                         cwd=work, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = (work / "generated" / "seed_mlp_numpy.py").read_text()
    assert "def loss_and_grad(params" in text
    assert (work / "generated" / "seed_mlp_torch.py").exists()
