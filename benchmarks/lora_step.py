"""One training step with LoRA against the same step with full fine-tuning.

The network: a dense stack 256 -> 256 -> 256 (relu, then linear) with mean squared error,
batch N = 64, float32. "full" trains every weight and bias; "lora" puts
``lora: {rank: 4, alpha: 8}`` on both layers (base weights and biases frozen). Each
contender (numpy ``loss_and_grad``, torch ``loss_and_grad``, torch ``Model`` +
``backward``) runs in its own process pinned to one core (one BLAS thread,
``torch.set_num_threads(1)``, OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed); each row is
the median of timed samples after a warm-up, over several rounds in alternating order
(the median round is shown), and the ratio full / lora is printed per backend.

    PYTHONPATH=src python benchmarks/lora_step.py [--batch 64] [--rounds 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPEC = """name: {name}
inputs: {{x: [N, 256]}}
targets: {{t: [N, 256]}}
layers:
  - {{name: fc1, type: dense, units: 256, activation: relu{lora}}}
  - {{name: fc2, type: dense, units: 256{lora}}}
loss: {{type: mse, target: t}}
"""
LORA = ", lora: {rank: 4, alpha: 8}"
BATCH = 64
CONTENDERS = ("numpy", "torch", "torch-model")


def _generate(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from symbackprop.api import compile_spec
    from symbackprop.emit.render import module_filename

    for name, lora in (("full", ""), ("lora", LORA)):
        spec = folder / f"{name}.yaml"
        spec.write_text(SPEC.format(name=name, lora=lora), encoding="utf-8")
        model = compile_spec(spec)
        for backend in ("numpy", "torch"):
            out = folder / module_filename(name, backend)
            out.write_text(model.source(backend), encoding="utf-8")


def _child(folder: str, variant: str, contender: str, seconds: float, batch: int) -> None:
    """Time one contender in this (pinned) process; print one JSON line."""
    import gc
    import importlib.util

    import numpy as np

    backend = "numpy" if contender == "numpy" else "torch"
    path = Path(folder) / f"{variant}_{backend}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{variant}_{backend}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 256)).astype(np.float32)
    t = rng.normal(size=(batch, 256)).astype(np.float32)
    if backend == "numpy":
        # Random values for every parameter (B = 0 at init). Not through init_params:
        # its large temporaries move glibc's malloc thresholds, and the numpy LoRA step
        # then ran up to ~1.4x slower at N = 512 in our runs (an allocator effect the
        # two variants do not share; try it with --init).
        if "--init" in sys.argv:
            module.init_params(0, dtype=np.float32)
        params = {name: rng.normal(scale=0.05, size=shape).astype(np.float32)
                  for name, shape in module.PARAM_SHAPES.items()}

        def step() -> None:
            module.loss_and_grad(params, x=x, t=t)
    else:
        import torch

        torch.set_num_threads(1)
        tx, tt = torch.from_numpy(x), torch.from_numpy(t)
        if contender == "torch":
            tparams = module.init_params(0, dtype=torch.float32)

            def step() -> None:
                module.loss_and_grad(tparams, x=tx, t=tt)
        else:
            net = module.Model(dtype=torch.float32)
            trainable = [p for p in net.parameters() if p.requires_grad]

            def step() -> None:
                for p in trainable:
                    p.grad = None
                net(x=tx, t=tt).backward()
    for _ in range(20):
        step()
    # samples of at least 2 ms of back-to-back steps, gc off
    start = time.perf_counter()
    step()
    one = time.perf_counter() - start
    reps = max(1, int(0.002 / max(one, 1e-7)))
    samples = []
    gc.disable()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 15:
        begin = time.perf_counter()
        for _ in range(reps):
            step()
        samples.append((time.perf_counter() - begin) / reps)
    gc.enable()
    samples.sort()
    print(json.dumps({"variant": variant, "contender": contender,
                      "median_ms": 1e3 * samples[len(samples) // 2],
                      "q1_ms": 1e3 * samples[len(samples) // 4],
                      "q3_ms": 1e3 * samples[3 * len(samples) // 4],
                      "samples": len(samples)}))


def _pinned_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(key, None)
    env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT / "src")})
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per child")
    parser.add_argument("--batch", type=int, default=BATCH, help="N (default 64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, the two variants' order alternating")
    parser.add_argument("--init", action="store_true",
                        help="call the numpy module's init_params before timing")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "VARIANT", "CONTENDER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, seconds=args.seconds, batch=args.batch)
        return
    taskset = shutil.which("taskset")
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as folder:
        _generate(Path(folder))
        for round_ in range(args.rounds):
            for contender in CONTENDERS:
                order = ("full", "lora") if round_ % 2 == 0 else ("lora", "full")
                for variant in order:
                    command = [sys.executable, __file__, "--seconds", str(args.seconds),
                               "--batch", str(args.batch), *(["--init"] if args.init else []),
                               "--child", folder, variant, contender]
                    if taskset:
                        command = [taskset, "-c", "0", *command]
                    proc = subprocess.run(command, capture_output=True, text=True,
                                          env=_pinned_env(), check=True)
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs.setdefault((variant, contender), []).append(row)
    # each row: the round whose median is the median of the rounds' medians
    rows = {key: sorted(found, key=lambda r: r["median_ms"])[len(found) // 2]
            for key, found in runs.items()}
    print(f"One float32 training step, dense 256-256-256, N = {args.batch}, LoRA rank 4 on both "
          f"layers; median of {args.rounds} rounds' medians, one core"
          f"{'' if taskset else ' (no taskset)'}\n")
    print("| contender | full fine-tuning (ms) | LoRA (ms) | full / LoRA |")
    print("|---|---|---|---|")
    for contender in CONTENDERS:
        full, lora = rows["full", contender], rows["lora", contender]
        print(f"| {contender} | {full['median_ms']:.3f} (IQR {full['q1_ms']:.3f}-"
              f"{full['q3_ms']:.3f}) | {lora['median_ms']:.3f} (IQR {lora['q1_ms']:.3f}-"
              f"{lora['q3_ms']:.3f}) | {full['median_ms'] / lora['median_ms']:.2f}x |")


if __name__ == "__main__":
    main()
