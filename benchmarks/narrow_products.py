"""Narrow matrix products in torch on the CPU: ``a @ b`` against ``(b^T @ a^T)^T``.

The generated torch module computes a product whose result is at most 8 wide (with 32
or more rows of sums of 32 or more terms) transposed and copies it back into row order
(``emit/arrays.py``, ``TorchArrayPrinter.product``): torch's CPU BLAS (MKL) runs such
products several times faster that way round. This prints both timings and their ratio
for the products the examples make — attention's probabilities against the values and
its three backward products, a LoRA adapter's products — and for a grid of shapes, so
the rule can be checked on another machine or BLAS.

    taskset -c 0 python benchmarks/narrow_products.py [--grid]
"""

from __future__ import annotations

import argparse

import torch
from function_overhead import median_us  # the same timing loop (this folder)

torch.set_num_threads(1)


def compare(label: str, a: torch.Tensor, b: torch.Tensor) -> None:
    direct = median_us(lambda: a @ b)
    turned = median_us(lambda: (b.mT @ a.mT).mT.contiguous())
    same = torch.allclose(a @ b, (b.mT @ a.mT).mT, rtol=1e-4, atol=1e-5)
    print(f"| {label} | {tuple(a.shape)} @ {tuple(b.shape)} | {direct:.1f} | {turned:.1f} "
          f"| {direct / turned:.2f} | {'yes' if same else '**no**'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", action="store_true", help="also a grid of shapes")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    print("| product | shapes | a @ b µs | (bᵀ aᵀ)ᵀ µs | ratio | equal |")
    print("|---|---|---:|---:|---:|---|")
    p, v = randn(8, 4, 64, 64), randn(8, 4, 64, 8)
    compare("attention: p @ v", p, v)
    compare("attention backward: pᵀ @ dy", p.mT, v)
    compare("attention backward: ds @ k", p, v)
    x, a_t, g128 = randn(256, 32), randn(32, 4), randn(256, 128)
    compare("LoRA: x @ Aᵀ (32 in)", x, a_t)
    compare("LoRA backward: δ @ B (128 out)", g128, randn(128, 4))
    compare("LoRA backward: δᵀ @ u (B's gradient)", g128.T, randn(256, 4))
    compare("wide result (16): no gain expected", randn(256, 128), randn(128, 16))
    if args.grid:
        for rows in (16, 32, 64, 256, 2048):
            for depth in (8, 32, 128):
                for width in (4, 8, 16, 32):
                    compare("grid", randn(rows, depth), randn(depth, width))


if __name__ == "__main__":
    main()
