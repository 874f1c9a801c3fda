"""``latex --program``: the generated statements as equations, printed from the array IR.

The LaTeX printer of the IR sits beside the numpy and torch printers: each statement of
the generated ``loss_and_grad`` becomes one equation with the code's names. These tests
hold the printed rows against the generated module (same statements, same order), pin
the notation of every op type on hand-built statements (index order, transposes,
windows, scatters), and compile and render the section.
"""

from __future__ import annotations

import ast
import math
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from test_latex import _NAMESPACE, _pdflatex, evaluate, evaluate_tensor
from test_registry_gradients import CASES

import symbackprop
from symbackprop import latex
from symbackprop.api import compile_spec
from symbackprop.check import call_args, random_batch
from symbackprop.cli import main
from symbackprop.emit.render import render
from symbackprop.ir import nodes
from symbackprop.ir.lower import gradient_statements
from symbackprop.ir.nodes import (
    Assign,
    Conv,
    DenseKernel,
    Einsum,
    Gather,
    Iota,
    Linear,
    LogSoftmax,
    Map,
    MatMul,
    MaxPool,
    MaxPoolBackward,
    NllLoss,
    NllLossBackward,
    Program,
    Reduce,
    Reshape,
    ScatterAdd,
    Slide,
    SoftmaxBackward,
    Stack,
    TakeAt,
    View,
    Window,
    WindowAdd,
)
from symbackprop.latex.program import ProgramPrinter

from conftest import EXAMPLES, build, example_modules

N = sp.Symbol("N", integer=True, positive=True)


def test_every_op_type_has_a_latex_form() -> None:
    """A new IR op without an equation fails here, not in a user's document."""
    for op in typing.get_args(nodes.Op):
        assert hasattr(ProgramPrinter, "_" + op.__name__), op.__name__


def _torch_lag_targets(source: str) -> list[str]:
    """The arrays the torch module's loss_and_grad assigns inside its no_grad block."""
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
              and n.name == "loss_and_grad")
    block = next(n for n in fn.body if isinstance(n, ast.With))
    # a statement with several results (a layer norm) unpacks a tuple: its names, in
    # order, but "_" (a result not asked for)
    return [n.id for stmt in block.body if isinstance(stmt, ast.Assign)
            for t in stmt.targets
            for n in (t.elts if isinstance(t, ast.Tuple) else [t])
            if isinstance(n, ast.Name) and n.id != "_"]


def _row_names(doc: latex.Document) -> list[str]:
    names = []
    for block in doc.program:
        if isinstance(block, latex.Display):
            for lhs, _ in block.rows:
                found = re.match(r"\\mathtt\{([^}]*)\}", lhs)
                assert found, lhs
                names.append(found.group(1).replace(r"\_", "_"))
    return names


@pytest.mark.parametrize("name", ["seed_mlp", "mlp_classifier", "multitask", "cnn",
                                  "gpt_block"])
def test_rows_are_the_generated_statements(name: str) -> None:
    spec = EXAMPLES / f"{name}.yaml"
    doc = symbackprop.derive(spec, program=True)
    model = compile_spec(spec)
    source = render(model.spec, model.derivation, "torch", model.label, derivations=False)
    assert _row_names(doc) == _torch_lag_targets(source)
    text = doc.markdown()
    assert "## The computation as generated" in text
    assert text == symbackprop.derive(spec, program=True).markdown()  # byte-deterministic


def test_program_section_only_when_asked() -> None:
    doc = symbackprop.derive(EXAMPLES / "seed_mlp.yaml")
    assert doc.program == []
    assert "computation as generated" not in doc.markdown()


def _program(shapes: dict[str, tuple[sp.Expr, ...]], *stmts: Assign) -> list[tuple[str, str]]:
    printer = ProgramPrinter(Program(list(stmts), shapes), list(stmts))
    return [row for s in stmts for row in printer.rows(s)]


def _tt(name: str, *idx: str) -> str:
    base = r"\mathtt{" + name.replace("_", r"\_") + "}"
    return base + (f"_{{{','.join(idx)}}}" if idx else "")


I0, I1, I2, I3 = (f"i_{{{n}}}" for n in range(4))
S0, S1, S2, S3 = (f"s_{{{n}}}" for n in range(4))


def test_matmul_transposes_and_bias() -> None:
    shapes = {"x": (N, 4), "w": (3, 4), "b": (3,), "g": (N, 3), "z": (N, 3), "gw": (3, 4)}
    rows = _program(
        shapes,
        Assign("z", Linear(MatMul("x", "w", tb=True), View("b", (None,), (1,), 2))),
        Assign("gw", MatMul("g", "x", ta=True)))
    # z[n, o] = sum_k x[n, k] w[o, k] + b[o]; gw[o, k] = sum_n g[n, o] x[n, k]
    assert rows[0] == (_tt("z", I0, I1),
                       rf"= \sum_{{{S0}}} {_tt('w', I1, S0)} {_tt('x', I0, S0)} + "
                       f"{_tt('b', I1)}")
    assert rows[1] == (_tt("gw", I0, I1), rf"= \sum_{{{S0}}} {_tt('g', S0, I0)} "
                                          f"{_tt('x', S0, I1)}")


def test_views_pick_broadcast_and_gather() -> None:
    shapes = {"a": (N, 2, 5), "ids": (N, 3), "e": (7, 5), "y": (N, 5), "r": (N, 3, 5)}
    a_row = View("a", (None, 1, None), (0, 1), 2)  # a[n, 1, d]
    rows = _program(
        shapes,
        Assign("y", Map(sp.exp(sp.Symbol("A")), ((sp.Symbol("A"), a_row),))),
        Assign("r", Map(sp.Symbol("E"), ((sp.Symbol("E"), Gather("e", "ids", (0, 1), (2,), 3)),))))
    assert rows[0] == (_tt("y", I0, I1), rf"= \exp\left({_tt('a', I0, '1', I1)}\right)")
    assert rows[1] == (_tt("r", I0, I1, I2),
                       f"= {_tt('e', _tt('ids', I0, I1), I2)}")


def test_windows_and_their_adjoint() -> None:
    # x[n, c, 2*i + k - 1]: a stride-2 window of 3 taps with padding 1
    slide = Slide(place=2, kernel_place=3, stride=2, pad=1, count=4, size=3)
    shapes = {"x": (N, 2, 8), "u": (N, 2, 4, 3), "g": (N, 2, 4, 3), "dx": (N, 2, 8)}
    rows = _program(
        shapes,
        Assign("u", Map(sp.Symbol("X"), ((sp.Symbol("X"), Window("x", (None, None, None),
                                                                 (0, 1, slide), 4)),))),
        Assign("dx", WindowAdd("g", (N, 2, 8), ((2, 2, 1, 4, 3),))))
    assert rows[0] == (_tt("u", I0, I1, I2, I3), f"= {_tt('x', I0, I1, f'2 {I2} + {I3} - 1')}")
    assert rows[1] == (_tt("dx", I0, I1, I2),
                       rf"= \sum_{{{S0},{S1}}} {_tt('g', I0, I1, S0, S1)} "
                       rf"\left[2 {S0} + {S1} - 1 = {I2}\right]")


def test_reductions_scatter_and_stack() -> None:
    shapes = {"z": (N, 4), "lse": (N,), "m": (N,), "ids": (N,), "v": (N, 5), "e": (9, 5),
              "p": (N, 4), "q": (N, 4), "st": (3, N, 4), "cnt": ()}
    z = sp.Symbol("Z")
    zv = ((z, View("z", (), (), 2)),)
    rows = _program(
        shapes,
        Assign("lse", Reduce("logsumexp", z, zv, (1,), 2)),
        Assign("m", Reduce("max", z, zv, (1,), 2)),
        Assign("cnt", Reduce("count", sp.StrictGreaterThan(z, 0), zv, (0, 1), 2)),
        Assign("e", ScatterAdd("v", "ids", (9, 5))),
        Assign("st", Stack(("p", None, "q"), 0)))
    assert rows[0][1] == rf"= \log \sum_{{{S0}}} \exp\left({_tt('z', I0, S0)}\right)"
    assert rows[1][1] == rf"= \max_{{{S0}}} {_tt('z', I0, S0)}"
    assert rows[2] == (_tt("cnt"), rf"= \sum_{{{S0},{S1}}} \left[{_tt('z', S0, S1)} > 0\right]")
    # e[r, d] = sum over the examples whose id is r of v[n, d]
    assert rows[3][1] == (rf"= \sum_{{{S0}}} {_tt('v', S0, I1)} "
                          rf"\left[{_tt('ids', S0)} = {I0}\right]")
    assert rows[4][1] == (rf"= \begin{{cases}} {_tt('p', I1, I2)} & \text{{if }} {I0} = 0 \\ "
                          rf"0 & \text{{if }} {I0} = 1 \\ "
                          rf"{_tt('q', I1, I2)} & \text{{if }} {I0} = 2 \end{{cases}}")


def test_kernels_as_their_formulas() -> None:
    shapes = {"z": (N, 4), "lp": (N, 4), "ids": (N,), "loss": (), "seed": (), "dlp": (N, 4),
              "y": (N, 4), "g": (N, 4), "dz": (N, 4)}
    rows = _program(
        shapes,
        Assign("lp", LogSoftmax("z", 1)),
        Assign("loss", NllLoss("lp", "ids", -100)),
        Assign("dlp", NllLossBackward("seed", "lp", "ids", -100)),
        Assign("dz", SoftmaxBackward("g", "y", 1)))
    count = rf"\sum_{{{S0}}} \left[{_tt('ids', S0)} \neq -100\right]"
    assert rows[0][1] == (rf"= {_tt('z', I0, I1)} - \log \sum_{{{S0}}} "
                          rf"\exp\left({_tt('z', I0, S0)}\right)")
    assert rows[1] == (_tt("loss"), rf"= - \frac{{\sum_{{{S0}}} {_tt('lp', S0, _tt('ids', S0))} "
                                    rf"\left[{_tt('ids', S0)} \neq -100\right]}}{{{count}}}")
    assert rows[2][1] == (rf"= - \frac{{{_tt('seed')} \left[{I1} = {_tt('ids', I0)}\right] "
                          rf"\left[{_tt('ids', I0)} \neq -100\right]}}{{{count}}}")
    assert rows[3][1] == (rf"= \left({_tt('g', I0, I1)} - \sum_{{{S0}}} {_tt('g', I0, S0)} "
                          rf"{_tt('y', I0, S0)}\right) {_tt('y', I0, I1)}")


def test_convolutions_and_pooling() -> None:
    shapes = {"x": (N, 1, 6, 6), "w": (2, 1, 3, 3), "b": (2,), "c": (N, 2, 4, 4),
              "g": (N, 2, 4, 4), "gw": (2, 1, 3, 3), "gx": (N, 1, 6, 6), "arg": (N, 2, 2, 2),
              "top": (N, 2, 2, 2), "gp": (N, 2, 2, 2), "gc": (N, 2, 4, 4)}
    rows = dict(zip(["c", "gw", "gx", "arg", "top", "gc"], _program(
        shapes,
        Assign("c", Conv("forward", "x", "w", (1, 1), (0, 0), (N, 2, 4, 4), bias="b")),
        Assign("gw", Conv("weight", "x", "g", (1, 1), (0, 0), (2, 1, 3, 3))),
        Assign("gx", Conv("input", "g", "w", (1, 1), (0, 0), (N, 1, 6, 6))),
        Assign("arg", MaxPool("c", (2, 2), (2, 2), indices=True)),
        Assign("top", TakeAt("c", "arg", 2)),
        Assign("gc", MaxPoolBackward("gp", "arg", (2, 2), (2, 2), (N, 2, 4, 4)))), strict=True))
    assert rows["c"][1] == (rf"= \sum_{{{S0},{S1},{S2}}} {_tt('w', I1, S0, S1, S2)} "
                            f"{_tt('x', I0, S0, f'{I2} + {S1}', f'{I3} + {S2}')} + {_tt('b', I1)}")
    assert rows["gw"][1] == (rf"= \sum_{{{S0},{S1},{S2}}} {_tt('g', S0, I0, S1, S2)} "
                             f"{_tt('x', S0, I1, f'{I2} + {S1}', f'{I3} + {S2}')}")
    assert rows["gx"][1].startswith(rf"= \sum_{{{S0},{S1},{S2},{S3},s_{{4}}}}")
    assert rf"\left[{S1} + {S3} = {I2}\right]" in rows["gx"][1]
    assert rf"\left[{S2} + s_{{4}} = {I3}\right]" in rows["gx"][1]
    # where in each 2 x 2 window the maximum lies (the evaluating tests check the flat
    # position against the module's)
    assert rows["arg"][1].startswith(rf"= \operatorname{{argmax}}_{{{S0},{S1}}} "
                                     f"{_tt('c', I0, I1, f'2 {I2} + {S0}', f'2 {I3} + {S1}')}")
    at = _tt("arg", I0, I1, I2, I3)
    row = r"\left\lfloor{\frac{" + at + r"}{4}}\right\rfloor"
    assert rows["top"][1] == "= " + _tt("c", I0, I1, row, at + r" \bmod 4")
    assert rows["gc"][1] == (rf"= \sum_{{{S0},{S1}}} {_tt('gp', I0, I1, S0, S1)} "
                             rf"\left[{_tt('arg', I0, I1, S0, S1)} = 4 {I2} + {I3}\right]")


def test_einsum_of_three_and_iota_masks() -> None:
    shapes = {"a": (N, 4), "b": (4, 5), "c": (5, 2), "o": (N, 2), "mask": (6, 6)}
    t, s = sp.Symbol("T0"), sp.Symbol("T1")
    rows = _program(
        shapes,
        Assign("o", Einsum("ij,jk,kl->il", ("a", "b", "c"))),
        Assign("mask", Map(sp.GreaterThan(t, s), ((t, Iota(0, 6, 2, "o")),
                                                   (s, Iota(1, 6, 2, "o"))))))
    assert rows[0][1] == (rf"= \sum_{{{S0},{S1}}} {_tt('a', I0, S0)} {_tt('b', S0, S1)} "
                          f"{_tt('c', S1, I1)}")
    assert rows[1][1] == rf"= {I0} \geq {I1}"


def check_program_numerically(model, modules, batch_size: int = 1) -> None:
    """The printed statements, evaluated entry by entry from the inputs and parameters
    (each reading the values of the ones before), give the numpy module's loss and
    gradients."""
    deriv = model.derivation
    graph = deriv.graph
    lowered, stmts = gradient_statements(deriv)
    printer = ProgramPrinter(lowered, stmts)
    module = modules["numpy"]
    params = module.init_params(0)
    batch = random_batch(model, batch=batch_size)
    sizes = {str(d): n for node in graph.nodes.values() if node.name in batch
             for d, n in zip(node.shape, batch[node.name].shape, strict=True) if d.is_Symbol}
    subs = {graph.dims[k]: v for k, v in sizes.items()}
    values: dict[str, np.ndarray] = {**batch}
    values.update({p.name: params[p.param] for p in graph.params()})
    for node in graph.nodes.values():  # dropout masks: loss_and_grad is in eval mode
        if node.role == "mask":
            values[node.name] = np.ones([int(sp.sympify(d).subs(subs)) for d in node.shape])
    _NAMESPACE.clear()
    _NAMESPACE.update(vars(module))
    for stmt in stmts:
        for name, axes, expr in printer.results(stmt):  # a layer norm's: several
            shape = tuple(int(sp.sympify(d).subs(subs)) for d in printer.shape(name))
            values[name] = (evaluate_tensor(expr, axes, shape, values, sizes) if axes
                            else np.array(evaluate(expr, {}, values, sizes)))
    loss, grads = module.loss_and_grad(params, **call_args(module, batch))

    def close(got: np.ndarray, want: np.ndarray, what: str) -> None:
        scale = max(float(np.max(np.abs(want))), 1e-12)
        assert np.max(np.abs(got - np.asarray(want))) / scale < 1e-9, what

    close(values[graph.loss], loss, "loss")
    assert set(deriv.grads) == set(grads)
    for pname, var in deriv.grads.items():
        close(values[var], grads[pname], pname)


@pytest.mark.parametrize(("name", "batch"), [("seed_mlp", 3), ("mlp_classifier", 2),
                                           ("multitask", 2), ("cnn", 1), ("gpt_block", 1),
                                           ("tiny_gpt", 1)])
def test_printed_program_evaluates_to_loss_and_grad(tmp_path: Path, name: str,
                                                    batch: int) -> None:
    """(A batch of one where entry-by-entry evaluation of a wide network is slow; the
    registry entries below evaluate a batch of two.)"""
    model = compile_spec(EXAMPLES / f"{name}.yaml")
    check_program_numerically(model, example_modules(tmp_path, name), batch_size=batch)


@pytest.mark.parametrize("name", ["seed_mlp", "cnn", "gpt_block"])
def test_program_section_compiles_and_renders(tmp_path: Path, name: str) -> None:
    spec = EXAMPLES / f"{name}.yaml"
    out = tmp_path / f"{name}.html"
    assert main(["latex", str(spec), "--program", "-o", str(out)]) == 0
    page = out.read_text()
    assert "The computation as generated" in page and "<math" in page
    assert "\\mathtt" not in page  # every formula became MathML
    # Chromium ignores mathvariant: the code's names are monospace characters instead
    assert not re.search(r'mathvariant="monospace">\w<', page)
    assert "&#x1D68C;" in page  # MATHEMATICAL MONOSPACE SMALL C: the c of fc1, conv1, attn
    _pdflatex(tmp_path, symbackprop.derive(spec, program=True).tex())


def _case_name(text: str) -> str:
    return re.search(r"name: (\w+)", text).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize("spec_text", CASES, ids=_case_name)
def test_registry_programs_evaluate(tmp_path: Path, spec_text: str) -> None:
    model, modules = build(tmp_path, spec_text)
    check_program_numerically(model, modules, batch_size=2)



def _window_add(values: np.ndarray, shape: tuple[int, ...],
                slides: tuple[tuple[int, int, int, int, int], ...]) -> np.ndarray:
    """A window-add by its definition, one value at a time (the reference)."""
    out = np.zeros(shape)
    slid = {axis: (stride, pad) for axis, stride, pad, _, _ in slides}
    for idx in np.ndindex(*values.shape):
        at, j = [], 0
        for axis in range(len(shape)):
            if axis in slid:
                stride, pad = slid[axis]
                at.append(stride * idx[j] + idx[j + 1] - pad)
                j += 2
            else:
                at.append(idx[j])
                j += 1
        if all(0 <= a < n for a, n in zip(at, shape, strict=True)):
            out[tuple(at)] += values[idx]
    return out


def test_hand_built_statements_evaluate_as_numpy_computes_them(tmp_path: Path) -> None:
    """What no example or registry network lowers to (strided reads without a tap, padded
    windows with a fixed axis, a permuting reshape that broadcasts, max and count
    reductions, stacks with a zero part off axis 0, max pooling with stride below the
    kernel, cross-entropy over rank-3 logits, a padded window-add): each printed
    statement, evaluated entry by entry, equals the numpy printer's code run on the same
    arrays (or, for the window-add, its definition)."""
    from symbackprop.emit.arrays import NumpyArrayPrinter

    helpers = dict(vars(example_modules(tmp_path, "cnn")["numpy"]))
    # (cnn's pooling gives its maxima with its indices: the template's _take_at, which
    # reads them at indices computed first, as it is written there)
    template = (Path(__file__).parents[1] / "templates" / "numpy_module.py.j2").read_text()
    source = template[template.index("def _take_at("):]
    exec(source[:source.index("{% endif %}")], helpers)  # noqa: S102
    rng = np.random.default_rng(0)
    a, b = sp.Symbol("A"), sp.Symbol("B")

    def check(shapes: dict, values: dict, *stmts: Assign, reference: dict | None = None,
              ints: frozenset = frozenset()) -> None:
        program = Program(list(stmts), {k: tuple(sp.Integer(d) for d in v)
                                        for k, v in shapes.items()}, integers=ints)
        printer, numpy_printer = ProgramPrinter(program, list(stmts)), NumpyArrayPrinter(program)
        got, want = dict(values), dict(values)
        for stmt in stmts:
            if reference and stmt.target in reference:
                want[stmt.target] = reference[stmt.target]
            else:
                code = numpy_printer.code(stmt)
                want[stmt.target] = np.asarray(eval(code, {**helpers, "numpy": np, **want}))  # noqa: S307
            axes, expr = printer.expression(stmt)
            got[stmt.target] = (evaluate_tensor(expr, axes, shapes[stmt.target], got, {})
                                if axes else np.array(evaluate(expr, {}, got, {})))
            np.testing.assert_allclose(got[stmt.target], want[stmt.target], rtol=1e-12,
                                       atol=1e-12, err_msg=stmt.target)

    x = rng.normal(size=(2, 3, 7))
    strided = Slide(place=2, kernel_place=-1, stride=2, pad=1, count=4, size=1)
    check({"x": (2, 3, 7), "u": (2, 3, 4)}, {"x": x},
          Assign("u", Map(a, ((a, Window("x", (None, None, None), (0, 1, strided), 3)),))))
    padded = Slide(place=1, kernel_place=2, stride=2, pad=1, count=4, size=3)
    check({"x": (2, 3, 7), "u": (2, 4, 3)}, {"x": x},
          Assign("u", Map(a, ((a, Window("x", (None, 1, None), (0, padded), 3)),))))
    x12, bias = rng.normal(size=(2, 3, 12)), rng.normal(size=(5,))
    permuted = Reshape("x", (None, 2, None), (2, 3, 4), (0, 2, 1), (2, 4, 3), (0, 2, 3), 4)
    check({"x": (2, 3, 12), "b": (5,), "u": (2, 5, 4, 3)}, {"x": x12, "b": bias},
          Assign("u", Map(a * b, ((a, permuted), (b, View("b", (None,), (1,), 4))))))
    z, c = rng.normal(size=(3, 4)), rng.normal(size=(3, 1))
    zc = ((a, View("z", (None, None), (0, 1), 2)), (b, View("c", (None, None), (0, 1), 2)))
    check({"z": (3, 4), "c": (3, 1), "m": (4,), "k": (), "s": (3,)}, {"z": z, "c": c},
          Assign("m", Reduce("max", a, zc[:1], (0,), 2)),
          Assign("k", Reduce("count", sp.StrictGreaterThan(a, b), zc, (0, 1), 2)),
          Assign("s", Reduce("sum", a * b, zc, (1,), 2)))
    p, q = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    check({"p": (3, 4), "q": (3, 4), "s1": (3, 3, 4), "s2": (3, 4, 2)}, {"p": p, "q": q},
          Assign("s1", Stack(("p", None, "q"), 1)), Assign("s2", Stack((None, "q"), 2)))
    xs, g = rng.normal(size=(2, 2, 7, 6)), rng.normal(size=(2, 2, 3, 3))
    check({"x": (2, 2, 7, 6), "arg": (2, 2, 3, 3), "top": (2, 2, 3, 3), "g": (2, 2, 3, 3),
           "gx": (2, 2, 7, 6)}, {"x": xs, "g": g},
          Assign("arg", MaxPool("x", (3, 2), (2, 2), indices=True)),
          Assign("top", TakeAt("x", "arg", 2)),
          Assign("gx", MaxPoolBackward("g", "arg", (3, 2), (2, 2), (2, 2, 7, 6))),
          ints=frozenset({"arg"}))
    logp = np.log(rng.dirichlet(np.ones(5), size=(2, 3)))
    ids = np.array([[0, 4, -100], [2, 2, 1]])
    check({"lp": (2, 3, 5), "ids": (2, 3), "loss": (), "seed": (), "d": (2, 3, 5)},
          {"lp": logp, "ids": ids, "seed": np.array(1.7)},
          Assign("loss", NllLoss("lp", "ids", -100)),
          Assign("d", NllLossBackward("seed", "lp", "ids", -100)), ints=frozenset({"ids"}))
    values = rng.normal(size=(2, 3, 2, 4, 2))
    slides = ((1, 2, 1, 3, 2), (2, 1, 1, 4, 2))
    check({"g": (2, 3, 2, 4, 2), "dx": (2, 5, 5)}, {"g": values},
          Assign("dx", WindowAdd("g", (2, 5, 5), slides)),
          reference={"dx": _window_add(values, (2, 5, 5), slides)})
    # a small convolution's kernel written out densely, then the convolution and its two
    # gradients as products against it and as convolution calls, each against its
    # definition (2-D: strides 2 and 1, paddings 1 and 0, a non-square kernel; 1-D:
    # stride 3, which leaves the last input position unread)
    for size, kernel, stride, pad in (((5, 4), (3, 2), (2, 1), (1, 0)),
                                      ((8,), (3,), (3,), (1,))):
        positions = tuple((n + 2 * q - k) // st + 1
                          for n, k, st, q in zip(size, kernel, stride, pad, strict=True))
        matrix = (3 * math.prod(positions), 2 * math.prod(size))
        w, bias = rng.normal(size=(3, 2, *kernel)), rng.normal(size=(3,))
        xin, gout = rng.normal(size=(2, 2, *size)), rng.normal(size=(2, 3, *positions))
        shapes = {"w": w.shape, "bias": (3,), "x": xin.shape, "g": gout.shape,
                  "K": matrix, "y": gout.shape, "dw": w.shape, "dx": xin.shape,
                  "y2": gout.shape, "dw2": w.shape, "dx2": xin.shape}
        geometry = (stride, pad)
        check(shapes, {"w": w, "bias": bias, "x": xin, "g": gout},
              Assign("K", DenseKernel("w", size, stride, pad, matrix)),
              Assign("y", Conv("forward", "x", "w", *geometry, gout.shape, "bias", True, "K")),
              Assign("dw", Conv("weight", "x", "g", *geometry, w.shape, dense=True)),
              Assign("dx", Conv("input", "g", "w", *geometry, xin.shape, dense=True,
                                matrix="K")),
              Assign("y2", Conv("forward", "x", "w", *geometry, gout.shape, "bias")),
              Assign("dw2", Conv("weight", "x", "g", *geometry, w.shape)),
              Assign("dx2", Conv("input", "g", "w", *geometry, xin.shape)))
