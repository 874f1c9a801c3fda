"""Train the CNN of ``examples/cnn.yaml`` on scikit-learn's 8 x 8 digits.

    python examples/train_digits_cnn.py [--epochs 40] [--plot out.png]

1. ``generated/cnn_numpy.py`` trains with its own ``loss_and_grad`` and ``adam_step``
   (AdamW, weight decay 0.01): numpy only.
2. ``generated/cnn_torch.py``'s ``Model`` trains from the same initial weights on the
   same mini-batches with ``torch.optim.AdamW`` and ``loss.backward()``.
3. ``sklearn.neural_network.MLPClassifier`` (one hidden layer of 100, Adam) trains on the
   same split, as a point of comparison.

The 1,797 images (pixel values 0-16, scaled to [0, 1]) are split 75 / 25, stratified,
with a fixed seed. Prints the training loss per epoch, the test accuracy of all three and
the time each took, and writes the two loss curves to a PNG (matplotlib). Needs the
``examples`` extra (scikit-learn, matplotlib). Run it from the repository root (the
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

from generated import cnn_numpy, cnn_torch  # noqa: E402

BATCH = 64


def digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).reshape(-1, 1, 8, 8)
    return train_test_split(images, data.target, test_size=0.25, random_state=seed,
                            stratify=data.target)


def epochs_of(n: int, epochs: int, seed: int):
    """The same shuffled mini-batch indices for every trainer."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        yield [order[i:i + BATCH] for i in range(0, n, BATCH)]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def train_numpy(x, y, x_test, y_test, epochs: int, lr: float, seed: int):
    params = cnn_numpy.init_params(seed=seed)
    state: dict = {}
    curve = []
    start = time.perf_counter()
    for epoch, batches in enumerate(epochs_of(len(x), epochs, seed)):
        losses = []
        for idx in batches:
            loss, grads = cnn_numpy.loss_and_grad(params, x=x[idx], label=y[idx])
            cnn_numpy.adam_step(params, grads, state, lr=lr)  # AdamW, in place
            losses.append(float(loss))
        curve.append(float(np.mean(losses)))
        print(f"numpy  epoch {epoch + 1:3d}: training loss {curve[-1]:.4f}")
    took = time.perf_counter() - start
    return curve, accuracy(cnn_numpy.forward(params, x=x_test), y_test), took


def train_torch(x, y, x_test, y_test, epochs: int, lr: float, seed: int):
    import torch

    torch.set_num_threads(1)
    model = cnn_torch.Model(dtype=torch.float64)
    model.load_state_dict({k: torch.from_numpy(v)
                           for k, v in cnn_numpy.init_params(seed=seed).items()})
    opt = torch.optim.AdamW(model.parameters(), lr=lr)  # the numpy adam_step's defaults
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    curve = []
    start = time.perf_counter()
    for epoch, batches in enumerate(epochs_of(len(x), epochs, seed)):
        losses = []
        for idx in batches:
            at = torch.from_numpy(idx)
            opt.zero_grad()
            loss = model(x=xt[at], label=yt[at])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curve.append(float(np.mean(losses)))
        print(f"torch  epoch {epoch + 1:3d}: training loss {curve[-1]:.4f}")
    took = time.perf_counter() - start
    with torch.no_grad():
        logits = model(x=torch.from_numpy(x_test)).numpy()
    return curve, accuracy(logits, y_test), took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=str(ROOT / "examples" / "results" /
                                         "train_digits_cnn.png"))
    args = p.parse_args(argv)
    x, x_test, y, y_test = digits(args.seed)
    print(f"digits: {len(x)} training and {len(x_test)} test images of 8 x 8, 10 classes")
    np_curve, np_acc, np_time = train_numpy(x, y, x_test, y_test, args.epochs, args.lr,
                                            args.seed)
    t_curve, t_acc, t_time = train_torch(x, y, x_test, y_test, args.epochs, args.lr,
                                         args.seed)
    from sklearn.neural_network import MLPClassifier

    start = time.perf_counter()
    mlp = MLPClassifier(max_iter=500, random_state=args.seed)
    mlp.fit(x.reshape(len(x), -1), y)
    mlp_time = time.perf_counter() - start
    mlp_acc = float(mlp.score(x_test.reshape(len(x_test), -1), y_test))
    params = sum(int(np.prod(s)) for s in cnn_numpy.PARAM_SHAPES.values())
    print(f"\ntest accuracy ({len(x_test)} images):")
    print(f"  generated numpy CNN ({params} parameters, {args.epochs} epochs): "
          f"{np_acc:.4f}  ({np_time:.1f} s)")
    print(f"  generated torch Model CNN (same weights, batches, AdamW): {t_acc:.4f}  "
          f"({t_time:.1f} s)")
    print(f"  sklearn MLPClassifier (100 hidden units): {mlp_acc:.4f}  ({mlp_time:.1f} s)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    epochs = np.arange(1, args.epochs + 1)
    ax.plot(epochs, np_curve, label=f"generated numpy (test acc. {np_acc:.3f})")
    ax.plot(epochs, t_curve, "--", label=f"generated torch Model (test acc. {t_acc:.3f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (nats)")
    ax.set_yscale("log")
    ax.set_title(f"examples/cnn.yaml on 8x8 digits; MLPClassifier test acc. {mlp_acc:.3f}")
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
