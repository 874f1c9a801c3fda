"""Where the generated step spends its time: statement-level timing, and generation's profile.

    python benchmarks/profile_generated.py                      # mlp784 at batch 16 and 2048
    python benchmarks/profile_generated.py --batches 256 --backends numpy
    python benchmarks/profile_generated.py --generation         # cProfile of generate

Step profile: the generated ``loss_and_grad`` (and, for torch, ``_loss_forward``
and ``_loss_backward``, which ``model(**batch).backward()`` runs) is re-compiled with a
``perf_counter`` pair around every statement, run many times, and each statement's
median is printed next to the step's matrix-product floor — so the gap to the floor is
split into named statements. The clock pair costs ~0.1 µs a statement; the uninstrumented
step time is printed too. The process pins itself like the harness's children
(``taskset -c 0``, one thread per library, OPENBLAS_CORETYPE/L2_SIZE unset; niceness
from ``SYMBACKPROP_BENCH_NICE``, e.g. -20 on a shared machine) by re-executing itself once.

Generation profile (``--generation``): ``cProfile`` of ``symbackprop.generate`` on a spec,
in a fresh process, top functions by cumulative time, plus the import time.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reference  # noqa: E402
from workloads import WORKLOADS, Workload, make_batch, make_params  # noqa: E402

PINNED_MARK = "SYMBACKPROP_BENCH_PINNED"
TARGETS = {"numpy": ("loss_and_grad",),
           "torch": ("loss_and_grad", "_loss_forward", "_loss_backward")}


def _repin() -> None:
    """Re-execute this script pinned like the harness's children (once)."""
    if os.environ.get(PINNED_MARK):
        return
    from run import child_env, pin_prefix

    env = child_env()
    env[PINNED_MARK] = "1"
    nice = int(os.environ.get("SYMBACKPROP_BENCH_NICE", "0"))
    prefix, _ = pin_prefix(0, nice)
    if nice:
        try:
            os.setsid()  # a session (so an autogroup) of its own, as run.py's children
        except OSError:
            pass
    os.execvpe((prefix or [sys.executable])[0],
               [*prefix, sys.executable, *sys.argv], env)


class _Instrument(ast.NodeTransformer):
    """Wrap every simple statement of the target functions in a perf_counter pair."""

    def __init__(self, targets: tuple[str, ...], source: str) -> None:
        self.targets = targets
        self.source = source
        self.stack: list[str] = []
        self.statements: list[tuple[str, int, str]] = []  # (function, line, text)

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:  # noqa: N802
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:  # noqa: N802
        qual = ".".join([*self.stack, node.name])
        if qual in self.targets:
            node.body = self._wrap(node.body, qual)
        return node

    def _wrap(self, body: list[ast.stmt], qual: str) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            if isinstance(stmt, ast.With):
                stmt.body = self._wrap(stmt.body, qual)
                out.append(stmt)
                continue
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                out.append(stmt)  # docstring
                continue
            index = len(self.statements)
            text = " ".join((ast.get_source_segment(self.source, stmt) or "").split())
            self.statements.append((qual, stmt.lineno, text))
            if isinstance(stmt, ast.Return):
                value = stmt.value or ast.Constant(None)
                pre = ast.parse("_sbp_t = _sbp_pc()").body
                assign = ast.Assign(targets=[ast.Name("_sbp_ret", ast.Store())], value=value)
                post = ast.parse(f"_sbp_acc[{index}].append(_sbp_pc() - _sbp_t)\n"
                                 "return _sbp_ret").body
                out += [*pre, assign, *post]
                continue
            out += [*ast.parse("_sbp_t = _sbp_pc()").body, stmt,
                    *ast.parse(f"_sbp_acc[{index}].append(_sbp_pc() - _sbp_t)").body]
        return out


def instrument(path: Path, backend: str) -> tuple[types.ModuleType, list[tuple[str, int, str]],
                                                  list[list[float]]]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    tool = _Instrument(TARGETS[backend], source)
    tree = ast.fix_missing_locations(tool.visit(tree))
    acc: list[list[float]] = [[] for _ in tool.statements]
    module = types.ModuleType(path.stem + "_instrumented")
    module.__dict__.update({"_sbp_pc": time.perf_counter, "_sbp_acc": acc})
    exec(compile(tree, str(path), "exec"), module.__dict__)  # noqa: S102 - our own output
    return module, tool.statements, acc


def kind_of(text: str) -> str:
    if "_linear(" in text or "addmm(" in text:
        return "matmul + bias"
    if "@" in text or "_matmul_nt(" in text:
        return "matmul" + (" + bias" if ") +" in text else "")
    if text.startswith(("return", "grads", "_expect", "N =", "del ")) or "params[" in text:
        return "overhead"
    if ".sum(" in text or "sum(" in text or "logsumexp" in text or "log_softmax" in text:
        return "reduction"
    return "elementwise"


def median_ms(step: Any, seconds: float = 1.5) -> float:
    for _ in range(5):
        step()
    t0 = time.perf_counter()
    step()
    one = max(time.perf_counter() - t0, 1e-7)
    samples = []
    for _ in range(max(20, min(3000, int(seconds / one)))):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def profile_step(work: Workload, batch: int, backend: str, gen_dir: Path,
                 seconds: float) -> list[str]:
    params = make_params(work)
    x, target = make_batch(work, batch)
    path = gen_dir / f"{work.name}_{backend}.py"
    module, statements, acc = instrument(path, backend)
    from contender import load_module

    plain = load_module(path)
    kwargs: dict[str, Any] = {"x": x, work.target: target}
    floor = reference.numpy_floor(work, batch)
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        kwargs = {k: torch.from_numpy(v) for k, v in kwargs.items()}
        tparams = {k: torch.from_numpy(v) for k, v in params.items()}
        floor = reference.torch_floor(work, batch)
        models = []
        for mod in (module, plain):
            model = mod.Model(dtype=torch.float32)
            model.load_state_dict(tparams)
            models.append(model)

        def runner(mod: Any, model: Any) -> Any:
            def step() -> Any:
                for p in model.parameters():
                    p.grad = None
                mod.loss_and_grad(tparams, **kwargs)
                model.loss(**kwargs).backward()
            return step

        step_i, step_p = runner(module, models[0]), runner(plain, models[1])

        def lag() -> Any:
            return plain.loss_and_grad(tparams, **kwargs)

        def fwd_bwd() -> Any:
            for p in models[1].parameters():
                p.grad = None
            models[1].loss(**kwargs).backward()

        plain_times = {"loss_and_grad": median_ms(lag, seconds),
                       "Model.loss().backward()": median_ms(fwd_bwd, seconds)}
    else:
        def step_i() -> Any:
            return module.loss_and_grad(params, **kwargs)

        def step_p() -> Any:
            return plain.loss_and_grad(params, **kwargs)

        plain_times = {"loss_and_grad": median_ms(step_p, seconds)}
    del step_p
    floor_ms = median_ms(floor, seconds)
    median_ms(step_i, seconds)  # fills acc: warm-up + samples
    for series in acc:
        del series[:5]  # drop the warm-up calls
    med = [statistics.median(s) * 1e3 if s else 0.0 for s in acc]
    lines = [f"### {backend}, {work.name}, batch {batch}", "",
             "Uninstrumented: " + ", ".join(f"`{k}` {v:.3f} ms" for k, v in plain_times.items())
             + f"; matmul floor ({backend}) {floor_ms:.3f} ms.", ""]
    for qual in TARGETS[backend]:
        rows = [(i, s) for i, s in enumerate(statements) if s[0] == qual]
        total = sum(med[i] for i, _ in rows)
        by_kind: dict[str, float] = {}
        for i, (_, _, text) in rows:
            by_kind[kind_of(text)] = by_kind.get(kind_of(text), 0.0) + med[i]
        lines += [f"`{qual}`: sum of statement medians {total:.3f} ms — "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in
                              sorted(by_kind.items(), key=lambda kv: -kv[1])), "",
                  "| line | statement | kind | median µs | share |", "|---:|---|---|---:|---:|"]
        for i, (_, line, text) in sorted(rows, key=lambda r: -med[r[0]]):
            if med[i] * 1e3 < 1.0 and total > 0.2:
                continue  # sub-microsecond statements of a large step: noise
            short = text if len(text) <= 70 else text[:67] + "..."
            lines.append(f"| {line} | `{short.replace('|', '/')}` | {kind_of(text)} "
                         f"| {med[i] * 1e3:.1f} | {med[i] / total:.0%} |")
        lines.append("")
    return lines


def profile_generation(spec: Path, top: int) -> list[str]:
    """cProfile of generate() in a fresh process, plus the cost of importing."""
    code = (
        "import cProfile, pstats, io, sys, time, tempfile\n"
        "t0 = time.perf_counter()\nimport symbackprop\n"
        "t1 = time.perf_counter()\n"
        "out = tempfile.mkdtemp()\n"
        "prof = cProfile.Profile()\nprof.enable()\n"
        f"symbackprop.generate({str(spec)!r}, out, force=True)\n"
        "prof.disable()\nt2 = time.perf_counter()\n"
        "s = io.StringIO()\n"
        f"pstats.Stats(prof, stream=s).sort_stats('cumulative').print_stats({top})\n"
        "print(f'import {t1 - t0:.3f} s; generate (under cProfile) {t2 - t1:.3f} s')\n"
        "print(s.getvalue())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return [f"### generation profile: {spec.name}", "", "```", proc.stdout.strip(), "```", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="mlp784", choices=list(WORKLOADS))
    parser.add_argument("--batches", default=None, help="default: 16,2048 (tiny: 1)")
    parser.add_argument("--backends", default="numpy,torch")
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--generation", action="store_true",
                        help="profile `symbackprop generate` instead of the step")
    parser.add_argument("--spec", type=Path, default=None, help="spec for --generation")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    _repin()

    work = WORKLOADS[args.workload]
    lines: list[str] = []
    if args.generation:
        lines += profile_generation(args.spec or work.spec, args.top)
    else:
        import symbackprop

        batches = ([int(b) for b in args.batches.split(",")] if args.batches
                   else ([16, 2048] if work.name == "mlp784" else list(work.batches)))
        with tempfile.TemporaryDirectory(prefix="symbackprop-profile-") as tmp:
            gen_dir = Path(tmp)
            symbackprop.generate(work.spec, gen_dir, force=True)
            for backend in args.backends.split(","):
                for batch in batches:
                    lines += profile_step(work, batch, backend, gen_dir, args.seconds)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
