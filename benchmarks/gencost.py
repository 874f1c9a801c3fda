"""Generation cost: how long a cold ``symbackprop generate`` takes, by width and by depth.

Each measurement is a fresh process (interpreter start, imports, parse, derive, emit,
write), pinned like the step benchmarks; the median of ``reps`` runs is kept (one run
when the first takes over ``SLOW_S`` seconds). A run of
``python -c "import symbackprop.api"`` alone is measured too, so the table can split
the fixed start-up cost from the part that grows with the network.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workloads import SPECS

FIXED_WIDTH = 64
SLOW_S = 20.0  # a case slower than this is run once, not ``reps`` times


@dataclass(frozen=True)
class GenCase:
    """One spec whose generation is timed."""

    key: str
    label: str
    text: str | None  # synthesized YAML, or None to use ``path``
    path: Path | None = None
    dense_layers: int = 3


def mlp_yaml(name: str, inputs: int, hidden: list[int], classes: int) -> str:
    lines = [f"name: {name}", f"inputs: {{x: [N, {inputs}]}}",
             f"targets: {{label: [N, {classes}]}}", "layers:"]
    for i, width in enumerate(hidden, start=1):
        lines.append(f"  - {{name: fc{i}, type: dense, units: {width}, activation: tanh}}")
    lines.append(f"  - {{name: logits, type: dense, units: {classes}}}")
    lines.append("loss: {type: softmax_cross_entropy, prediction: logits, target: label}")
    return "\n".join(lines) + "\n"


def cases(which: str) -> list[GenCase]:
    """``which``: "all" (MLP, widths 16/4096, depths 8/16/32) or "mlp" (the MLP only)."""
    out = [GenCase("mlp", "MLP 784-256-256-10 (benchmarks/specs/mlp784.yaml)", None,
                   SPECS / "mlp784.yaml")]
    if which == "mlp":
        return out
    for width in (16, 4096):
        out.append(GenCase(f"w{width}", f"784-{width}-{width}-10 (width {width})",
                           mlp_yaml(f"gen_w{width}", 784, [width, width], 10)))
    for depth in (8, 16, 32):
        out.append(GenCase(
            f"d{depth}", f"depth {depth}: {FIXED_WIDTH}-({FIXED_WIDTH} x {depth - 1})-10",
            mlp_yaml(f"gen_d{depth}", FIXED_WIDTH, [FIXED_WIDTH] * (depth - 1), 10),
            dense_layers=depth))
    return out


def _timed(cmd: list[str], env: dict[str, str], retries: int = 3) -> float:
    """Wall seconds of one run; re-run (up to ``retries`` times) when another process
    took the core (the child's CPU time under 90 % of its wall time)."""
    best = None
    for _ in range(1 + retries):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                              start_new_session=True)
        elapsed = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if cpu >= 0.9 * elapsed:
            return elapsed
        best = elapsed if best is None else min(best, elapsed)
        time.sleep(2.0)
    assert best is not None
    return best


PRIMED = ("before timing, the installed package is byte-compiled (as pip does at install; "
          "a PYTHONDONTWRITEBYTECODE environment would otherwise recompile it in every run) "
          "and one untimed generate fills Jinja2's template bytecode cache: every timed run "
          "is a fresh process of a symbackprop that has been installed and run once")


def _prime(prefix: list[str], env: dict[str, str], root: Path) -> None:
    """What an installed, once-used symbackprop has on disk; see ``PRIMED``."""
    compile_cmd = [sys.executable, "-c", "import compileall, os, symbackprop; "
                   "compileall.compile_dir(os.path.dirname(symbackprop.__file__), quiet=1)"]
    subprocess.run(compile_cmd, env=env, check=True, capture_output=True)
    subprocess.run([*prefix, sys.executable, "-m", "symbackprop.cli", "generate",
                    str(SPECS / "mlp784.yaml"), "--out", str(root / "prime"), "--force"],
                   env=env, check=True, capture_output=True)


def measure(which: str, reps: int, prefix: list[str], env: dict[str, str],
            log: Callable[[str], None] | None = None) -> dict[str, dict[str, object]]:
    """Median wall seconds of ``reps`` cold runs for each case, plus the import floor."""
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="symbackprop-gencost-") as tmp:
        root = Path(tmp)
        _prime(prefix, env, root)
        import_cmd = [*prefix, sys.executable, "-c", "import symbackprop.api"]
        times = [_timed(import_cmd, env) for _ in range(reps)]
        results["import"] = {"label": "`import symbackprop.api` alone (start-up floor)",
                             "seconds": statistics.median(times), "all": times,
                             "dense_layers": 0}
        for case in cases(which):
            spec = case.path
            if spec is None:
                spec = root / f"{case.key}.yaml"
                spec.write_text(case.text or "")
            out = root / f"out_{case.key}"
            cmd = [*prefix, sys.executable, "-m", "symbackprop.cli", "generate", str(spec),
                   "--out", str(out), "--force"]
            times = [_timed(cmd, env)]
            while len(times) < reps and times[0] < SLOW_S:
                times.append(_timed(cmd, env))
            results[case.key] = {"label": case.label, "seconds": statistics.median(times),
                                 "all": times, "dense_layers": case.dense_layers}
            if log is not None:
                log(f"  generate {case.key}: {statistics.median(times):.2f} s")
    return results
