"""The fixed cost of a training step through one ``torch.autograd.Function``.

``Model.loss(...).backward()`` runs the generated backward inside an autograd Function:
``apply``, the engine, and one ``AccumulateGrad`` per parameter wrap the same work that
``loss_and_grad`` does. This measures that wrapper alone — a Function with the MLP's
inputs and six parameters whose forward and backward do (almost) nothing — so the gap
between the two generated torch rows of the benchmark table can be read against it.

    taskset -c 0 python benchmarks/function_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch

torch.set_num_threads(1)

SHAPES = [(256, 784), (256,), (256, 256), (256,), (10, 256), (10,)]


class Empty(torch.autograd.Function):
    """Forward: a sum; backward: uninitialised gradients of the right shapes."""

    @staticmethod
    def forward(ctx, x, label, *weights):  # type: ignore[override]
        ctx.save_for_backward(x, label)
        return x.sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018 - unpacked as the generated backward does
        return (None, None, *[torch.empty(s) for s in SHAPES])


def median_us(fn, reps: int = 3000) -> float:
    for _ in range(200):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main() -> None:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    x, label = torch.zeros(16, 784), torch.zeros(16, 10)

    def step() -> None:
        for p in params:
            p.grad = None
        Empty.apply(x, label, *params).backward()

    def plain() -> None:
        x.sum()
        [torch.empty(s) for s in SHAPES]

    wrapped, bare = median_us(step), median_us(plain)
    print(f"autograd.Function step with an empty backward: {wrapped:.1f} us; the same "
          f"tensor work without autograd: {bare:.1f} us; fixed cost {wrapped - bare:.1f} us")


if __name__ == "__main__":
    main()
