"""One training step of ``examples/cnn.yaml``: generated modules against ``torch.nn``.

The reference is the same network in torch eager (``nn.Conv2d``, ``F.relu``,
``F.max_pool2d``, ``nn.Linear``, ``F.cross_entropy``), forward and ``backward()``;
contenders are the generated numpy ``loss_and_grad``, the generated torch
``loss_and_grad`` and the generated torch ``Model`` (forward + ``backward()``). float32,
one core, one process per contender (pinned like ``run.py``'s children), median of many
samples, on 8 x 8 single-channel images with integer class ids.

    python benchmarks/cnn_step.py [--batch 64] [--seconds 3]
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
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from contender import backward_step, load_module, time_step  # noqa: E402

CONTENDERS = {
    "eager": "torch.nn, eager autograd",
    "gen-torch": "generated torch loss_and_grad",
    "gen-model": "generated torch Model(...).backward()",
    "gen-numpy": "generated numpy loss_and_grad",
}


def _twin(torch: Any) -> Any:
    F = torch.nn.functional  # noqa: N806

    class Cnn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 16, 3)
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: Any) -> Any:
            h = F.max_pool2d(F.relu(self.conv1(x)), 2)
            h = F.relu(self.conv2(h))
            return self.fc(h.reshape(h.shape[0], 64))

    return Cnn()


def child(name: str, batch: int, gen_dir: Path, seconds: float) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 1, 8, 8)).astype(np.float32)
    label = rng.integers(0, 10, size=batch)
    np_mod = load_module(gen_dir / "cnn_numpy.py")
    params = {k: v.astype(np.float32) for k, v in np_mod.init_params(0).items()}
    if name == "gen-numpy":
        def step() -> Any:
            return np_mod.loss_and_grad(params, x=x, label=label)
    else:
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        xt, lt = torch.from_numpy(x), torch.from_numpy(label)
        state = {k: torch.from_numpy(v) for k, v in params.items()}
        if name == "gen-torch":
            mod = load_module(gen_dir / "cnn_torch.py")

            def step() -> Any:
                return mod.loss_and_grad(state, x=xt, label=lt)
        else:
            if name == "gen-model":
                model = load_module(gen_dir / "cnn_torch.py").Model(dtype=torch.float32)
                model.load_state_dict(state)

                def loss() -> Any:
                    return model(x=xt, label=lt)
            else:
                model = _twin(torch)
                model.load_state_dict(state)

                def loss() -> Any:
                    return torch.nn.functional.cross_entropy(model(xt), lt)
            step = backward_step(model.parameters(), loss)
    step()
    out = time_step(step, seconds, 1.0, 15)
    out.update({"contender": name})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--child", nargs=2, metavar=("NAME", "GEN_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, gen_dir = args.child
        print(json.dumps(child(name, args.batch, Path(gen_dir), args.seconds)))
        return 0
    from run import child_env, pin_prefix

    prefix, pinning = pin_prefix(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="symbackprop-cnn-") as tmp:
        subprocess.run([sys.executable, "-m", "symbackprop.cli", "generate",
                        str(ROOT / "examples" / "cnn.yaml"), "--out", tmp,
                        "--no-derivations"], check=True, capture_output=True)
        for name in CONTENDERS:
            cmd = [*prefix, sys.executable, __file__, "--batch", str(args.batch),
                   "--seconds", str(args.seconds), "--child", name, tmp]
            done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True,
                                  check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    eager = next(r for r in rows if r["contender"] == "eager")
    print(f"cnn, N = {args.batch}, float32; pinning: {pinning}\n")
    print("| contender | median ms | IQR ms | × eager |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {CONTENDERS[r['contender']]} | {r['median_ms']:.3f} | "
              f"{r['q1_ms']:.3f}–{r['q3_ms']:.3f} | {r['median_ms'] / eager['median_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
