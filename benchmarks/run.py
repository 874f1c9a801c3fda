"""Benchmark harness: every contender on the same training step, one pinned process each.

    python benchmarks/run.py                       # full run; writes benchmarks/results/
    python benchmarks/run.py --quick               # a fast, rough pass over everything
    python benchmarks/run.py --quick --workloads tiny --gen none --out /tmp/b   # smoke

At start it generates the benchmark specs (``benchmarks/specs/*.yaml``) into a temporary
folder with the installed symbackprop. Then, for every workload, batch size and contender,
it starts ``benchmarks/contender.py`` in its own process, pinned to one core
(``taskset -c 0``, skipped with a note where taskset is absent) with one thread per
library (``OPENBLAS_NUM_THREADS=1``, ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
``torch.set_num_threads(1)``, XLA's Eigen pool off) and with ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` removed from its environment (they slow a current numpy down on
some processors). Each child warms up and reports the median of many repetitions;
``--rounds`` repeats the whole sweep in rotated order and keeps the median of the
rounds' medians. Last it times cold ``symbackprop generate`` runs (``gencost.py``).

It prints a Markdown report (times, ratios, peak memory, the issue's targets met or
missed, generation cost) and writes ``results.md``, ``results.json`` and ``chart.png``
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gencost  # noqa: E402
from contender import CONTENDERS  # noqa: E402
from workloads import WORKLOADS, Workload  # noqa: E402

Key = tuple[str, int, str]  # (workload, batch, contender)
REL_ERR_LIMIT = 1e-4  # float32 step against a float64 reference
MIN_CPU_SHARE = 0.9  # below this a child was descheduled by another process: re-run it

# The targets: (id, text, kind, arguments). Evaluated in `targets()`.
LABELS = {
    "numpy-gen": "generated numpy", "torch-gen": "generated torch (loss_and_grad)",
    "torch-gen-module": "generated torch (model(**batch).backward())",
    "torch-eager": "torch.nn eager autograd", "jax-jit": "jax.jit(value_and_grad)",
    "numpy-hand": "hand-written numpy", "floor-numpy": "floor: matmuls (numpy)",
    "floor-torch": "floor: matmuls (torch)",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------- environment
def child_env() -> dict[str, str]:
    """The environment every child runs in: one thread per library, no BLAS overrides."""
    env = dict(os.environ)
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # unset together
        env.pop(key, None)
    env.update({
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                      " intra_op_parallelism_threads=1").strip(),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    return env


def pin_prefix(core: int, nice: int = 0) -> tuple[list[str], str]:
    """The command prefix that pins a child to ``core`` (and renices it), and its words."""
    prefix: list[str] = []
    words: list[str] = []
    if nice and shutil.which("nice"):
        prefix += [shutil.which("nice") or "nice", "-n", str(nice)]
        words.append(f"nice -n {nice}")
        if Path("/proc/self/autogroup").exists() and shutil.which("sh"):
            # With autogroup scheduling, niceness only ranks processes of one session
            # against each other; the child runs in a session of its own (see
            # run_child), so give that session's autogroup the same niceness.
            prefix += [shutil.which("sh") or "sh", "-c",
                       f'echo {nice} > /proc/self/autogroup 2>/dev/null; exec "$@"', "sh"]
            words.append("(and its autogroup)")
    taskset = shutil.which("taskset")
    if taskset is None:
        words.append("taskset not found: processes are not pinned to a core (threads are)")
    else:
        prefix += [taskset, "-c", str(core)]
        words.append(f"taskset -c {core}")
    return prefix, " ".join(words)


# --------------------------------------------------------------------- running
def generate_modules(works: list[Workload], out: Path) -> dict[str, float]:
    """Generate numpy and torch modules for each workload; return seconds per spec."""
    import symbackprop

    seconds: dict[str, float] = {}
    for work in works:
        t0 = time.perf_counter()
        symbackprop.generate(work.spec, out, ("numpy", "torch"), force=True)
        seconds[work.name] = time.perf_counter() - t0
    return seconds


def run_child(key: Key, gen_dir: Path, core: int, env: dict[str, str], opts: dict[str, Any],
              memory: bool) -> dict[str, Any]:
    workload, batch, name = key
    prefix, _ = pin_prefix(core, opts["nice"])
    cmd = [*prefix, sys.executable, str(HERE / "contender.py"), name, workload, str(batch),
           "--gen-dir", str(gen_dir), "--seconds", str(opts["seconds"]),
           "--warmup", str(opts["warmup"]), "--min-samples", str(opts["min_samples"])]
    if not memory:
        cmd.append("--no-memory")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                          timeout=600, start_new_session=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"contender": name, "workload": workload, "batch": batch,
                "failed": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def sweep(keys: list[Key], gen_dir: Path, env: dict[str, str], opts: dict[str, Any],
          rounds: int, jobs: int, memory: bool) -> dict[Key, dict[str, Any]]:
    """Run every key ``rounds`` times (rotated order); merge into one result per key."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    free: queue.Queue[int] = queue.Queue()
    for core in cores[:max(1, jobs)]:
        free.put(core)
    per_key: dict[Key, list[dict[str, Any]]] = {k: [] for k in keys}
    total = rounds * len(keys)
    done = 0

    def task(key: Key, with_memory: bool) -> tuple[Key, dict[str, Any]]:
        core = free.get()
        try:
            best: dict[str, Any] = {}
            for attempt in range(1 + opts["retries"]):
                res = run_child(key, gen_dir, core, env, opts, with_memory)
                res["attempts"] = attempt + 1
                if "cpu_share" not in res or res["cpu_share"] >= MIN_CPU_SHARE:
                    return key, res
                if not best or res["cpu_share"] > best["cpu_share"]:
                    best = res
                log(f"  {key}: cpu share {res['cpu_share']:.2f} < {MIN_CPU_SHARE} "
                    "(another process took the core): running it again")
                time.sleep(2.0)
            best["contended"] = True
            return key, best
        finally:
            free.put(core)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for r in range(rounds):
            shift = r
            order = sorted(keys, key=lambda k, s=shift: _order(k, s))
            futures = [pool.submit(task, k, memory and r == 0) for k in order]
            for fut in futures:
                key, res = fut.result()
                per_key[key].append(res)
                done += 1
                log(f"[{done}/{total}] round {r + 1}: {key[0]} batch {key[1]} {key[2]}: "
                    + _brief(res))
    return {k: merge(v) for k, v in per_key.items()}


def _order(key: Key, shift: int) -> tuple[int, int, int]:
    """Workloads in order; contenders rotated by ``shift`` so no one always runs first."""
    names = list(CONTENDERS)
    return (list(WORKLOADS).index(key[0]), key[1], (names.index(key[2]) - shift) % len(names))


def _brief(res: dict[str, Any]) -> str:
    if "failed" in res:
        return "FAILED " + res["failed"].splitlines()[-1] if res["failed"] else "FAILED"
    if "skipped" in res:
        return "skipped: " + res["skipped"]
    return f"{res['median_ms']:.3f} ms"


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from its rounds: the median of the rounds' medians, spread across rounds."""
    ok = [r for r in results if "median_ms" in r]
    if not ok:
        return results[0]
    row = dict(ok[0])
    medians = [r["median_ms"] for r in ok]
    row["median_ms"] = statistics.median(medians)
    row["round_medians_ms"] = medians
    row["q1_ms"] = statistics.median(r["q1_ms"] for r in ok)
    row["q3_ms"] = statistics.median(r["q3_ms"] for r in ok)
    row["contended"] = any(r.get("contended") for r in ok)
    row["reruns"] = sum(r.get("attempts", 1) - 1 for r in ok)
    errs = [r["max_rel_err"] for r in ok if "max_rel_err" in r]
    if errs:
        row["max_rel_err"] = max(errs)
    return row


# --------------------------------------------------------------------- report
def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def ratio(rows: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    ra, rb = rows.get(a, {}), rows.get(b, {})
    if "median_ms" not in ra or "median_ms" not in rb:
        return None
    return ra["median_ms"] / rb["median_ms"]


def mib(value: Any) -> str:
    if value is None:
        return "—"
    if value < 2 ** 20:
        return f"{value / 2 ** 10:.1f} KiB"
    return f"{value / 2 ** 20:.2f} MiB"


def step_tables(results: dict[Key, dict[str, Any]], combos: list[tuple[str, int]],
                names: list[str]) -> list[str]:
    out: list[str] = []
    # Summary: contenders x (workload, batch), milliseconds.
    head = " | ".join(f"{w} N={b}" for w, b in combos)
    out += [f"| median ms | {head} |", "|---|" + "---:|" * len(combos)]
    for name in names:
        cells = []
        for w, b in combos:
            res = results.get((w, b, name), {})
            cells.append(fmt_ms(res.get("median_ms")) if "median_ms" in res
                         else ("skipped" if "skipped" in res else "failed"))
        out.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    out.append("")
    for w, b in combos:
        rows = {name: results.get((w, b, name), {}) for name in names}
        out += [f"### {WORKLOADS[w].note}, batch {b}", "",
                "| contender | median ms | IQR ms | × numpy floor | × jax jit "
                "| × torch eager | peak memory | max rel err |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        notes: list[str] = []
        for name in names:
            res = rows[name]
            if "median_ms" not in res:
                why = res.get("skipped") or res.get("failed", "not run").splitlines()[-1]
                out.append(f"| {LABELS[name]} | — | — | — | — | — | — | — |")
                notes.append(f"{LABELS[name]}: {why}")
                continue
            cells = [fmt_ms(res["median_ms"]),
                     f"{fmt_ms(res['q1_ms'])}–{fmt_ms(res['q3_ms'])}"]
            for base in ("floor-numpy", "jax-jit", "torch-eager"):
                r = ratio(rows, name, base)
                cells.append("—" if r is None else f"{r:.2f}")
            cells.append(mib(res.get("peak_bytes")))
            err = res.get("max_rel_err")
            flag = "" if err is None or err <= REL_ERR_LIMIT else " ✗"
            cells.append("—" if err is None else f"{err:.1e}{flag}")
            out.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        out.append("")
        out += [f"- {n}" for n in notes]
        if notes:
            out.append("")
    return out


def targets(results: dict[Key, dict[str, Any]], gen: dict[str, dict[str, Any]] | None
            ) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each of issue 5's targets that this run measured."""
    rows: list[tuple[str, str, str]] = []

    def row_of(w: str, b: int) -> dict[str, dict[str, Any]]:
        return {name: results.get((w, b, name), {}) for name in CONTENDERS}

    def check(text: str, value: float | None, limit: float, le: bool = True,
              unit: str = "×", why: str = "") -> None:
        if value is None:
            rows.append((text, "not measured", why or "—"))
            return
        ok = value <= limit if le else value >= limit
        rows.append((text, f"{value:.2f}{unit}", "met" if ok else "**missed**"))

    batches = sorted({b for (w, b, _n) in results if w == "mlp784"})
    for b in batches:
        r = row_of("mlp784", b)
        jax_why = r["jax-jit"].get("skipped", "")
        check(f"MLP N={b}: generated numpy ≤ 1.10 × jax jit", ratio(r, "numpy-gen", "jax-jit"),
              1.10, why=jax_why)
    if 2048 in batches:
        r = row_of("mlp784", 2048)
        check("MLP N=2048: generated numpy ≤ 1.15 × matmul floor",
              ratio(r, "numpy-gen", "floor-numpy"), 1.15)
    for b in batches:
        r = row_of("mlp784", b)
        for name in ("torch-gen", "torch-gen-module"):
            check(f"MLP N={b}: {LABELS[name]} ≤ 0.90 × torch eager",
                  ratio(r, name, "torch-eager"), 0.90)
    for b in batches:
        r = row_of("mlp784", b)
        eager = r["torch-eager"].get("peak_bytes")
        for name in ("torch-gen", "torch-gen-module"):
            mine = r[name].get("peak_bytes")
            value = None if not eager or mine is None else mine / eager
            check(f"MLP N={b}: {LABELS[name]} peak memory ≤ torch eager's", value, 1.0,
                  unit=f"× ({mib(mine)} vs {mib(eager)})")
    tiny = sorted({b for (w, b, _n) in results if w == "tiny"})
    for b in tiny:
        r = row_of("tiny", b)
        check(f"tiny N={b}: generated numpy ≥ 5 × faster than torch eager",
              ratio(r, "torch-eager", "numpy-gen"), 5.0, le=False)
    if gen:
        if "mlp" in gen:
            check("MLP generates in ≤ 1.2 s from a cold start", gen["mlp"]["seconds"], 1.2,
                  unit=" s")
        if "w16" in gen and "w4096" in gen:
            check("width 4096 costs ≤ 1.10 × width 16",
                  gen["w4096"]["seconds"] / gen["w16"]["seconds"], 1.10)
        if "d8" in gen and "d32" in gen and "d128" not in gen:
            check("depth 32 costs ≤ 4.5 × depth 8",
                  gen["d32"]["seconds"] / gen["d8"]["seconds"], 4.5)
        if "d32" in gen and "d128" in gen:  # the sweep (issue 9)
            check("depth 128 costs ≤ 4.5 × depth 32",
                  gen["d128"]["seconds"] / gen["d32"]["seconds"], 4.5)
        if "d32" in gen and "d64" in gen:
            sizes = gen["d64"].get("derivations_bytes"), gen["d32"].get("derivations_bytes")
            if all(sizes):
                check("DERIVATIONS at depth 64 ≤ 2.2 × depth 32 (linear in depth)",
                      sizes[0] / sizes[1], 2.2)
        if "acts10" in gen:
            check("ten chained activations generate in < 2 s", gen["acts10"]["seconds"], 2.0,
                  unit=" s")
        if "formula16" in gen:
            check("a 16-term formula generates in < 2 s", gen["formula16"]["seconds"], 2.0,
                  unit=" s")
    return rows


def gen_table(gen: dict[str, dict[str, Any]], reps: int) -> list[str]:
    base = gen["import"]["seconds"]
    out = [f"| spec | cold `symbackprop generate` s (median of {reps}; 1 run if > "
           f"{gencost.SLOW_S:.0f} s) | minus import floor s | ratio |", "|---|---:|---:|---:|"]
    ref = {"w4096": "w16", "d16": "d8", "d32": "d8"} if "d128" not in gen else {
        "d32": "d8", "d64": "d32", "d128": "d32"}
    for key, res in gen.items():
        r = ""
        if key in ref and ref[key] in gen:
            r = f"{res['seconds'] / gen[ref[key]]['seconds']:.2f} × {ref[key]}"
        extra = "—" if key == "import" else f"{res['seconds'] - base:.2f}"
        out.append(f"| {res['label']} | {res['seconds']:.2f} | {extra} | {r} |")
    out += ["", f"Cold means a fresh process; {gencost.PRIMED}."]
    return out


def environment_lines(results: dict[Key, dict[str, Any]], pinning: str, jobs: int,
                      rounds: int, opts: dict[str, Any]) -> list[str]:
    envs = [r["environment"] for r in results.values() if "environment" in r]
    first = envs[0] if envs else {}
    pools: dict[str, Any] = {}
    for env in envs:
        if isinstance(env.get("threadpools"), list):
            for pool in env["threadpools"]:
                pools[f"{pool.get('internal_api')} {pool.get('version')} "
                      f"({pool.get('prefix')})"] = pool
    kernels = "; ".join(f"{name}: kernel {p.get('architecture') or 'n/a'}, "
                        f"{p.get('num_threads')} thread(s)" for name, p in pools.items())
    threads = sorted({str(e.get("torch_threads")) for e in envs if "torch_threads" in e})
    affinity = sorted({str(e.get("affinity")) for e in envs})
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"- code: symbackprop {symbackprop_version()}, repository at "
        f"{opts.get('code') or git_state()}",
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}"
        f", numpy {first.get('numpy', '?')}, torch "
        f"{next((e['torch'] for e in envs if 'torch' in e), 'absent')}, jax "
        f"{next((e['jax'] for e in envs if 'jax' in e), 'absent')}",
        f"- pinning: {pinning}; child CPU affinity {', '.join(affinity)}; "
        f"torch threads {', '.join(threads) or '—'}; OPENBLAS/OMP/MKL_NUM_THREADS=1; "
        "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset in children",
        f"- BLAS (threadpoolctl, in the children): {kernels or 'threadpoolctl not installed'}",
        f"- timing: {opts['warmup']} s warm-up, then ≥ {opts['min_samples']} samples over "
        f"~{opts['seconds']} s, median; {rounds} round(s) in rotated order, median of the "
        "rounds' medians; IQR = the samples' quartiles",
        "- peak memory: bytes newly allocated during one step (gradients included) above what "
        "was live before it — torch: torch.profiler allocator events; numpy: tracemalloc; "
        "jax: XLA memory_analysis (temporaries + outputs)",
    ]
    reruns = sum(r.get("reruns", 0) for r in results.values())
    contended = [f"{k[0]} N={k[1]} {k[2]}" for k, r in results.items() if r.get("contended")]
    lines.append(
        f"- interference: a child whose CPU time fell under {MIN_CPU_SHARE:.0%} of its wall "
        f"time (another process took the core) was run again, up to {opts['retries']} times: "
        f"{reruns} re-run(s); still contended after that: {', '.join(contended) or 'none'}; "
        f"load average at start / end: {opts.get('load_start', '?')} / "
        f"{opts.get('load_end', '?')}")
    if jobs > 1:
        lines.append(f"- **{jobs} children ran at once on different cores: times are rough**")
    return lines


def git_state() -> str:
    """The commit the generated code came from, and whether the tree had local changes."""
    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always",
                              "--dirty=-dirty (uncommitted changes)"],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def symbackprop_version() -> str:
    try:
        import symbackprop

        return symbackprop.__version__
    except ImportError:
        return "not importable"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def chart(results: dict[Key, dict[str, Any]], combos: list[tuple[str, int]],
          names: list[str], gen: dict[str, dict[str, Any]] | None, path: Path) -> str | None:
    """Bar chart of step times per workload (+ generation cost); None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (`pip install -e .[bench]`): no chart"
    panels = len(combos) + (1 if gen else 0)
    cols = min(3, panels)
    nrows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 3.6 * nrows), squeeze=False)
    colors = {"numpy-gen": "#1f77b4", "torch-gen": "#d62728", "torch-gen-module": "#ff7f0e",
              "torch-eager": "#7f7f7f", "jax-jit": "#2ca02c", "numpy-hand": "#9467bd",
              "floor-numpy": "#c7c7c7", "floor-torch": "#dbdbdb"}
    flat = [ax for row in axes for ax in row]
    for ax, (w, b) in zip(flat, combos, strict=False):
        shown = [n for n in names if "median_ms" in results.get((w, b, n), {})]
        values = [results[(w, b, n)]["median_ms"] for n in shown]
        floor = results.get((w, b, "floor-numpy"), {}).get("median_ms")
        ypos = list(range(len(shown)))[::-1]
        ax.barh(ypos, values, color=[colors[n] for n in shown])
        ax.set_yticks(ypos, [LABELS[n] for n in shown], fontsize=7)
        for y, v in zip(ypos, values, strict=True):
            text = f" {fmt_ms(v)} ms" + (f" ({v / floor:.2f}× floor)" if floor else "")
            ax.text(v, y, text, va="center", fontsize=6.5)
        ax.set_xlim(0, max(values) * 1.55 if values else 1)
        ax.set_title(f"{w}, batch {b}: one training step (ms, 1 core)", fontsize=8.5)
        ax.tick_params(axis="x", labelsize=7)
    if gen:
        ax = flat[len(combos)]
        keys = [k for k in gen if k != "import"]
        vals = [gen[k]["seconds"] for k in keys]
        ypos = list(range(len(keys)))[::-1]
        ax.barh(ypos, vals, color="#17becf")
        ax.axvline(gen["import"]["seconds"], color="k", ls="--", lw=0.8)
        ax.set_yticks(ypos, keys, fontsize=7)
        for y, v in zip(ypos, vals, strict=True):
            ax.text(v, y, f" {v:.2f} s", va="center", fontsize=6.5)
        ax.set_xlim(0, max(vals) * 1.3)
        ax.set_title("cold `symbackprop generate` (s); dashed: import alone", fontsize=8.5)
        ax.tick_params(axis="x", labelsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short timings, one round, one cold generation (rough numbers)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from {', '.join(WORKLOADS)}")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes for mlp784 (default 16,256,2048)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma-separated, from {', '.join(CONTENDERS)}")
    p.add_argument("--rounds", type=int, default=None, help="sweeps (default 3; quick 1)")
    p.add_argument("--seconds", type=float, default=None,
                   help="sampling seconds per child (default 2; quick 0.2)")
    p.add_argument("--gen", choices=("all", "sweep", "mlp", "none"), default=None,
                   help="generation-cost cases (default all; quick mlp)")
    p.add_argument("--gen-reps", type=int, default=None,
                   help="cold runs per generation case (default 3; quick 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="children at once, each on its own core (default 1: honest timing)")
    p.add_argument("--nice", type=int, default=0,
                   help="run children at this niceness, e.g. -20 (needs root) on a machine "
                        "that other jobs share (default 0)")
    p.add_argument("--retries", type=int, default=None,
                   help="re-runs of a child another process took the core from "
                        "(default 3; quick 0)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="folder for results.md, results.json, chart.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    opts = {"seconds": args.seconds if args.seconds is not None else (0.2 if quick else 2.0),
            "warmup": 0.1 if quick else 0.5, "min_samples": 5 if quick else 15,
            "nice": args.nice,
            "retries": args.retries if args.retries is not None else (0 if quick else 3)}
    rounds = args.rounds or (1 if quick else 3)
    gen_which = args.gen or ("mlp" if quick else "all")
    gen_reps = args.gen_reps or (1 if quick else 3)
    work_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for bad in [w for w in work_names if w not in WORKLOADS]:
        raise SystemExit(f"unknown workload {bad!r}; choose from {', '.join(WORKLOADS)}")
    for bad in [n for n in names if n not in CONTENDERS]:
        raise SystemExit(f"unknown contender {bad!r}; choose from {', '.join(CONTENDERS)}")
    names = [n for n in CONTENDERS if n in names]
    works = [WORKLOADS[w] for w in WORKLOADS if w in work_names]
    combos: list[tuple[str, int]] = []
    for work in works:
        batches = work.batches
        if args.batches and work.name == "mlp784":
            batches = tuple(int(b) for b in args.batches.split(","))
        combos += [(work.name, b) for b in batches]

    env = child_env()
    _, pinning = pin_prefix(0, args.nice)
    if args.jobs > 1:
        pinning = pinning.replace("taskset -c 0", f"taskset -c <one core per job> ({args.jobs} "
                                                  "jobs)")
    started = time.time()
    opts["load_start"] = loadavg()
    with tempfile.TemporaryDirectory(prefix="symbackprop-bench-") as tmp:
        gen_dir = Path(tmp)
        log(f"generating {', '.join(w.name for w in works)} into {gen_dir}")
        opts["code"] = git_state()  # the tree the timed modules come from, not the one at the end
        generate_modules(works, gen_dir)
        keys = [(w, b, n) for w, b in combos for n in names]
        results = sweep(keys, gen_dir, env, opts, rounds, args.jobs, not args.no_memory)
    gen: dict[str, dict[str, Any]] | None = None
    if gen_which != "none":
        log(f"timing cold generation ({gen_which}, {gen_reps} run(s) each)")
        prefix, _ = pin_prefix(0, args.nice)
        gen = gencost.measure(gen_which, gen_reps, prefix, env, log)

    opts["load_end"] = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# symbackprop benchmark results", "",
             f"Written by `python benchmarks/run.py{' --quick' if quick else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} "
             f"({(time.time() - started) / 60:.1f} min). One training step = forward, loss "
             "and the gradient of every parameter, float32.", ""]
    lines += environment_lines(results, pinning, args.jobs, rounds, opts) + [""]
    lines += ["## Step time", ""] + step_tables(results, combos, names)
    rows = targets(results, gen)
    if rows:
        lines += ["## Targets (issue 5)", "", "| target | measured | verdict |",
                  "|---|---:|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in rows] + [""]
    if gen:
        lines += ["## Generation cost", ""] + gen_table(gen, gen_reps) + [""]
    bad = [k for k, r in results.items()
           if "failed" in r or (r.get("max_rel_err") or 0.0) > REL_ERR_LIMIT]
    note = chart(results, combos, names, gen, args.out / "chart.png")
    lines += ["![step times](chart.png)" if note is None else f"_{note}_", ""]
    if bad:
        lines += ["## Problems", ""] + [
            f"- {w} N={b} {n}: {results[(w, b, n)].get('failed') or 'max rel err '}"
            f"{results[(w, b, n)].get('max_rel_err', '')}" for w, b, n in bad] + [""]
    text = "\n".join(lines)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(
        {"results": [r for r in results.values()], "generation": gen, "options": opts,
         "rounds": rounds, "pinning": pinning, "jobs": args.jobs, "quick": quick,
         "gen_reps": gen_reps, "started": started, "minutes": (time.time() - started) / 60,
         "combos": combos, "contenders": names}, indent=1, default=str), encoding="utf-8")
    print(text)
    log(f"wrote {args.out / 'results.md'}, results.json"
        + (", chart.png" if note is None else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
