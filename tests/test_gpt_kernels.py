"""Speed spellings met in the GPT examples compute what the plain expressions would.

Each is compared with the expression it replaces, on awkward values (signs, zeros,
overflow, -inf rows where a mask reaches them).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp
import torch
from test_gpt import Block, _randomise

from symbackprop.emit.printers import NumpyCodePrinter
from symbackprop.ir.nodes import (
    Assign,
    Einsum,
    Map,
    Program,
    Softmax,
    SoftmaxBackward,
    Stack,
    View,
    ordered,
)
from symbackprop.ir.passes import softmax_backward, stacked

from conftest import example_modules


def test_numpy_prints_small_integer_powers_of_an_array_as_products() -> None:
    """numpy's power ufunc calls pow() per element for x**3 (milliseconds for a GELU's
    65536 entries); the product is the same number to within rounding, inf and NaN
    included."""
    printer = NumpyCodePrinter()
    x = sp.Symbol("x")
    assert printer.doprint(x**3) == "(x*x*x)"
    assert printer.doprint(x**4) == "(x*x*x*x)"
    assert printer.doprint(x**-3) == "1/x**3"  # unchanged (rare; not worth a rule)
    # as a divisor the product keeps its brackets: a/x*x*x would be a*x
    a = sp.Symbol("a")
    assert printer.doprint(a / x**3) == "a/(x*x*x)"
    assert printer.doprint(a * x**3) == "a*(x*x*x)"
    assert printer.doprint(x**2) == "x**2"  # numpy squares fast already
    assert printer.doprint((x + 1)**3) == "(x + 1)**3"  # never evaluated twice
    assert printer.doprint(x**5) == "x**5"
    values = np.array([0.0, -0.0, 1.5, -2.25, 1e-30, 3e12, -3e12, 1e103, np.inf, -np.inf,
                       np.nan], dtype=np.float64)
    for dtype in (np.float32, np.float64):
        big = np.isfinite(values) & (np.abs(values) > np.finfo(dtype).max)
        v = values[~big].astype(dtype)
        with np.errstate(all="ignore"):
            for n in (3, 4):
                got = eval(printer.doprint(x**n), {"x": v, "numpy": np})  # noqa: S307
                want = v**n
                assert got.dtype == want.dtype
                np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps)


# -- softmax backward ---------------------------------------------------------------------

def _sb_program(d_body: str) -> tuple[list, Program]:
    """s = sum(y*g, last axis); l = -s; d = <d_body> over y, g and l broadcast."""
    r = 3
    y, g, lb = sp.symbols("y g l_b")
    shapes = {"y": (2, 3, 4), "g": (2, 3, 4), "s": (2, 3), "l": (2, 3), "d": (2, 3, 4)}
    ident = {n: View(n, (None,) * r, tuple(range(r)), r) for n in ("y", "g")}
    stmts = [
        Assign("s", Einsum("abc,abc->ab", ("y", "g")), phase="backward"),
        Assign("l", Map(-sp.Symbol("s"), ((sp.Symbol("s"), View("s", (None, None), (0, 1), 2)),)),
               phase="backward"),
        Assign("d", Map(eval(d_body, {"y": y, "g": g, "l": lb}),  # noqa: S307
                        ordered({y: ident["y"], g: ident["g"],
                                 lb: View("l", (None, None), (0, 1), r)})), phase="backward"),
    ]
    return stmts, Program(stmts, shapes)


def test_softmax_backward_pass_forms_one_call_only_for_the_exact_expression() -> None:
    stmts, program = _sb_program("y*g + y*l")
    out = softmax_backward(stmts, program, {"d"})
    assert [s.target for s in out] == ["d"]
    assert out[0].op == SoftmaxBackward("g", "y", 2)
    assert "dL" not in out[0].comment and "softmax backward" in out[0].comment
    # the same rows, written as y*(g - s)
    stmts, program = _sb_program("y*(g + l)")
    assert softmax_backward(stmts, program, {"d"})[-1].op == SoftmaxBackward("g", "y", 2)
    # the row sum is symmetric: g*(y - s) is the rule with the roles swapped
    stmts, program = _sb_program("y*g + g*l")
    assert softmax_backward(stmts, program, {"d"})[-1].op == SoftmaxBackward("y", "g", 2)
    # anything else stays as it is: another factor, the other array outside, s kept
    for other in ("y*g + 2*y*l", "y*y + y*l", "g*g + y*l", "y*g + y*l + y"):
        stmts, program = _sb_program(other)
        assert softmax_backward(stmts, program, {"d"}) == stmts, other
    stmts, program = _sb_program("y*g + y*l")
    assert softmax_backward(stmts, program, {"d", "l"}) == stmts  # l is an output


def _masked_softmax_program(forward_mask: str, backward_mask: str) -> tuple[list, Program]:
    """m = where(c, a, -inf); y = softmax(m); d = softmax_backward(g, y); da = where(c', d, 0)."""
    r, sym = 2, sp.Symbol
    ident = {n: View(n, (None, None), (0, 1), r) for n in ("a", "g", "c", "k", "d")}
    a, c, k, d = sym("a"), sym("c"), sym("k"), sym("d")
    cf, cb = {"c": c, "k": k}[forward_mask], {"c": c, "k": k}[backward_mask]
    stmts = [
        Assign("m", Map(sp.Piecewise((a, cf), (-sp.oo, True)),
                        ordered({a: ident["a"], cf: ident[forward_mask]}))),
        Assign("y", Softmax("m", 1)),
        Assign("d", SoftmaxBackward("g", "y", 1), phase="backward"),
        Assign("da", Map(sp.Piecewise((d, cb), (0, True)),
                         ordered({d: ident["d"], cb: ident[backward_mask]})),
               phase="backward"),
    ]
    return stmts, Program(stmts, {n: (sp.Integer(3), sp.Integer(3))
                                  for n in ("a", "g", "c", "k", "d", "m", "y", "da")})


def test_the_adjoint_of_a_masked_softmax_is_not_masked_again() -> None:
    """where(c, softmax_backward(g, y), 0) is softmax_backward(g, y) itself when y is the
    softmax of where(c, a, -inf): y, and so the product, is already 0 where c is false.
    With another mask the where stays."""
    stmts, program = _masked_softmax_program("c", "c")
    out = softmax_backward(stmts, program, {"da"})
    assert out[-1].target == "da" and out[-1].op == Map(sp.Symbol("d"), (
        (sp.Symbol("d"), View("d", (), (), 0)),))
    assert "not applied again" in out[-1].comment
    stmts, program = _masked_softmax_program("c", "k")
    assert softmax_backward(stmts, program, {"da"}) == stmts


def _plain(g, y):
    return y * g + y * (-(y * g).sum(-1))[..., None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_backward_kernels_match_the_product(tmp_path, dtype) -> None:
    """numpy's helper and torch's aten kernel against the expression they replace, with
    masked rows (y exactly 0 where a causal mask put -inf before the softmax)."""
    mods = example_modules(tmp_path, "gpt_block")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2, 5, 5)) * 4
    a[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] = -np.inf
    y = np.exp(a - a.max(-1, keepdims=True))
    y = (y / y.sum(-1, keepdims=True)).astype(dtype)
    g = rng.normal(size=y.shape).astype(dtype)
    want = _plain(g.astype(np.float64), y.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-13
    got = mods["numpy"]._softmax_backward(g, y, 3)
    assert got.dtype == dtype and np.all(got[y == 0] == 0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    tg, ty = torch.from_numpy(g), torch.from_numpy(y)
    got = mods["torch"]._softmax_backward(tg, ty, 3)
    assert got.dtype == tg.dtype
    np.testing.assert_allclose(got.numpy(), want, rtol=tol, atol=tol)
    # autocast may hand a bfloat16 adjoint with a float32 softmax: the wider one wins
    mixed = mods["torch"]._softmax_backward(tg.to(torch.bfloat16), ty.float(), 3)
    assert mixed.dtype == torch.float32
    np.testing.assert_allclose(mixed.numpy(), want, rtol=2e-2, atol=2e-2)


def test_gpt_block_uses_the_softmax_backward_and_batched_products(tmp_path) -> None:
    mods = example_modules(tmp_path, "gpt_block")
    for backend, mod in mods.items():
        text = open(mod.__file__).read()
        assert text.count("_softmax_backward(d_attn_p, attn_p, 3)") >= 1, backend
        assert "'abcd,abcd->abc'" not in text, backend  # the row sum is gone
    torch_text = open(mods["torch"].__file__).read()
    assert "attn_q @ attn_k.transpose(-2, -1)" in torch_text
    assert "torch.einsum('abcd,abde->abce'" not in torch_text
    # q, k and v: one product against all of c_attn (and one for the input's gradient);
    # the weight's gradient is one product with the stacked adjoints, made once
    for backend, mod in mods.items():
        text = open(mod.__file__).read()
        body = text[text.index("def loss_and_grad("):]
        code = [line for line in body[:body.index("\ndef ")].splitlines()
                if not line.lstrip().startswith("#")]
        stacks = [line for line in code if ".stack([d_attn_q, d_attn_k, d_attn_v]" in line]
        assert len(stacks) == 1, backend
        stack = stacks[0].split("=")[0].strip()
        products = [line for line in code if re.search(r"einsum\(|tensordot\(", line)]
        assert sum(bool(re.search(r"\battn_w\b", line)) for line in products) == 2, backend
        assert sum(stack in line for line in products) == 2, backend


def test_gpt_block_second_derivative_through_the_kernels(tmp_path) -> None:
    """create_graph=True records the generated backward (softmax backward kernel, batched
    products): a Hessian-vector product agrees with the torch twin's, float64."""
    mods = example_modules(tmp_path, "gpt_block")
    twin = Block(32, 4).double()
    _randomise(twin, 3)
    model = mods["torch"].Model(dtype=torch.float64)
    model.load_state_dict(twin.state_dict())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64)
    name = "attn.c_attn.weight"
    direction = torch.randn(96, 32, generator=gen, dtype=torch.float64)

    def hvp(module, loss_fn):
        weight = dict(module.named_parameters())[name]
        (grad,) = torch.autograd.grad(loss_fn(), weight, create_graph=True)
        (second,) = torch.autograd.grad((grad * direction).sum(), weight)
        return grad.detach(), second

    grad, second = hvp(model, lambda: model(x=x, t=t))
    want_grad, want = hvp(twin, lambda: torch.nn.functional.mse_loss(twin(x), t))
    assert torch.allclose(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert float((second - want).abs().max()) <= 1e-9 * float(want.abs().max())


# -- products against the parts of a stacked array ----------------------------------------

def _ident(name: str, rank: int) -> tuple[sp.Symbol, View]:
    view = View(name, (None,) * rank, tuple(range(rank)), rank)
    return view.placeholder(), view


def _part(name: str, j: int) -> Assign:
    view = View("w", (j, None, None), (0, 1), 2)
    return Assign(name, Map(view.placeholder(), ((view.placeholder(), view),)))


def _stacked_program(parts: int) -> tuple[list[Assign], Program]:
    """Forward: e_j = x w[j]ᵀ; backward: dw = stack(d_jᵀ x), dx = Σ_j d_j w[j]."""
    shapes = {"w": (sp.Integer(3), 4, 5), "x": (2, 5), **{f"d{j}": (2, 4) for j in range(3)}}
    stmts: list[Assign] = []
    for j in range(parts):
        stmts += [_part(f"p{j}", j), Assign(f"e{j}", Einsum("ac,bc->ab", ("x", f"p{j}")))]
        sym, view = _ident(f"e{j}", 2)
        stmts.append(Assign(f"o{j}", Map(2 * sym, ((sym, view),))))
    for j in range(parts):
        stmts.append(Assign(f"g{j}", Einsum("ab,ac->bc", (f"d{j}", "x")), phase="backward"))
    stmts.append(Assign("dw", Stack(tuple(f"g{j}" for j in range(parts)), 0), phase="backward"))
    terms = {}
    for j in range(parts):
        stmts += [_part(f"q{j}", j),
                  Assign(f"h{j}", Einsum("ab,bc->ac", (f"d{j}", f"q{j}")), phase="backward")]
        terms.update([_ident(f"h{j}", 2)])
    sym, view = _ident("x", 2)
    terms[sym] = view
    stmts.append(Assign("dx", Map(sp.Add(*terms), ordered(terms)), "dL/dx", phase="backward"))
    return stmts, Program(stmts, shapes)


def test_products_against_every_part_become_one_product() -> None:
    stmts, program = _stacked_program(3)
    out = stacked(stmts, program, {"o0", "o1", "o2", "dw", "dx"})
    by = {s.target: s.op for s in out}
    products = [s for s in out if isinstance(s.op, Einsum)]
    assert [p.op.subscripts for p in products] == ["ac,dbc->dab", "dab,ac->dbc",
                                                   "dab,dbc->ac"]
    assert products[0].op.operands == ("x", "w")
    (stack,) = [s for s in out if isinstance(s.op, Stack)]  # one stack, used twice
    assert stack.op == Stack(("d0", "d1", "d2"), 0)
    assert by["dw"].operands == (stack.target, "x")
    # dx keeps its other term and adds the one product; its comment stays
    dx = next(s for s in out if s.target == "dx")
    assert isinstance(dx.op, Map) and "dL/dx" in "".join(s.comment for s in out)
    assert {v.src for _, v in dx.op.views} == {"x", products[2].target}
    assert not {f"p{j}" for j in range(3)} & set(by)  # the part views are gone
    assert by["e1"] == Map(*_view_of(products[0].target, 1))


def _view_of(name: str, j: int) -> tuple[sp.Symbol, tuple]:
    view = View(name, (j, None, None), (0, 1), 2)
    return view.placeholder(), ((view.placeholder(), view),)


def test_products_against_some_parts_stay_as_they_are() -> None:
    """Parts 0 and 1 of 3: one product against all of w would waste a third (a stack of
    like products is one product whatever the parts: dw still changes)."""
    stmts, program = _stacked_program(2)
    out = stacked(stmts, program, {"o0", "o1", "dw", "dx"})
    kept = {s.target: s for s in stmts if s.target[0] in "peqhx" or s.target == "dx"}
    assert [s for s in out if s.target in kept] == list(kept.values())


@pytest.mark.parametrize("subscripts, shapes", [
    ("a,bca->bc", [(4,), (2, 3, 4)]),
    ("bca,a->bc", [(2, 3, 4), (4,)]),
    ("abc,abd->cd", [(2, 3, 4), (2, 3, 5)]),
    ("abc,abd->dc", [(2, 3, 4), (2, 3, 5)]),
    ("abc,dbec->dea", [(4, 2, 3), (5, 2, 6, 3)]),
    ("abc,fdec->fadbe", [(2, 3, 4), (3, 2, 5, 4)]),
    ("fabc,fdaeb->dec", [(3, 2, 4, 5), (3, 6, 2, 7, 4)]),
    ("ab,bc->ac", [(2, 3), (3, 4)]),
    ("ab,cd->abcd", [(2, 3), (4, 5)]),        # no summed letter: einsum stays
    ("abc,abd->abcd", [(2, 3, 4), (2, 3, 5)]),  # batch letters: einsum stays
    ("abc,ad->bd", [(2, 3, 4), (2, 5)]),        # c summed in one operand only: einsum
])
def test_two_array_products_print_as_tensordot_or_matmul(subscripts, shapes) -> None:
    """Products without batch axes skip einsum's planning; the numbers are einsum's."""
    from symbackprop.emit.arrays import NumpyArrayPrinter, TorchArrayPrinter

    rng = np.random.default_rng(0)
    arrays = {f"a{n}": rng.normal(size=s) for n, s in enumerate(shapes)}
    op = Einsum(subscripts, tuple(arrays))
    want = np.einsum(subscripts, *arrays.values())
    program = Program([], {})
    # the torch module's _tensordot / _einsum pass arrays of one dtype as they are
    helpers = {"_tensordot": lambda a, b, dims: torch.tensordot(a, b, dims=dims),
               "_einsum": torch.einsum}
    for printer, wrap, module in ((NumpyArrayPrinter(program), np.asarray, {"numpy": np}),
                                  (TorchArrayPrinter(program), torch.from_numpy,
                                   {"torch": torch, **helpers})):
        code = printer.einsum(op)
        stays = subscripts in ("ab,cd->abcd", "abc,abd->abcd", "abc,ad->bd")
        assert ("einsum(" in code) == stays, code
        got = eval(code, {**module, **{k: wrap(v) for k, v in arrays.items()}})  # noqa: S307
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


# -- GPT-2's tanh GELU ----------------------------------------------------------------------

GELU_SPEC = """name: g
inputs: {{x: [N, 3]}}
targets: {{t: [N, 2]}}
layers:
  - {{name: fc, type: dense, units: 4, activation: {act}}}
  - {{name: out, type: dense, units: 2}}
loss: {{type: mse, target: t}}
"""


def test_gelu_tanh_prints_as_torch_gelu_kernels_only_for_the_exact_formula(tmp_build) -> None:
    _, mods = tmp_build(GELU_SPEC.format(act="gelu_tanh"))
    text = open(mods["torch"].__file__).read()
    assert 'torch.nn.functional.gelu(fc_z, approximate="tanh")' in text
    assert 'torch.ops.aten.gelu_backward(d_fc, fc_z, approximate="tanh")' in text
    assert "torch.tanh(" not in text.split("def loss_and_grad(")[1].split("\ndef ")[0]
    # numpy prints the formula and sympy's derivative (numpy's tanh is fast)
    assert "numpy.tanh(" in open(mods["numpy"].__file__).read()
    # a constant off in the sixth digit is another function: left as derived
    near = 'formula: "x/2*(1 + tanh(0.7978845608*(x + 0.044716*x**3)))"'
    _, other = tmp_build(GELU_SPEC.format(act="{" + near + "}"))
    other_text = open(other["torch"].__file__).read()
    assert "functional.gelu(" not in other_text and "gelu_backward" not in other_text
    assert "_tanh(" in other_text.split("def loss_and_grad(")[1].split("\ndef ")[0]


def test_gelu_pass_leaves_a_condition_on_a_tanh_alone(tmp_path) -> None:
    """A where() whose condition reads tanh (the mask is a boolean array of its own) is
    no GELU: generation used to fail comparing the condition with the formula."""
    from symbackprop.cli import main

    spec = tmp_path / "cond.yaml"
    spec.write_text("""
name: cond
inputs: {x: [N, 2]}
targets: {t: [N, 2]}
layers:
  - {name: in1, type: elementwise, input: [x], formula: "x + tanh(x)"}
  - {name: act, type: activation, activation: {formula: 'where(x > 0, x, 2*x)'}}
  - {name: fc, type: dense, units: 2}
loss: {type: mse, target: t}
""", encoding="utf-8")
    assert main(["check", str(spec)]) == 0


def test_gelu_kernels_match_the_formula_and_its_derivative(tmp_build) -> None:
    """torch's gelu / gelu_backward against numpy's printing of the formula and of sympy's
    derivative, float64, far into both tails."""
    _, mods = tmp_build(GELU_SPEC.format(act="gelu_tanh"))
    rng = np.random.default_rng(1)
    params = mods["numpy"].init_params(3)
    x = np.concatenate([rng.normal(size=(6, 3)) * 3, [[30.0, -30.0, 0.0], [-8.0, 8.0, 1e-8]]])
    t = rng.normal(size=(8, 2))
    loss, grads = mods["numpy"].loss_and_grad(params, x=x, t=t)
    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    tloss, tgrads = mods["torch"].loss_and_grad(tparams, x=torch.from_numpy(x),
                                                t=torch.from_numpy(t))
    assert abs(float(tloss) - loss) <= 1e-13 * abs(loss)
    for name, g in grads.items():
        np.testing.assert_allclose(tgrads[name].numpy(), g, rtol=1e-10, atol=1e-14)
