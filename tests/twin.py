"""Compare generated modules with a hand-written torch twin and with finite differences.

The twin is a plain function of torch tensors written in the test (torch.nn.functional,
torch.amax, torch.logsumexp, explicit penalty terms), differentiated by autograd; it
shares nothing with symbackprop. One call checks the loss and every trainable gradient
of numpy ``loss_and_grad``, torch ``loss_and_grad`` and the torch ``Model`` in float64,
relative error <= 1e-9, and the numpy gradients against central finite differences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType

import numpy as np
import torch

Twin = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


def rel(a: object, b: object) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def check_twin(mods: Mapping[str, ModuleType], twin: Twin, batch: Mapping[str, np.ndarray],
               *, seed: int = 3, fd_entries: int = 6, fd_tol: float = 1e-6) -> dict:
    """Run every check; return the twin's gradients (for further assertions)."""
    m = mods["numpy"]
    params = m.init_params(seed)
    trainable = list(m.TRAINABLE)
    tparams = {k: torch.tensor(v, requires_grad=k in trainable) for k, v in params.items()}
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    ref = twin(tparams, tbatch)
    want = dict(zip(trainable, torch.autograd.grad(ref, [tparams[k] for k in trainable]),
                    strict=True))
    want = {k: g.numpy() for k, g in want.items()}
    assert want and all(np.abs(g).max() > 0 for g in want.values()), "a zero gradient"

    loss, grads = m.loss_and_grad(params, **batch)
    assert rel(loss, ref.item()) <= 1e-9, ("numpy loss", float(loss), ref.item())
    assert set(grads) == set(want)
    for k in want:
        assert rel(grads[k], want[k]) <= 1e-9, ("numpy", k)

    tm = mods["torch"]
    state = {k: torch.from_numpy(v) for k, v in params.items()}
    loss_t, grads_t = tm.loss_and_grad(state, **tbatch)
    assert rel(loss_t.item(), ref.item()) <= 1e-9
    assert set(grads_t) == set(want)
    for k in want:
        assert rel(grads_t[k].numpy(), want[k]) <= 1e-9, ("torch", k)

    model = tm.Model(dtype=torch.float64)
    model.load_state_dict(state)
    out = model(**tbatch)
    out.backward()
    assert rel(out.item(), ref.item()) <= 1e-9
    seen = 0
    for k, p in model.named_parameters():
        if k in want:
            assert rel(p.grad.numpy(), want[k]) <= 1e-9, ("Model", k)
            seen += 1
    assert seen == len(want)

    rng = np.random.default_rng(seed)
    step = 1e-6
    for k in trainable:
        flat = params[k].reshape(-1)
        for i in rng.choice(flat.size, size=min(fd_entries, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + step
            up = m.loss(params, **batch)
            flat[i] = old - step
            down = m.loss(params, **batch)
            flat[i] = old
            fd = (up - down) / (2 * step)
            got = grads[k].reshape(-1)[i]
            assert abs(fd - got) <= fd_tol * max(1.0, abs(got)), ("finite differences", k, i,
                                                                 fd, got)
    return want
