"""A ``torch.compile``d training step: the generated Model against ``torch.nn.Sequential``.

Both are compiled with the default backend (inductor) and timed on the same step as the
harness (forward, loss, ``backward()``, float32), each contender and batch in its own
process pinned like ``run.py``'s children. Compiling takes tens of seconds a child, so
this is a script of its own, never part of ``run.py``'s default sweep or of the tests.

    python benchmarks/compiled_step.py [--batches 256,2048] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reference  # noqa: E402
from contender import load_module, time_step  # noqa: E402
from workloads import WORKLOADS, make_batch, make_params  # noqa: E402

CONTENDERS = {"gen-compiled": "torch.compile(generated Model)",
              "nn-compiled": "torch.compile(torch.nn.Sequential + F.cross_entropy)"}


def child(name: str, batch: int, gen_dir: Path, seconds: float) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    work = WORKLOADS["mlp784"]
    params = make_params(work)
    x, target = make_batch(work, batch)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)
    if name == "gen-compiled":
        mod = load_module(gen_dir / "mlp784_torch.py")
        model = mod.Model(dtype=torch.float32)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        compiled = torch.compile(model, fullgraph=True)

        def loss() -> Any:
            return compiled(x=xt, **{work.target: tt})
    else:
        model = reference.torch_module(work, params)
        compiled = torch.compile(lambda a, b: F.cross_entropy(model(a), b), fullgraph=True)

        def loss() -> Any:
            return compiled(xt, tt)
    named = list(model.named_parameters())

    def step() -> Any:
        for _, p in named:
            p.grad = None
        out = loss()
        out.backward()
        return out

    step()  # compiles
    out = time_step(step, seconds, 1.0, 15)
    out.update({"contender": name, "batch": batch})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="256,2048")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--child", nargs=3, metavar=("NAME", "BATCH", "GEN_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, batch, gen_dir = args.child
        print(json.dumps(child(name, int(batch), Path(gen_dir), args.seconds)))
        return 0
    from run import child_env, generate_modules, pin_prefix

    prefix, pinning = pin_prefix(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="symbackprop-compiled-") as tmp:
        generate_modules([WORKLOADS["mlp784"]], Path(tmp))
        for batch in (int(b) for b in args.batches.split(",")):
            for name in CONTENDERS:
                cmd = [*prefix, sys.executable, __file__, "--seconds", str(args.seconds),
                       "--child", name, str(batch), tmp]
                done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True,
                                      check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"pinning: {pinning}; median of >= 15 samples after compiling\n")
    print("| batch | contender | median ms | IQR ms | cpu share |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {CONTENDERS[r['contender']]} | {r['median_ms']:.3f} | "
              f"{r['q1_ms']:.3f}–{r['q3_ms']:.3f} | {r['cpu_share']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
