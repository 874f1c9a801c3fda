"""The layer-norm pass: a layer norm's statements as one fused kernel each way.

The pass replaces the dozen statements the chain rule leaves for a layer norm by
``torch.native_layer_norm`` / ``native_layer_norm_backward`` (numpy: one helper each)
only after checking, symbolically, that they compute exactly that. These tests check
that it fires where it should, that what it fires on is exact against torch's own
``F.layer_norm`` under autograd (first and second order, every argument), and that
statements which are not the layer norm the layer recorded are left as they were.
"""

from __future__ import annotations

import ast
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from symbackprop.api import compile_spec, compile_text
from symbackprop.emit.render import _lower, _with_leaves
from symbackprop.ir import passes
from symbackprop.ir.nodes import LayerNorm, LayerNormBackward

from conftest import EXAMPLES


def _calls(source: str, function: str, needle: str) -> int:
    tree = ast.parse(source)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    return ast.unparse(fn).count(needle)


def test_gpt_block_runs_torch_kernels_each_way() -> None:
    model = compile_spec(EXAMPLES / "gpt_block.yaml")
    torch_src, numpy_src = model.source("torch"), model.source("numpy")
    # _layer_norm / _layer_norm_backward: torch's native kernels, in one dtype
    assert _calls(torch_src, "_loss_forward", "_layer_norm(") == 2
    assert _calls(torch_src, "_loss_backward", "_layer_norm_backward(") == 2
    assert "torch.native_layer_norm(" in torch_src and "native_layer_norm_backward(" in torch_src
    # forward() and loss() need no statistics: torch's layer_norm itself
    assert _calls(torch_src, "forward", "torch.nn.functional.layer_norm(") == 2
    # numpy: its helpers, with every leaf's gradient (wrt=) and the input's
    assert _calls(numpy_src, "loss_and_grad", "_layer_norm_backward(") == 2
    # no trace of the derived variance or mean adjoints is left in the backward
    assert _calls(torch_src, "_loss_backward", "d_ln_1_var") == 0


SPEC = """
name: ln_{tag}
inputs: {{x: {shape}}}
targets: {{t: {tshape}}}
layers:
  - {{name: ln, type: layernorm{options}}}
  - {{name: out, type: dense, units: 3}}
loss: {{type: mse, target: t}}
"""

VARIANTS = {
    "plain": ("[N, 4]", ""),
    "no-bias": ("[N, 4]", ", bias: false, eps: 0.001"),
    "frozen-weight": ("[N, 2, 4]", ", trainable: {weight: false}"),
    "rank-4": ("[N, 2, 3, 4]", ""),
}


def _twin(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor,
          bias: bool, eps: float) -> torch.Tensor:
    h = F.layer_norm(x, x.shape[-1:], params["ln.weight"],
                     params["ln.bias"] if bias else None, eps)
    return ((F.linear(h, params["out.weight"], params["out.bias"]) - t) ** 2).mean()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_layer_norm_matches_torch_first_and_second_order(tmp_build, variant) -> None:
    """Every gradient, the input's too, and a second derivative, in float64 against
    F.layer_norm under torch autograd; numpy's loss_and_grad(wrt=...) likewise."""
    shape, options = VARIANTS[variant]
    text = SPEC.format(tag=variant.replace("-", "_"), shape=shape, options=options,
                       tshape=shape.replace("4]", "3]"))
    model, mods = tmp_build(text)
    source = model.source("torch")
    assert _calls(source, "_loss_backward", "_layer_norm_backward(") == 1, variant
    bias, eps = "bias: false" not in options, 1e-3 if "eps" in options else 1e-5
    rng = np.random.default_rng(3)
    dims = [5 if d == "N" else int(d) for d in shape.strip("[]").split(", ")]
    x = rng.normal(size=dims)
    t = rng.normal(size=(*dims[:-1], 3))
    tm = mods["torch"]
    net = tm.Model(seed=1, dtype=torch.float64)
    with torch.no_grad():  # weights away from their ones/zeros init
        for p in net.parameters():
            p.add_(torch.from_numpy(rng.normal(size=p.shape)) * 0.3)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    xt = torch.from_numpy(x).requires_grad_()
    tt = torch.from_numpy(t)
    trained = [k for k, v in net.named_parameters() if v.requires_grad]
    ref = _twin(params, xt, tt, bias, eps)
    ref_grads = torch.autograd.grad(ref, [xt, *(params[k] for k in trained)],
                                    create_graph=True)
    xg = torch.from_numpy(x).requires_grad_()
    loss = net(x=xg, t=tt)
    mine = dict(net.named_parameters())
    got_grads = torch.autograd.grad(loss, [xg, *(mine[k] for k in trained)],
                                    create_graph=True)
    assert abs(loss.item() - ref.item()) <= 1e-13 * abs(ref.item())
    for got, want in zip(got_grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-11, atol=1e-13)
    # a second derivative: through the recomputed generated backward
    ref2 = torch.autograd.grad(sum((g ** 2).sum() for g in ref_grads), xt)[0]
    got2 = torch.autograd.grad(sum((g ** 2).sum() for g in got_grads), xg)[0]
    assert torch.allclose(got2, ref2, rtol=1e-10, atol=1e-12)
    # numpy, every leaf asked for
    np_params = {k: v.detach().numpy() for k, v in net.named_parameters()}
    wrt = ["x", *trained]
    np_loss, np_grads = mods["numpy"].loss_and_grad(np_params, x=x, t=t, wrt=wrt)
    assert abs(np_loss - ref.item()) <= 1e-13 * abs(ref.item())
    named = dict(zip(wrt, ref_grads, strict=True))
    for name in wrt:
        np.testing.assert_allclose(np_grads[name], named[name].detach().numpy(),
                                   rtol=1e-11, atol=1e-13)


def _statements(model, tamper=None):  # noqa: ANN001, ANN202
    full = _with_leaves(model.derivation)
    program = _lower(full, seed_argument=True)
    if tamper is not None:
        program.layer_norms = tamper(program.layer_norms)
    graph = model.derivation.graph
    outputs = [graph.loss, *full.leaf_grads.values()]
    return passes.function(program, outputs)


def test_statements_that_are_not_the_recorded_layer_norm_are_left_alone() -> None:
    """A record that does not match the statements (another eps, weight and bias
    swapped, another input) fires nothing for that layer norm; the other still fires."""
    model = compile_spec(EXAMPLES / "gpt_block.yaml")

    def fused(stmts) -> set[str]:  # noqa: ANN001
        return {s.target for s in stmts if isinstance(s.op, LayerNorm)}

    assert fused(_statements(model)) == {"ln_1", "ln_2"}
    tampers = [
        lambda g: dict(g, ln_1=(*g["ln_1"][:5], 1e-3)),
        lambda g: dict(g, ln_1=(*g["ln_1"][:3], g["ln_1"][4], g["ln_1"][3], g["ln_1"][5])),
        lambda g: dict(g, ln_1=("res1", *g["ln_1"][1:])),
        lambda g: dict(g, ln_1=(g["ln_1"][0], g["ln_1"][2], g["ln_1"][1], *g["ln_1"][3:])),
    ]
    for tamper in tampers:
        stmts = _statements(model, tamper)
        assert fused(stmts) == {"ln_2"}
        backward = [s for s in stmts if isinstance(s.op, LayerNormBackward)]
        assert [s.op.src for s in backward] == ["res1"]


def test_a_backward_that_is_not_the_layer_norms_keeps_the_derived_statements() -> None:
    """Where the input's adjoint does not check out (here: its statement's terms
    changed), the forward still fuses (no statistics kept) and the backward stays as
    derived, reading the mean and variance the forward then still computes."""
    model = compile_spec(EXAMPLES / "gpt_block.yaml")
    full = _with_leaves(model.derivation)
    program = _lower(full, seed_argument=True)
    graph = model.derivation.graph
    # scale the derived d_x by 2 before the passes run: no longer the layer norm's
    program.stmts = [replace(s, op=replace(s.op, body=2 * s.op.body))
                     if s.target == "d_x" else s for s in program.stmts]
    stmts = passes.function(program, [graph.loss, *full.leaf_grads.values()])
    ln_1 = next(s for s in stmts if s.target == "ln_1")
    assert isinstance(ln_1.op, LayerNorm) and not ln_1.op.stats and not ln_1.also
    assert not any(isinstance(s.op, LayerNormBackward) and s.op.src == "x" for s in stmts)
    assert {"ln_1_mean", "ln_1_var"} <= {s.target for s in stmts}


def test_layer_norm_output_fused_into_its_reader_is_exact(tmp_build) -> None:
    """A layer norm whose output an elementwise formula reads: whatever the pass does
    with it, the gradients are F.layer_norm's."""
    model, mods = tmp_build("""
name: ln_then_formula
inputs: {x: [N, 4]}
targets: {t: [N, 4]}
layers:
  - {name: ln, type: layernorm}
  - {name: y, type: elementwise, formula: "ln * tanh(ln)"}
loss: {type: mse, target: t}
""")
    net = mods["torch"].Model(seed=2, dtype=torch.float64)
    with torch.no_grad():
        net.ln.weight.add_(0.5)
        net.ln.bias.add_(-0.25)
    x, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    loss = net(x=x, t=t)
    loss.backward()
    w = net.ln.weight.detach().clone().requires_grad_()
    b = net.ln.bias.detach().clone().requires_grad_()
    h = F.layer_norm(x, (4,), w, b, 1e-5)
    ref = ((h * torch.tanh(h) - t) ** 2).mean()
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-13)
    assert torch.allclose(net.ln.weight.grad, w.grad, rtol=1e-11, atol=1e-13)
    assert torch.allclose(net.ln.bias.grad, b.grad, rtol=1e-11, atol=1e-13)


def test_compile_text_keeps_the_records_per_model() -> None:
    """Two models compiled in one process: each program records its own layer norms."""
    one = compile_text(SPEC.format(tag="a", shape="[N, 4]", options="", tshape="[N, 3]"))
    two = compile_text(SPEC.format(tag="b", shape="[N, 3]", options=", bias: false",
                                   tshape="[N, 3]"))
    a = _lower(_with_leaves(one.derivation), seed_argument=True).layer_norms
    b = _lower(_with_leaves(two.derivation), seed_argument=True).layer_norms
    assert a == {"ln": ("x", "ln_mean", "ln_var", "ln_weight", "ln_bias", 1e-5)}
    assert b == {"ln": ("x", "ln_mean", "ln_var", "ln_weight", "", 1e-5)}


def test_the_canonical_form_keeps_a_column_sum_inside_a_row_sum() -> None:
    """Along a row a column sum varies (one value per feature): rowsum(colsum(g) x) is
    not colsum(g) rowsum(x), and the pass's equality must not say it is; a row sum along
    a row is a constant, and one that is taken out is."""
    from symbackprop.ir.nodes import Program
    from symbackprop.ir.passes.layer_norm import COLSUM, ROWSUM, _Evaluator, _same

    ev = _Evaluator([], Program([], {}), {"x": "full", "g": "full", "w": "feat"}, 2, 4)
    x, g, w = (ev.symbols[n] for n in ("x", "g", "w"))
    assert not _same(ROWSUM(COLSUM(g) * x), COLSUM(g) * ROWSUM(x), ev)
    assert not _same(ROWSUM(w * x), w * ROWSUM(x), ev)
    assert _same(ROWSUM(ROWSUM(g) * x), ROWSUM(g) * ROWSUM(x), ev)
    assert _same(ROWSUM(ROWSUM(g)), 4 * ROWSUM(g), ev)
