"""One contender on one workload at one batch size, timed in this process.

    python benchmarks/contender.py NAME WORKLOAD BATCH --gen-dir DIR [--seconds S]

``run.py`` starts one of these per row, pinned to one core with one thread per library;
run by hand it measures whatever pinning its caller set up. It prints one JSON line:
the median and quartiles of the step time in milliseconds, the step's peak memory, its
error against a float64 reference, and what ran (BLAS kernel, threads, CPU affinity).

Timing: warm-up first (JAX compiles before it), then ``time.perf_counter`` samples with
the garbage collector off; each sample runs enough back-to-back steps to last at least
half a millisecond (so the clock's own cost never shows) and the median of the samples
is reported. ``cpu_share`` is the process's CPU time over the wall time of the sampling:
well below 1 means another process took the core for a while (``run.py`` then re-runs
the child).

Peak memory, per kind of contender (each counts memory newly allocated during one step,
gradients included, above what was live before it):
- numpy: ``tracemalloc`` (numpy reports every array buffer to it);
- torch: ``torch.profiler`` with ``profile_memory=True``: the running sum of its
  allocator events (bytes allocated minus bytes freed) over one step, at its highest;
- jax: XLA's own ``compiled.memory_analysis()``: temporaries plus outputs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference  # noqa: E402
from workloads import WORKLOADS, Workload, make_batch, make_params  # noqa: E402

# name -> (what it is, framework)
CONTENDERS: dict[str, tuple[str, str]] = {
    "numpy-gen": ("generated numpy `loss_and_grad`", "numpy"),
    "torch-gen": ("generated torch `loss_and_grad`", "torch"),
    "torch-gen-module": ("generated torch `model(**batch).backward()`", "torch"),
    "torch-eager": ("`torch.nn` + eager autograd", "torch"),
    "jax-jit": ("`jax.jit(jax.value_and_grad(...))`", "jax"),
    "numpy-hand": ("hand-written numpy backprop", "numpy"),
    "floor-numpy": ("matrix products alone (numpy)", "numpy"),
    "floor-torch": ("matrix products alone (torch)", "torch"),
}

MIN_SAMPLE_S = 5e-4


class Skip(Exception):
    """The contender cannot run here (an optional framework is absent)."""


def load_module(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def build(name: str, work: Workload, batch: int, gen_dir: Path
          ) -> tuple[Callable[[], Any], Callable[[Any], tuple[float, dict[str, np.ndarray]]]
                     | None, Any]:
    """Return (step, unpack-result-or-None-for-floors, extra) for one contender."""
    params = make_params(work)
    x, target = make_batch(work, batch)
    tkw = work.target

    def plain(result: Any) -> tuple[float, dict[str, np.ndarray]]:
        loss, grads = result
        return float(_to_numpy(loss)), {k: _to_numpy(v) for k, v in grads.items()}

    if name == "numpy-gen":
        mod = load_module(gen_dir / f"{work.name}_numpy.py")
        kwargs = {"x": x, tkw: target}
        return (lambda: mod.loss_and_grad(params, **kwargs)), plain, None
    if name == "numpy-hand":
        return reference.numpy_hand(work, params, x, target), plain, None
    if name == "floor-numpy":
        return reference.numpy_floor(work, batch), None, None
    if name == "jax-jit":
        try:
            step, extra = reference.jax_jit(work, params, x, target)
        except ImportError as exc:
            raise Skip(f"jax is not installed ({exc.name}); `pip install -e .[bench]`") from exc
        return step, plain, extra

    import torch

    if name == "floor-torch":
        return reference.torch_floor(work, batch), None, None
    if name == "torch-eager":
        return reference.torch_eager(work, params, x, target), plain, None
    tmod = load_module(gen_dir / f"{work.name}_torch.py")
    tkwargs = {"x": torch.from_numpy(x), tkw: torch.from_numpy(target)}
    if name == "torch-gen":
        tparams = {k: torch.from_numpy(v) for k, v in params.items()}
        return (lambda: tmod.loss_and_grad(tparams, **tkwargs)), plain, None
    if name == "torch-gen-module":
        model = tmod.Model(dtype=torch.float32)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        named = list(model.named_parameters())

        def step() -> tuple[Any, dict[str, Any]]:
            for _, p in named:
                p.grad = None
            loss = model(**tkwargs)
            loss.backward()
            return loss, {k: p.grad for k, p in named}

        return step, plain, None
    raise SystemExit(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")


def backward_step(parameters: Any, loss: Callable[[], Any]) -> Callable[[], Any]:
    """One torch training step for timing: the parameters' gradients cleared (as
    ``zero_grad(set_to_none=True)``), the loss computed and ``backward()`` run."""
    named = list(parameters)

    def step() -> Any:
        for p in named:
            p.grad = None
        out = loss()
        out.backward()
        return out

    return step


def time_step(step: Callable[[], Any], seconds: float, warmup: float, min_samples: int
              ) -> dict[str, Any]:
    """Warm up, then the median of many ``perf_counter`` samples (gc off while timing)."""
    t_end = time.perf_counter() + warmup
    calls = 0
    while calls < 3 or time.perf_counter() < t_end:
        step()
        calls += 1
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    estimate = max((time.perf_counter() - t0) / 3, 1e-7)
    inner = max(1, math.ceil(MIN_SAMPLE_S / estimate))
    count = max(min_samples, min(5000, round(seconds / (estimate * inner))))
    samples: list[float] = []
    gc.collect()
    gc.disable()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            samples.append((time.perf_counter() - t0) / inner)
    finally:
        gc.enable()
    cpu_share = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    q1, med, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {"median_ms": statistics.median(samples) * 1e3, "q1_ms": q1 * 1e3,
            "q3_ms": q3 * 1e3, "min_ms": min(samples) * 1e3, "samples": len(samples),
            "calls_per_sample": inner, "warmup_calls": calls, "cpu_share": cpu_share}


def peak_memory(name: str, step: Callable[[], Any], extra: Any) -> dict[str, Any]:
    """Peak bytes allocated during one step above what was live before it."""
    framework = CONTENDERS[name][1]
    gc.collect()
    if framework == "numpy":
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            result = step()
            peak = tracemalloc.get_traced_memory()[1] - before
            del result
        finally:
            tracemalloc.stop()
        return {"peak_bytes": peak, "memory_method": "tracemalloc"}
    if framework == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
            del result
        with tempfile.TemporaryDirectory() as tmp:
            trace_path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace_path))
            trace = json.loads(trace_path.read_text())
        events = sorted((e for e in trace["traceEvents"] if e.get("name") == "[memory]"),
                        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
        live = peak = 0
        for event in events:
            live += int(event["args"]["Bytes"])
            peak = max(peak, live)
        return {"peak_bytes": peak, "memory_method": "torch.profiler allocator events"}
    fn, *args = extra
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        return {"peak_bytes": None, "memory_method": "unavailable"}
    peak = int(analysis.temp_size_in_bytes) + int(analysis.output_size_in_bytes)
    return {"peak_bytes": peak, "memory_method": "XLA memory_analysis (temp + outputs)"}


def accuracy(work: Workload, batch: int, result: Any,
             unpack: Callable[[Any], tuple[float, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """Largest relative error of loss and gradients against a float64 hand computation."""
    params = {k: v.astype(np.float64) for k, v in make_params(work).items()}
    x, target = make_batch(work, batch)
    ref_loss, ref_grads = reference.numpy_hand(work, params, x.astype(np.float64),
                                               target.astype(np.float64))()
    loss, grads = unpack(result)
    if set(grads) != set(ref_grads):
        return {"max_rel_err": math.inf, "loss": loss,
                "error": f"gradient names {sorted(grads)} != {sorted(ref_grads)}"}
    errs = [abs(loss - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)]
    for key, ref in ref_grads.items():
        errs.append(float(np.linalg.norm(grads[key] - ref) / max(np.linalg.norm(ref), 1e-30)))
    return {"max_rel_err": max(errs), "loss": loss}


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "numpy": np.__version__,
        "env": {k: os.environ.get(k) for k in (
            "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }
    try:
        info["autogroup"] = Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        pass
    info["niceness"] = os.getpriority(os.PRIO_PROCESS, 0)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if "jax" in sys.modules:
        info["jax"] = sys.modules["jax"].__version__
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "prefix", "version", "architecture",
                                   "num_threads")} for p in threadpool_info()]
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=list(CONTENDERS))
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("batch", type=int)
    parser.add_argument("--gen-dir", type=Path, required=True,
                        help="folder holding <workload>_numpy.py and <workload>_torch.py")
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent sampling")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up")
    parser.add_argument("--min-samples", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    args = parser.parse_args(argv)

    work = WORKLOADS[args.workload]
    out: dict[str, Any] = {"contender": args.name, "workload": args.workload,
                           "batch": args.batch}
    if CONTENDERS[args.name][1] == "torch":
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    try:
        step, unpack, extra = build(args.name, work, args.batch, args.gen_dir)
    except Skip as exc:
        out["skipped"] = str(exc)
        print(json.dumps(out))
        return 0
    result = step()  # first call: JAX compiles here
    if unpack is not None:
        out.update(accuracy(work, args.batch, result, unpack))
    del result
    out.update(time_step(step, args.seconds, args.warmup, args.min_samples))
    if not args.no_memory:
        out.update(peak_memory(args.name, step, extra))
    out["environment"] = environment()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
