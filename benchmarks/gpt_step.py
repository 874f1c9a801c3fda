"""One training step of ``examples/gpt_block.yaml``: generated modules against nanoGPT.

The reference is a nanoGPT-style ``Block`` in torch eager (``nn.LayerNorm``, attention
written out with a causal mask, ``F.gelu(approximate="tanh")``), trained on the same mse
loss; contenders are the generated numpy ``loss_and_grad``, the generated torch
``loss_and_grad`` and the generated torch ``Model`` (forward + ``backward()``). float32,
one core, one process per contender (pinned like ``run.py``'s children), median of many
samples. Peak memory is the growth of the process's resident set (``ru_maxrss``) over the
step, after the parameters and the batch exist: a coarse figure, the same for everyone.

    python benchmarks/gpt_step.py [--batch 8] [--length 64] [--seconds 3]
    python benchmarks/gpt_step.py --lora [--batch 8] [--length 32]

``--lora`` times instead the step of ``examples/lora_gpt.yaml`` (rank-4 adapters on every
projection, everything else frozen) against full fine-tuning of the same network
(``examples/tiny_gpt.yaml``, every parameter trained), numpy ``loss_and_grad`` and torch
``Model``, on character ids.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
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
    "eager": "nanoGPT Block, torch eager autograd",
    "gen-torch": "generated torch loss_and_grad",
    "gen-model": "generated torch Model(...).backward()",
    "gen-numpy": "generated numpy loss_and_grad",
}


def _twin(torch: Any, width: int, heads: int) -> Any:
    F = torch.nn.functional  # noqa: N806

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = torch.nn.Linear(width, 3 * width)
            self.c_proj = torch.nn.Linear(width, width)

        def forward(self, x: Any) -> Any:
            n, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (a.view(n, t, heads, c // heads).transpose(1, 2) for a in (q, k, v))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            return self.c_proj((att @ v).transpose(1, 2).contiguous().view(n, t, c))

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = torch.nn.Linear(width, 4 * width)
            self.c_proj = torch.nn.Linear(4 * width, width)

        def forward(self, x: Any) -> Any:
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = torch.nn.LayerNorm(width)
            self.attn = Attention()
            self.ln_2 = torch.nn.LayerNorm(width)
            self.mlp = Mlp()

        def forward(self, x: Any) -> Any:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    return Block()


LORA_CONTENDERS = {
    "full-numpy": ("tiny_gpt", "numpy", "full fine-tuning (tiny_gpt), numpy loss_and_grad"),
    "lora-numpy": ("lora_gpt", "numpy", "LoRA (lora_gpt), numpy loss_and_grad"),
    "full-model": ("tiny_gpt", "model", "full fine-tuning (tiny_gpt), torch Model"),
    "lora-model": ("lora_gpt", "model", "LoRA (lora_gpt), torch Model"),
}


def lora_child(name: str, batch: int, length: int, gen_dir: Path, seconds: float
               ) -> dict[str, Any]:
    import numpy as np

    spec, how, _ = LORA_CONTENDERS[name]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 65, size=(batch, length))
    y = rng.integers(0, 65, size=(batch, length))
    np_mod = load_module(gen_dir / f"{spec}_numpy.py")
    params = {k: v.astype(np.float32) for k, v in np_mod.init_params(0).items()}
    for k in params:  # adapters' B starts at zero; any values time the same
        params[k] += np.float32(0.01)
    if how == "numpy":
        def step() -> Any:
            return np_mod.loss_and_grad(params, idx=idx, y=y)
    else:
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        model = load_module(gen_dir / f"{spec}_torch.py").Model(dtype=torch.float32)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        it, yt = torch.from_numpy(idx), torch.from_numpy(y)
        step = backward_step((p for p in model.parameters() if p.requires_grad),
                             lambda: model(idx=it, y=yt))
    step()
    out = time_step(step, seconds, 1.0, 15)
    out.update({"contender": name})
    return out


def child(name: str, batch: int, length: int, gen_dir: Path, seconds: float) -> dict[str, Any]:
    import numpy as np

    if name in LORA_CONTENDERS:
        return lora_child(name, batch, length, gen_dir, seconds)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, length, 32)).astype(np.float32)
    t = rng.normal(size=(batch, length, 32)).astype(np.float32)
    np_mod = load_module(gen_dir / "gpt_block_numpy.py")
    params = {k: v.astype(np.float32) for k, v in np_mod.init_params(0).items()}
    if name == "gen-numpy":
        def step() -> Any:
            return np_mod.loss_and_grad(params, x=x, t=t)
    else:
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        state = {k: torch.from_numpy(v) for k, v in params.items()}
        if name == "gen-torch":
            mod = load_module(gen_dir / "gpt_block_torch.py")

            def step() -> Any:
                return mod.loss_and_grad(state, x=xt, t=tt)
        else:
            if name == "gen-model":
                model = load_module(gen_dir / "gpt_block_torch.py").Model(dtype=torch.float32)
                model.load_state_dict(state)

                def loss() -> Any:
                    return model(x=xt, t=tt)
            else:
                model = _twin(torch, 32, 4)
                model.load_state_dict(state)

                def loss() -> Any:
                    return torch.nn.functional.mse_loss(model(xt), tt)
            step = backward_step(model.parameters(), loss)
    step()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = time_step(step, seconds, 1.0, 15)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update({"contender": name, "peak_growth_kib": peak - base})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=None,
                   help="T (default 64; 32, the tiny GPT's longest, with --lora)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--lora", action="store_true", help="LoRA against full fine-tuning")
    p.add_argument("--child", nargs=2, metavar=("NAME", "GEN_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.length is None:
        args.length = 32 if args.lora else 64
    if args.child:
        name, gen_dir = args.child
        print(json.dumps(child(name, args.batch, args.length, Path(gen_dir), args.seconds)))
        return 0
    from run import child_env, pin_prefix

    prefix, pinning = pin_prefix(0)
    rows = []
    names = list(LORA_CONTENDERS if args.lora else CONTENDERS)
    specs = ("tiny_gpt", "lora_gpt") if args.lora else ("gpt_block",)
    with tempfile.TemporaryDirectory(prefix="symbackprop-gpt-") as tmp:
        for spec in specs:
            subprocess.run([sys.executable, "-m", "symbackprop.cli", "generate",
                            str(ROOT / "examples" / f"{spec}.yaml"), "--out", tmp,
                            "--no-derivations"], check=True, capture_output=True)
        for name in names:
            cmd = [*prefix, sys.executable, __file__, "--batch", str(args.batch), "--length",
                   str(args.length), "--seconds", str(args.seconds), "--child", name, tmp]
            done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True,
                                  check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.lora:
        by = {r["contender"]: r for r in rows}
        print(f"N = {args.batch}, T = {args.length}, float32; pinning: {pinning}\n")
        print("| step | median ms | IQR ms | full / LoRA |")
        print("|---|---:|---:|---:|")
        for name, r in by.items():
            full = by["full-" + name.split("-")[1]]["median_ms"]
            ratio = f"{full / r['median_ms']:.2f}" if name.startswith("lora") else ""
            print(f"| {LORA_CONTENDERS[name][2]} | {r['median_ms']:.3f} | "
                  f"{r['q1_ms']:.3f}–{r['q3_ms']:.3f} | {ratio} |")
        return 0
    eager = next(r for r in rows if r["contender"] == "eager")
    print(f"gpt_block, N = {args.batch}, T = {args.length}, float32; pinning: {pinning}\n")
    print("| contender | median ms | IQR ms | × eager | peak RSS growth MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {CONTENDERS[r['contender']]} | {r['median_ms']:.3f} | "
              f"{r['q1_ms']:.3f}–{r['q3_ms']:.3f} | {r['median_ms'] / eager['median_ms']:.2f} | "
              f"{r['peak_growth_kib'] / 1024:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
