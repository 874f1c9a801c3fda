"""Generation cost: how long a cold ``symbackprop generate`` takes, by width and by depth.

Each measurement is a fresh process (interpreter start, imports, parse, derive, emit,
write), pinned like the step benchmarks; the median of ``reps`` runs is kept (one run
when the first takes over ``SLOW_S`` seconds). A run of
``python -c "import symbackprop.api"`` alone is measured too, so the table can split
the fixed start-up cost from the part that grows with the network.
"""

from __future__ import annotations

import resource
import shutil
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


def chain_yaml(name: str, count: int) -> str:
    """``count`` standalone tanh activation layers after one dense layer."""
    lines = [f"name: {name}", "inputs: {x: [N, 8]}", "targets: {t: [N, 8]}", "layers:",
             "  - {name: h, type: dense, units: 8}"]
    lines += [f"  - {{name: a{i}, type: activation, activation: tanh}}" for i in range(count)]
    lines.append("loss: {type: mse, target: t}")
    return "\n".join(lines) + "\n"


def formula_yaml(name: str, terms: int) -> str:
    """One activation formula of ``terms`` terms, each a product of two functions."""
    body = " + ".join(f"{i % 5 + 1}*tanh({i + 1}*x)*sigmoid(x - {i})" for i in range(terms))
    return (f"name: {name}\ninputs: {{x: [N, 8]}}\ntargets: {{t: [N, 8]}}\nlayers:\n"
            f"  - {{name: h, type: dense, units: 8, activation: {{formula: \"{body}\"}}}}\n"
            "loss: {type: mse, target: t}\n")


def blocks_yaml(name: str, count: int) -> str:
    """``count`` stacked pre-LayerNorm GPT blocks (4 causal heads over 32 features, a 4x
    gelu_tanh MLP) on ``x: [N, T, 32]``, through ``blocks:`` and ``repeat:``."""
    return f"""name: {name}
inputs: {{x: [N, T, 32]}}
targets: {{t: [N, T, 32]}}
blocks:
  block:
    inputs: [x]
    layers:
      - {{name: ln_1, type: layernorm}}
      - {{name: attn, type: attention, heads: 4, causal: true}}
      - {{name: res1, type: add, input: [x, attn]}}
      - {{name: ln_2, type: layernorm}}
      - {{name: c_fc, type: dense, units: 128, activation: gelu_tanh}}
      - {{name: c_proj, type: dense, units: 32}}
      - {{name: res2, type: add, input: [res1, c_proj]}}
layers:
  - {{name: h, type: block, repeat: {count}}}
loss: {{type: mse, target: t}}
"""


def cases(which: str) -> list[GenCase]:
    """``which``: "all" (MLP, widths 16/4096, depths 8/16/32), "mlp" (the MLP only), or
    "sweep" (cost against op count: 64-wide tanh MLPs of depth 8/32/128, ten chained
    activation layers, one 16-term formula, 1/2/4 stacked GPT blocks, the MLP)."""
    out = [GenCase("mlp", "MLP 784-256-256-10 (benchmarks/specs/mlp784.yaml)", None,
                   SPECS / "mlp784.yaml")]
    if which == "mlp":
        return out
    if which == "sweep":
        for depth in (8, 32, 64, 128):
            out.append(GenCase(
                f"d{depth}", f"depth {depth}: {FIXED_WIDTH}-({FIXED_WIDTH} x {depth - 1})-10",
                mlp_yaml(f"gen_d{depth}", FIXED_WIDTH, [FIXED_WIDTH] * (depth - 1), 10),
                dense_layers=depth))
        out.append(GenCase("acts10", "ten chained `activation: tanh` layers",
                           chain_yaml("gen_acts10", 10)))
        out.append(GenCase("formula16", "one 16-term activation formula",
                           formula_yaml("gen_formula16", 16)))
        for count in (1, 2, 4):
            out.append(GenCase(f"blocks{count}", f"{count} stacked GPT block"
                               f"{'s' if count > 1 else ''} (`repeat: {count}`)",
                               blocks_yaml(f"gen_blocks{count}", count)))
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


def derivations_bytes(folder: Path) -> int | None:
    """Size of the derivation text of the numpy module in ``folder``: the statements
    ``DERIVATION_PASSES = {...}`` (forward and backward pass, once) and
    ``DERIVATIONS = {...}`` (one line per gradient) together."""
    import ast

    for module in sorted(folder.glob("*_numpy.py")):
        source = module.read_text(encoding="utf-8")
        sizes = [len(ast.get_source_segment(source, node) or "")
                 for node in ast.parse(source).body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", "") in ("DERIVATIONS",
                                                             "DERIVATION_PASSES")]
        if sizes:
            return sum(sizes)
    return None


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
                                 "all": times, "dense_layers": case.dense_layers,
                                 "derivations_bytes": derivations_bytes(out)}
            if log is not None:
                log(f"  generate {case.key}: {statistics.median(times):.2f} s")
    return results


def main() -> None:
    """``python benchmarks/gencost.py [--which sweep|all|mlp] [--reps 3]``: the generation
    table alone (the full harness, ``run.py``, also times training steps)."""
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--which", choices=("sweep", "all", "mlp"), default="sweep")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    prefix = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    results = measure(args.which, args.reps, prefix, env, log=print)
    base = results["import"]["seconds"]
    print("\n| spec | cold generate s | minus import s | derivation text bytes |")
    print("|---|---:|---:|---:|")
    for res in results.values():
        size = res.get("derivations_bytes")
        print(f"| {res['label']} | {res['seconds']:.2f} | {res['seconds'] - base:.2f} | "
              f"{size if size is not None else '—'} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
