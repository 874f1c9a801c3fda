"""Train the tiny GPT character by character, then LoRA fine-tune it on another text.

    python examples/train_tiny_gpt.py [--steps 400] [--lora-steps 300] [--plot out.png]

1. ``generated/tiny_gpt_numpy.py`` trains on ``examples/data/chain_rule.txt`` with its own
   ``loss_and_grad`` and ``adam_step`` (AdamW): numpy only.
2. ``generated/tiny_gpt_torch.py``'s ``Model`` trains on the same text, from the same
   initial weights, with ``torch.optim.AdamW`` and ``loss.backward()``.
3. ``generated/lora_gpt_torch.py``'s ``Model`` loads the weights of step 2 (its adapters
   start as peft starts them: B = 0, so the network is unchanged) and fine-tunes only the
   adapters on ``examples/data/sea_letters.txt``; ``merge_lora`` folds them back into
   plain tiny_gpt weights.

Prints the loss as it goes, the fraction of parameters LoRA trains, a sample of text after
each phase, and writes the three loss curves to a PNG (matplotlib, the ``bench`` extra).
Run it from the repository root after ``symbackprop generate`` of the three specs (the
modules in ``generated/`` are up to date in the repository).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generated import lora_gpt_torch, tiny_gpt_numpy, tiny_gpt_torch  # noqa: E402

VOCAB = 65  # the embedding's rows (num in the spec); the texts use fewer characters
LENGTH = 32  # T's declared max in the spec
BATCH = 16


def vocabulary(*texts: str) -> dict[str, int]:
    chars = sorted(set("".join(texts)))
    if len(chars) > VOCAB:
        raise SystemExit(f"the texts use {len(chars)} characters; the model has {VOCAB}")
    return {c: i for i, c in enumerate(chars)}


def batches(ids: np.ndarray, rng: np.random.Generator):
    """Random windows of LENGTH characters and, as targets, the characters after them."""
    while True:
        start = rng.integers(0, len(ids) - LENGTH - 1, size=BATCH)
        window = np.stack([ids[s:s + LENGTH + 1] for s in start])
        yield window[:, :-1], window[:, 1:]


def sample(logits_of, start: str, vocab: dict[str, int], count: int = 160,
           seed: int = 0) -> str:
    """Characters drawn one at a time from the model's softmax (temperature 0.8)."""
    chars = {i: c for c, i in vocab.items()}
    rng = np.random.default_rng(seed)
    ids = [vocab[c] for c in start]
    for _ in range(count):
        logits = logits_of(np.array([ids[-LENGTH:]], dtype=np.int64))[0, -1] / 0.8
        p = np.exp(logits - logits.max())
        p[len(vocab):] = 0  # rows past the texts' characters never occur
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return "".join(chars[i] for i in ids)


def smooth(values: list[float], width: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def train_numpy(ids: np.ndarray, steps: int, lr: float) -> tuple[dict, list[float], float]:
    params = tiny_gpt_numpy.init_params(0)
    state: dict = {}
    losses = []
    data = batches(ids, np.random.default_rng(1))
    t0 = time.perf_counter()
    for step in range(steps):
        idx, y = next(data)
        loss, grads = tiny_gpt_numpy.loss_and_grad(params, idx=idx, y=y)
        tiny_gpt_numpy.adam_step(params, grads, state, lr=lr, weight_decay=0.01)
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            print(f"  numpy step {step:4d}  loss {np.mean(losses[-20:]):.3f}")
    return params, losses, time.perf_counter() - t0


def train_torch(model, ids: np.ndarray, steps: int, lr: float, label: str, seed: int
                ) -> tuple[list[float], float]:
    import torch

    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                              weight_decay=0.01)
    data = batches(ids, np.random.default_rng(seed))
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx, y = next(data)
        loss = model(idx=torch.from_numpy(idx), y=torch.from_numpy(y))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  {label} step {step:4d}  loss {np.mean(losses[-20:]):.3f}")
    return losses, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plot", type=Path, default=ROOT / "examples" / "results" /
                        "train_tiny_gpt.png")
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    base_text = (ROOT / "examples" / "data" / "chain_rule.txt").read_text()
    tune_text = (ROOT / "examples" / "data" / "sea_letters.txt").read_text()
    vocab = vocabulary(base_text, tune_text)
    base_ids = np.array([vocab[c] for c in base_text], dtype=np.int64)
    tune_ids = np.array([vocab[c] for c in tune_text], dtype=np.int64)
    print(f"texts: {len(base_text)} and {len(tune_text)} characters, {len(vocab)} distinct")

    print("1. tiny_gpt, numpy loss_and_grad + adam_step (AdamW)")
    params, numpy_losses, numpy_s = train_numpy(base_ids, args.steps, args.lr)
    print(f"   {args.steps} steps in {numpy_s:.1f} s")

    print("2. tiny_gpt, torch Model + torch.optim.AdamW")
    model = tiny_gpt_torch.Model(seed=0)
    torch_losses, torch_s = train_torch(model, base_ids, args.steps, args.lr, "torch", 1)
    print(f"   {args.steps} steps in {torch_s:.1f} s")
    with torch.no_grad():
        text = sample(lambda i: model(idx=torch.from_numpy(i)).numpy(), "The ", vocab)
    print("   sample:", text.replace("\n", " "))

    print("3. lora_gpt: tiny_gpt's weights, rank-4 adapters trained on the letters")
    tuned = lora_gpt_torch.Model(seed=0)
    missing, unexpected = tuned.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    total = sum(p.numel() for p in tuned.parameters())
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    print(f"   trains {trainable} of {total} parameters ({100 * trainable / total:.1f} %)")
    with torch.no_grad():
        idx, y = next(batches(tune_ids, np.random.default_rng(9)))
        before = tuned(idx=torch.from_numpy(idx), y=torch.from_numpy(y)).item()
    lora_losses, lora_s = train_torch(tuned, tune_ids, args.lora_steps, args.lr, "lora", 2)
    with torch.no_grad():
        after = tuned(idx=torch.from_numpy(idx), y=torch.from_numpy(y)).item()
    print(f"   {args.lora_steps} steps in {lora_s:.1f} s; loss on one batch of letters "
          f"{before:.3f} -> {after:.3f}")
    merged = lora_gpt_torch.merge_lora({k: v.detach() for k, v in tuned.state_dict().items()})
    plain = tiny_gpt_torch.Model(seed=0)
    plain.load_state_dict(merged)
    with torch.no_grad():
        check = plain(idx=torch.from_numpy(idx), y=torch.from_numpy(y)).item()
        text = sample(lambda i: plain(idx=torch.from_numpy(i)).numpy(), "Dear ", vocab)
    print(f"   merged into plain tiny_gpt weights: loss {check:.3f}")
    print("   sample:", text.replace("\n", " "))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=120)
    steps = np.arange(args.steps)
    ax.plot(steps, smooth(numpy_losses), label=f"tiny_gpt, numpy ({numpy_s:.0f} s)")
    ax.plot(steps, smooth(torch_losses), label=f"tiny_gpt, torch Model ({torch_s:.0f} s)")
    ax.plot(args.steps + np.arange(args.lora_steps), smooth(lora_losses),
            label=f"LoRA fine-tune on new text ({lora_s:.0f} s, "
                  f"{100 * trainable / total:.0f} % of parameters)")
    ax.axhline(np.log(len(vocab)), color="grey", lw=0.8, ls=":", label="uniform guess")
    ax.set_xlabel("step (batch of 16 × 32 characters)")
    ax.set_ylabel("cross-entropy (nats), mean of 20")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
