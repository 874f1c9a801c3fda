"""The benchmark workloads: network shapes, parameters and batches every contender shares.

Every contender of one (workload, batch) pair gets bit-identical float32 parameters and
data from this module, so the harness can check that they all compute the same step
(same loss, same gradients) before it compares their times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPECS = HERE / "specs"


@dataclass(frozen=True)
class Workload:
    """A dense network: tanh hidden layers, a linear output layer and one loss."""

    name: str  # also the spec's `name:`, so modules are <name>_numpy.py / <name>_torch.py
    sizes: tuple[int, ...]  # input width, hidden widths..., output width
    layers: tuple[str, ...]  # layer names, one per dense layer (as in the spec)
    loss: str  # "softmax_cross_entropy" (one-hot targets) or "mse"
    target: str  # the keyword name of the target in the generated API
    batches: tuple[int, ...]
    note: str

    @property
    def spec(self) -> Path:
        return SPECS / f"{self.name}.yaml"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, fan_in, fan_out in zip(self.layers, self.sizes[:-1], self.sizes[1:],
                                         strict=True):
            shapes[f"{name}.weight"] = (fan_out, fan_in)
            shapes[f"{name}.bias"] = (fan_out,)
        return shapes

    def matmul_shapes(self, batch: int) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """The (m, k) @ (k, n) products of one training step, with the layout each uses.

        Forward: ``a @ W.T`` per layer. Backward: ``dz.T @ a`` (weight gradient) per
        layer and ``dz @ W`` (input gradient) for every layer but the first, whose input
        is data and needs no gradient.
        """
        out: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
        pairs = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        for fan_in, fan_out in pairs:
            out.append(("a@W.T", (batch, fan_in), (fan_in, fan_out)))
        for i, (fan_in, fan_out) in reversed(list(enumerate(pairs))):
            out.append(("dz.T@a", (fan_out, batch), (batch, fan_in)))
            if i > 0:
                out.append(("dz@W", (batch, fan_out), (fan_out, fan_in)))
        return out


WORKLOADS: dict[str, Workload] = {
    "mlp784": Workload(
        name="mlp784", sizes=(784, 256, 256, 10), layers=("fc1", "fc2", "logits"),
        loss="softmax_cross_entropy", target="label", batches=(16, 256, 2048),
        note="MLP 784-256-256-10, tanh, softmax cross-entropy, float32"),
    "tiny": Workload(
        name="tiny", sizes=(4, 8, 8, 1), layers=("fc1", "fc2", "out"),
        loss="mse", target="t", batches=(1,),
        note="tiny 4-8-8-1, tanh, mean squared error, float32 (per-call overhead)"),
}


def make_params(work: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 parameters, uniform in +-1/sqrt(fan_in) as torch.nn.Linear initialises."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, fan_in, fan_out in zip(work.layers, work.sizes[:-1], work.sizes[1:],
                                     strict=True):
        bound = 1.0 / np.sqrt(fan_in)
        params[f"{name}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        params[f"{name}.bias"] = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
    return params


def make_batch(work: Workload, batch: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``x`` and targets (one-hot rows for cross-entropy, reals for mse)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, work.sizes[0])).astype(np.float32)
    classes = work.sizes[-1]
    if work.loss == "softmax_cross_entropy":
        target = np.zeros((batch, classes), dtype=np.float32)
        target[np.arange(batch), rng.integers(0, classes, size=batch)] = 1.0
    else:
        target = rng.standard_normal((batch, classes)).astype(np.float32)
    return x, target
