"""The cross-entropy pass: softmax cross-entropy with class ids as log_softmax + nll_loss.

The pass rewrites the derived statements only when they are exactly the loss's own (the
forward bodies, and the backward's adjoints where the function has a backward); the
helpers it prints compute what torch's ``nll_loss`` and autograd compute, ignored rows and
every-row-ignored included. The networks' numbers against torch.nn are checked where the
networks are (test_cnn, test_gpt, test_embedding); this file tests the pass and helpers.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F  # noqa: N812

from symbackprop.api import compile_spec
from symbackprop.emit.render import _lower
from symbackprop.ir.nodes import (
    LogSoftmax,
    LogSoftmaxBackward,
    Map,
    NllLoss,
    NllLossBackward,
)
from symbackprop.ir.passes import conv, cross_entropy, cse, fuse, max_pool, select

from conftest import EXAMPLES, example_modules


def _before(name: str, *, backward: bool = True, seed_argument: bool = False):
    """The statements the pass sees for ``examples/<name>.yaml``'s loss (and gradients)."""
    deriv = compile_spec(EXAMPLES / f"{name}.yaml").derivation
    program = _lower(deriv, seed_argument=seed_argument)
    outputs = [deriv.graph.loss, *(deriv.grads.values() if backward else ())]
    stmts = select(program.stmts, outputs)
    stmts = cse(fuse(stmts, program, set(outputs)), program)
    stmts = max_pool(conv(stmts, program, set(outputs)), program, set(outputs))
    return stmts, program, set(outputs)


@pytest.mark.parametrize("backward, seed_argument", [(True, False), (True, True), (False, False)],
                         ids=["loss_and_grad", "autograd-backward", "loss"])
def test_the_pass_writes_log_softmax_and_nll_loss(backward: bool, seed_argument: bool) -> None:
    stmts, program, outputs = _before("cnn", backward=backward, seed_argument=seed_argument)
    out = cross_entropy(stmts, program, outputs)
    ops = {s.target: s.op for s in out}
    assert ops["fc_logp"] == LogSoftmax("fc", 1)
    assert ops["loss"] == NllLoss("fc_logp", "label", -100)
    # with a backward, the call's second result is the count of rows, which the
    # backward reads instead of counting them again; it takes the count's name
    loss = next(s for s in out if s.target == "loss")
    assert loss.also == (("fc_count",) if backward else ())
    gone = {"fc_lse", "fc_picked"} | (set() if backward else {"fc_count"})
    assert not gone & set(ops) and not any(gone & s.reads for s in out)
    assert not any(s.target == "fc_count" for s in out)  # no statement of its own
    if backward:
        assert ops["d_fc_logp"] == NllLossBackward("d_loss", "fc_logp", "label", -100,
                                                   "fc_count")
        assert ops["d_fc"] == LogSoftmaxBackward("d_fc_logp", "fc_logp", 1)
        assert "d_fc_lse" not in ops and "d_fc_picked" not in ops
        order = [s.target for s in out]
        assert order.index("fc_logp") < order.index("loss") < order.index("d_fc_logp") \
            < order.index("d_fc")
    # each name defined once, every read defined before it or an argument
    assert len(ops) == len(out)
    seen = set(program.leaves) | ({"d_loss"} if seed_argument else set())
    for stmt in out:
        assert stmt.reads <= seen, (stmt.target, stmt.reads - seen)
        seen.update(stmt.targets)


def test_the_new_forward_takes_the_place_of_the_log_sum_exp() -> None:
    """Statements the pass removes may come before the log-sum-exp: the new ones still
    come before everything that reads them (the seed reads the loss)."""
    stmts, program, outputs = _before("cnn")
    moved = [s for s in stmts if s.target in ("tmp2", "tmp3")]
    assert len(moved) == 2
    rest = [s for s in stmts if s not in moved]
    at = next(n for n, s in enumerate(rest) if s.target == "fc_lse")
    reordered = rest[:at] + moved + rest[at:]
    out = cross_entropy(reordered, program, outputs)
    assert any(isinstance(s.op, NllLoss) for s in out)
    seen = set(program.leaves)
    for stmt in out:
        assert stmt.reads <= seen, (stmt.target, stmt.reads - seen)
        seen.update(stmt.targets)


def test_the_pass_keeps_the_statements_of_another_loss() -> None:
    stmts, program, outputs = _before("cnn")
    # an array the function hands out is never removed
    assert cross_entropy(stmts, program, outputs | {"fc_lse"}) == stmts
    # a backward that is not exactly this loss's adjoints: nothing changes, forward
    # included (the forward's lse and picked values are what such a backward reads)
    for target, factor in (("d_fc_picked", 2), ("d_fc_lse", -1)):
        changed = [replace(s, op=Map(s.op.body.func(*((factor * s.op.body.args[0][0],
                                                       s.op.body.args[0][1]),
                                                      s.op.body.args[1])), s.op.views))
                   if s.target == target else s for s in stmts]
        assert cross_entropy(changed, program, outputs) == changed, target
    changed = [replace(s, op=Map(s.op.body + sp.Symbol("fc"), s.op.views))
               if s.target == "d_fc" else s for s in stmts]
    assert cross_entropy(changed, program, outputs) == changed


def test_the_pass_fires_on_the_gpt_heads() -> None:
    """Rank-3 logits [N, T, V] with int64 ids [N, T]."""
    stmts, program, outputs = _before("tiny_gpt")
    out = cross_entropy(stmts, program, outputs)
    ops = [s.op for s in out]
    assert sum(isinstance(op, NllLoss) for op in ops) == 1
    assert sum(isinstance(op, NllLossBackward) for op in ops) == 1
    (logp,) = [op for op in ops if isinstance(op, LogSoftmax)]
    assert logp.axis == 2


def _rows(rng, shape, classes, ignore):
    logits = torch.from_numpy(rng.normal(size=(*shape, classes)) * 3)
    ids = torch.from_numpy(rng.integers(0, classes, size=shape))
    ids.view(-1)[::3] = ignore
    return logits, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, ignore", [((7,), -100), ((3, 5), 2), ((4, 2), -1)])
def test_the_helpers_compute_torch_cross_entropy(tmp_path, dtype, shape, ignore) -> None:
    mods = example_modules(tmp_path, "cnn")
    rng = np.random.default_rng(0)
    logits, ids = _rows(rng, shape, 6, ignore)
    logits = logits.to(dtype).requires_grad_(True)
    want = F.cross_entropy(logits.reshape(-1, 6), ids.reshape(-1), ignore_index=ignore)
    (want_grad,) = torch.autograd.grad(want, logits)
    logp = torch.log_softmax(logits.detach(), -1)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    seed = torch.ones((), dtype=dtype)
    t = mods["torch"]
    got = t._nll_loss(logp, ids, ignore)
    grad = t._log_softmax_backward(t._nll_loss_backward(seed, logp, ids, ignore), logp,
                                   len(shape))
    assert got.dtype == dtype and grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol)
    n = mods["numpy"]
    lp, ix = logp.numpy(), ids.numpy()
    got = n._nll_loss(lp, ix, ignore)
    grad = n._log_softmax_backward(n._nll_loss_backward(seed.numpy(), lp, ix, ignore), lp,
                                   len(shape))
    assert np.asarray(got).dtype == lp.dtype and grad.dtype == lp.dtype
    np.testing.assert_allclose(got, want.item(), rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, want_grad.numpy(), rtol=tol, atol=tol)


def test_every_row_ignored_gives_nan_and_no_gradient_as_torch(tmp_path) -> None:
    mods = example_modules(tmp_path, "cnn")
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.full((4,), -100)
    want = F.cross_entropy(logits, ids)
    (want_grad,) = torch.autograd.grad(want, logits)
    assert torch.isnan(want) and not want_grad.any()
    logp = torch.log_softmax(logits.detach(), -1)
    t, n = mods["torch"], mods["numpy"]
    assert torch.isnan(t._nll_loss(logp, ids, -100))
    assert not t._nll_loss_backward(torch.ones((), dtype=torch.float64), logp, ids, -100).any()
    with np.errstate(invalid="ignore", divide="ignore"):
        assert np.isnan(n._nll_loss(logp.numpy(), ids.numpy(), -100))
    assert not n._nll_loss_backward(np.ones(()), logp.numpy(), ids.numpy(), -100).any()


def test_nll_loss_backward_is_differentiable_in_its_seed(tmp_path) -> None:
    """Double backward runs through the printed backward: the adjoint is linear in dL."""
    t = example_modules(tmp_path, "cnn")["torch"]
    logp = torch.log_softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    ids = torch.tensor([0, 3, -100, 1, 1])
    seed = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: t._nll_loss_backward(s, logp, ids, -100), (seed,))


TRANSPOSED = """
name: transposed_logits
inputs: {x: [N, T, 3]}
targets:
  y: {shape: [T, N], dtype: int64}
layers:
  - {name: h, type: dense, units: 4}
  - {name: zt, type: transpose, axes: [1, 0, 2], input: h}
loss: {type: softmax_cross_entropy, prediction: zt, target: y, ignore_index: 1}
"""


def test_logits_that_are_a_transposed_view_against_torch(tmp_build) -> None:
    """The logits [T, N, C] are a transpose of [N, T, C] (not row-major in memory): the
    numpy adjoint must still land in the rows the ids pick (it once came back as zeros)."""
    model, mods = tmp_build(TRANSPOSED)
    assert "_nll_loss_backward(" in model.source("numpy")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 3))
    y = rng.integers(0, 4, size=(5, 3))
    params = mods["numpy"].init_params(1)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = F.linear(torch.from_numpy(x), tp["h.weight"], tp["h.bias"]).permute(1, 0, 2)
    want = F.cross_entropy(h.reshape(-1, 4), torch.from_numpy(y).reshape(-1), ignore_index=1)
    want.backward()
    loss, grads = mods["numpy"].loss_and_grad(params, x=x, y=y)
    np.testing.assert_allclose(loss, want.item(), rtol=1e-12)
    for name, p in tp.items():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-10, atol=1e-14)
    t = mods["torch"]
    loss, grads = t.loss_and_grad({k: torch.from_numpy(v) for k, v in params.items()},
                                  x=torch.from_numpy(x), y=torch.from_numpy(y))
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
    for name, p in tp.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-14)
    m = t.Model(dtype=torch.float64)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    m(x=torch.from_numpy(x), y=torch.from_numpy(y)).backward()
    for name, p in tp.items():
        torch.testing.assert_close(m.get_parameter(name).grad, p.grad, rtol=1e-10, atol=1e-14)
