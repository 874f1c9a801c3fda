"""Independent implementations of the benchmark step, written by hand (not generated).

Each builder takes a workload, float32 parameters and one batch, and returns a
zero-argument ``step`` that runs one training step — forward, loss, gradients of every
parameter — and returns ``(loss, {name: grad})`` as that framework's arrays. The floors
run only the step's matrix products, at the same shapes, layouts and dtype.

Nothing here reads the generated modules: the hand-written numpy backprop, the
``torch.nn`` model and the JAX function are what a user would write instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from workloads import Workload

Step = Callable[[], Any]


# --------------------------------------------------------------------- numpy, by hand
def numpy_hand(work: Workload, params: dict[str, np.ndarray], x: np.ndarray,
               target: np.ndarray) -> Step:
    """Textbook backprop in numpy: keep each layer's output, walk the layers backwards."""
    weights = [params[f"{name}.weight"] for name in work.layers]
    biases = [params[f"{name}.bias"] for name in work.layers]
    names = work.layers
    softmax_ce = work.loss == "softmax_cross_entropy"

    def step() -> tuple[Any, dict[str, np.ndarray]]:
        n = x.shape[0]
        acts = [x]
        a = x
        for w, b in zip(weights[:-1], biases[:-1], strict=True):
            a = np.tanh(a @ w.T + b)
            acts.append(a)
        z = a @ weights[-1].T + biases[-1]
        if softmax_ce:
            shifted = z - z.max(axis=1, keepdims=True)
            e = np.exp(shifted)
            s = e.sum(axis=1, keepdims=True)
            loss = -(target * (shifted - np.log(s))).sum() / n
            dz = (e / s - target) / n  # rows of `target` sum to one
        else:
            diff = z - target
            loss = (diff * diff).sum() / diff.size
            dz = diff * (2.0 / diff.size)
        grads: dict[str, np.ndarray] = {}
        for i in range(len(weights) - 1, -1, -1):
            grads[f"{names[i]}.weight"] = dz.T @ acts[i]
            grads[f"{names[i]}.bias"] = dz.sum(axis=0)
            if i > 0:
                dh = dz @ weights[i]
                dz = dh * (1.0 - acts[i] * acts[i])  # tanh' = 1 - tanh^2
        return loss, grads

    return step


# --------------------------------------------------------------------- torch.nn eager
def torch_module(work: Workload, params: dict[str, np.ndarray]) -> Any:
    """The network as ``torch.nn.Sequential`` whose state_dict keys match the spec's."""
    from collections import OrderedDict

    import torch

    layers: OrderedDict[str, torch.nn.Module] = OrderedDict()
    for k, (name, fan_in, fan_out) in enumerate(zip(work.layers, work.sizes[:-1],
                                                    work.sizes[1:], strict=True)):
        layers[name] = torch.nn.Linear(fan_in, fan_out)
        if k < len(work.layers) - 1:
            layers[f"{name}_tanh"] = torch.nn.Tanh()
    model = torch.nn.Sequential(layers)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
    return model


def torch_eager(work: Workload, params: dict[str, np.ndarray], x: np.ndarray,
                target: np.ndarray) -> Step:
    """``torch.nn`` forward, ``torch.nn.functional`` loss, ``loss.backward()``."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    model = torch_module(work, params)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)
    named = list(model.named_parameters())
    softmax_ce = work.loss == "softmax_cross_entropy"

    def step() -> tuple[Any, dict[str, Any]]:
        for _, p in named:
            p.grad = None
        out = model(xt)
        loss = F.cross_entropy(out, tt) if softmax_ce else F.mse_loss(out, tt)
        loss.backward()
        return loss, {name: p.grad for name, p in named}

    return step


# --------------------------------------------------------------------- jax
def jax_jit(work: Workload, params: dict[str, np.ndarray], x: np.ndarray,
            target: np.ndarray) -> tuple[Step, Any]:
    """``jax.jit(jax.value_and_grad(loss))``; returns the step and the compiled function."""
    import jax
    import jax.numpy as jnp

    names = work.layers
    softmax_ce = work.loss == "softmax_cross_entropy"

    def loss_fn(p: dict[str, Any], xb: Any, tb: Any) -> Any:
        a = xb
        for name in names[:-1]:
            a = jnp.tanh(a @ p[f"{name}.weight"].T + p[f"{name}.bias"])
        z = a @ p[f"{names[-1]}.weight"].T + p[f"{names[-1]}.bias"]
        if softmax_ce:
            return -jnp.sum(tb * jax.nn.log_softmax(z, axis=1)) / xb.shape[0]
        return jnp.mean((z - tb) ** 2)

    fn = jax.jit(jax.value_and_grad(loss_fn))
    jp = {k: jax.device_put(v) for k, v in params.items()}
    jx, jt = jax.device_put(x), jax.device_put(target)

    def step() -> Any:
        return jax.block_until_ready(fn(jp, jx, jt))

    return step, (fn, jp, jx, jt)


# --------------------------------------------------------------------- floors
def _floor_operands(work: Workload, batch: int, rng: np.random.Generator
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Operands for every product of the step, laid out as the step lays them out."""
    ops: list[tuple[np.ndarray, np.ndarray]] = []
    for kind, (m, k), (_, n) in work.matmul_shapes(batch):
        def rand(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape).astype(np.float32)
        if kind == "a@W.T":  # activation (m, k) times a (n, k) weight, transposed
            ops.append((rand(m, k), rand(n, k).T))
        elif kind == "dz.T@a":  # (k, m) adjoint, transposed, times (k, n) activation
            ops.append((rand(k, m).T, rand(k, n)))
        else:  # "dz@W": (m, k) adjoint times (k, n) weight
            ops.append((rand(m, k), rand(k, n)))
    return ops


def numpy_floor(work: Workload, batch: int) -> Step:
    """numpy's matrix products alone (allocating their results, as ``a @ b`` does)."""
    ops = _floor_operands(work, batch, np.random.default_rng(2))

    def step() -> list[np.ndarray]:
        return [a @ b for a, b in ops]

    return step


def torch_floor(work: Workload, batch: int) -> Step:
    """torch's matrix products alone, same shapes and layouts as ``numpy_floor``."""
    import torch

    ops = [(torch.from_numpy(a), torch.from_numpy(b))  # from_numpy keeps the strides
           for a, b in _floor_operands(work, batch, np.random.default_rng(2))]

    def step() -> list[Any]:
        return [a @ b for a, b in ops]

    return step
