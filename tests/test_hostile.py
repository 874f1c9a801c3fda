"""Every spec in tests/hostile/ must fail cleanly.

Each file's first line is ``# expect: REGEX``. Running ``symbackprop generate`` on it must
exit 2, print exactly one line that starts ``FILE:LINE:COL:`` and matches the regex,
print no traceback, and write nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from symbackprop.cli import main

HOSTILE = Path(__file__).resolve().parent / "hostile"
SPECS = sorted(HOSTILE.glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} has no '# expect:' line"
    return first[len("# expect: "):]


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_hostile_spec_fails_cleanly(spec: Path, tmp_path, capsys, monkeypatch) -> None:
    # Specs that try to run code aim at CANARY_FILE in the working directory.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    started = time.perf_counter()
    code = main(["generate", str(spec), "--out", str(out)])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert not (tmp_path / "CANARY_FILE").exists(), "something in the spec was executed"
    assert elapsed < 2.0, f"rejecting took {elapsed:.2f} s"
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{spec}:"), lines[0]
    assert re.search(r"^\S+:\d+:\d+: ", lines[0]), lines[0]
    assert re.search(expectation(spec), lines[0]), lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_hostile_specs_in_a_subprocess(tmp_path) -> None:
    """The real entry point: no traceback, exit code 2, for a sample of the corpus."""
    for spec in SPECS[::5]:
        res = subprocess.run([sys.executable, "-m", "symbackprop.cli", "generate", str(spec),
                              "--out", str(tmp_path / "o")], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2, (spec.name, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1
        assert not (tmp_path / "o").exists()


def test_corpus_is_large_enough() -> None:
    assert len(SPECS) >= 40


def test_alias_bomb_is_refused_fast(tmp_path) -> None:
    spec = HOSTILE / "yaml_billion_laughs.yaml"
    started = time.perf_counter()
    assert main(["generate", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert time.perf_counter() - started < 0.5
