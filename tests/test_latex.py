"""Derivations in LaTeX: contents, every registry entry, determinism, pdflatex, Chromium.

The derivation is printed from the same sympy objects the generated code comes from; the
numeric test closes the loop: the final symbolic gradient, evaluated entry by entry on
random values (forward tensors from the printed forward equations), equals the generated
module's ``loss_and_grad``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from test_registry_gradients import CASES

import symbackprop
from symbackprop import latex
from symbackprop.check import call_args, random_batch
from symbackprop.cli import main
from symbackprop.emit.printers import NumpyCodePrinter
from symbackprop.emit.render import module_filename
from symbackprop.graph import ArgMaxOver, MaxOver
from symbackprop.ir.passes.gelu import GeluTanh, GeluTanhBackward, expanded
from symbackprop.ir.passes.kernels import ReluBackward, SigmoidBackward, TanhBackward
from symbackprop.latex import program

from conftest import EXAMPLES, ROOT, build, write_spec

ARTIFACTS = ROOT / "test-artifacts"
SEED = EXAMPLES / "seed_mlp.yaml"
CLASSIFIER = EXAMPLES / "mlp_classifier.yaml"

# A generated name, an index symbol or a Python identifier leaking into the mathematics.
RAW_NAME = re.compile(r"(?<![\\A-Za-z])(?:[A-Za-z]+[0-9]*_[A-Za-z0-9]|[iksr][0-9]+\b|Sum\(|"
                      r"Indexed|KroneckerDelta|Sigmoid\()")


def math_of(doc: latex.Document) -> list[str]:
    """Every LaTeX string of a document (display cells and inline math)."""
    out: list[str] = []
    for block in doc.blocks():
        if isinstance(block, latex.Display):
            out += [cell for row in block.rows for cell in row]
        else:
            out += [s.value for s in block.spans if s.kind == "math"]
    return out


def assert_names_print_well(doc: latex.Document) -> None:
    for text in math_of(doc):
        # \mathrm{fc1\_z} style escapes are fine; a bare underscore identifier is not.
        stripped = re.sub(r"\\mathrm\{[^}]*\}|\\mathtt\{[^}]*\}|\\operatorname\{[^}]*\}", "",
                          text)
        assert not RAW_NAME.search(stripped), f"raw identifier in: {text}"


# -- evaluating printed index notation -------------------------------------------------

_NAMESPACE: dict[str, object] = {}  # the generated module's helpers (_sigmoid, ...)


def _number(expr: sp.Basic) -> float:
    """A function applied to numbers: sympy's own value, else the generated code's."""
    value = expr.evalf()
    for rewrite in (sp.exp, sp.log):
        if value.is_Number:
            return float(value)
        value = expr.rewrite(rewrite).evalf()
    if value.is_Number:
        return float(value)
    args = {f"_arg{n}": float(a) for n, a in enumerate(expr.args)}
    code = NumpyCodePrinter().doprint(expr.func(*(sp.Symbol(a) for a in args)))
    return float(eval(code, {**_NAMESPACE, "numpy": np, **args}))  # noqa: S307 - our printer


def evaluate(expr: sp.Basic, env: dict[sp.Symbol, int], values: dict[str, np.ndarray],
             sizes: dict[str, int]) -> float:
    """One entry of an index-notation expression: Sums loop, tensors are looked up."""
    ev = lambda e: evaluate(e, env, values, sizes)  # noqa: E731
    if isinstance(expr, sp.Indexed):
        array = values[str(expr.base.label)]
        at = tuple(int(ev(i)) for i in expr.indices)
        if any(not 0 <= i < n for i, n in zip(at, array.shape, strict=True)):
            return 0.0  # a window read in the padding (convolutions): zero
        return float(array[at])
    if isinstance(expr, sp.Symbol):
        if expr in env:
            return env[expr]
        if expr.name in sizes:
            return sizes[expr.name]
        return float(values[expr.name])
    if expr.is_Number or expr.is_NumberSymbol:
        return float(expr)
    if expr is sp.true or expr is sp.false:
        return float(expr is sp.true)
    if isinstance(expr, sp.Sum):
        (var, lo, hi), *rest = expr.limits
        inner = sp.Sum(expr.function, *rest) if rest else expr.function
        total = 0.0
        for v in range(int(ev(lo)), int(ev(hi)) + 1):
            total += evaluate(inner, {**env, var: v}, values, sizes)
        return total
    if isinstance(expr, MaxOver):
        (var, lo, hi), *rest = expr.limits
        inner = MaxOver(expr.function, *rest) if rest else expr.function
        return max(evaluate(inner, {**env, var: v}, values, sizes)
                   for v in range(int(ev(lo)), int(ev(hi)) + 1))
    if isinstance(expr, ArgMaxOver):  # the flat position of the window's first maximum
        read = expr.function
        shape = values[str(read.base.label)].shape[-len(expr.limits):]
        best, where = -math.inf, None
        for taps in itertools.product(*(range(int(ev(lo)), int(ev(hi)) + 1)
                                        for _, lo, hi in expr.limits)):
            at = {**env, **{var: v for (var, _, _), v in zip(expr.limits, taps, strict=True)}}
            value = evaluate(read, at, values, sizes)
            if where is None or value > best:
                position = [int(evaluate(i, at, values, sizes))
                            for i in read.indices[-len(expr.limits):]]
                best, where = value, int(np.ravel_multi_index(position, shape))
        return float(where)
    if isinstance(expr, sp.Add):
        return sum(ev(a) for a in expr.args)
    if isinstance(expr, sp.Mul):
        return math.prod(ev(a) for a in expr.args)
    if isinstance(expr, sp.Pow):
        return ev(expr.base) ** ev(expr.exp)
    if isinstance(expr, sp.Piecewise):
        for value, cond in expr.args:
            if cond == sp.true or ev(cond):
                return ev(value)
        raise AssertionError("no Piecewise branch")
    if isinstance(expr, sp.core.relational.Relational):
        return float(bool(sp.sympify(expr.func(ev(expr.lhs), ev(expr.rhs)))))
    if isinstance(expr, sp.logic.boolalg.BooleanFunction):
        return float(bool(expr.func(*(sp.true if ev(a) else sp.false for a in expr.args))))
    if isinstance(expr, latex.Indicator):
        return float(bool(ev(expr.args[0])))
    if isinstance(expr, latex.Select):
        cond, a, b = expr.args
        return ev(a) if ev(cond) else ev(b)
    if isinstance(expr, latex.RowSoftmax):
        (z,) = expr.args
        name, idx = str(z.base.label), tuple(int(ev(i)) for i in z.indices)
        row = values[name][idx[:-1]]
        shifted = np.exp(row - row.max())
        return float(shifted[idx[-1]] / shifted.sum())
    if isinstance(expr, sp.KroneckerDelta):
        return float(ev(expr.args[0]) == ev(expr.args[1]))
    # the program section's notation (latex --program), kernels by their definitions
    if isinstance(expr, GeluTanh | GeluTanhBackward):
        return ev(expanded(expr))
    if isinstance(expr, TanhBackward):
        return ev(expr.args[0]) * (1 - ev(expr.args[1]) ** 2)
    if isinstance(expr, SigmoidBackward):
        y = ev(expr.args[1])
        return ev(expr.args[0]) * y * (1 - y)
    if isinstance(expr, ReluBackward):
        return ev(expr.args[0]) if ev(expr.args[1]) > 0 else 0.0
    if isinstance(expr, program.Iverson):
        return float(bool(ev(expr.args[0])))
    if isinstance(expr, program.Cases):
        for value, cond in zip(expr.args[::2], expr.args[1::2], strict=True):
            if cond == sp.true or ev(cond):
                return ev(value)
        raise AssertionError("no case holds")
    if isinstance(expr, program.Logic):
        kind, *args = expr.args
        truth = [bool(ev(a)) for a in args]
        if kind.name == "ITE":
            return float(truth[1] if truth[0] else truth[2])
        return float({"And": all, "Or": any, "Xor": lambda t: sum(t) % 2 == 1,
                      "Not": lambda t: not t[0]}[kind.name](truth))
    if isinstance(expr, program.Reshaped):
        src, picks, fine, perm, shape, *indices = expr.args
        array = values[src.name][tuple(slice(None) if p == -1 else int(p) for p in picks)]
        dims = lambda ds: tuple(int(ev(d)) for d in ds)  # noqa: E731
        array = array.reshape(dims(fine)).transpose(tuple(int(a) for a in perm))
        return float(array.reshape(dims(shape))[tuple(int(ev(i)) for i in indices)])
    if isinstance(expr, sp.Function):
        return _number(expr.func(*(sp.Float(ev(a), 30) for a in expr.args)))
    raise AssertionError(f"cannot evaluate {type(expr).__name__}: {expr}")


def evaluate_tensor(expr: sp.Expr, indices: tuple[sp.Symbol, ...], shape: tuple[int, ...],
                    values: dict[str, np.ndarray], sizes: dict[str, int]) -> np.ndarray:
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        out[idx] = evaluate(expr, dict(zip(indices, idx, strict=True)), values, sizes)
    return out


MAX_UNROLLED_OPS = 120


def check_numerically(model, doc: latex.Document, module, batch_size: int = 2) -> None:
    """What the document prints equals ``loss_and_grad``, two ways: the printed forward
    equations, then the printed backward pass (each adjoint as its last form reads,
    from the loss down) and the printed gradient lines; and each gradient unrolled
    into forward quantities (the ``--param`` formula)."""
    deriv = model.derivation
    graph = deriv.graph
    params = module.init_params(0)
    batch = random_batch(model, batch=batch_size)
    # each symbolic dimension's size as drawn (the batch, a sequence length, ...)
    sizes = {str(d): n for node in graph.nodes.values() if node.name in batch
             for d, n in zip(node.shape, batch[node.name].shape, strict=True) if d.is_Symbol}
    values: dict[str, np.ndarray] = {**batch}
    for p in graph.params():
        values[p.name] = params[p.param]

    def shape(name: str) -> tuple[int, ...]:
        node = graph.nodes[name.removeprefix("d_")] if name not in graph.nodes else \
            graph.nodes[name]
        return tuple(int(sp.sympify(d).subs({graph.dims[k]: v for k, v in sizes.items()}))
                     for d in node.shape)

    for node in graph.nodes.values():  # dropout masks: loss_and_grad is in eval mode
        if node.role == "mask":
            values[node.name] = np.ones(shape(node.name))
    for name, body in doc.forward_bodies.items():
        node = graph.nodes[name]
        if node.rank == 0:
            values[name] = np.array(evaluate(body, {}, values, sizes))
        else:
            values[name] = evaluate_tensor(body, node.indices(), shape(name), values, sizes)
    _NAMESPACE.clear()
    _NAMESPACE.update(vars(module))
    _, grads = module.loss_and_grad(params, **call_args(module, batch))
    assert set(doc.gradients) == set(doc.gradient_lines) == set(doc.params) <= set(grads)
    values[deriv.seed.name] = np.array(1.0)
    for step in doc.backward_steps:  # from the loss down: each reads the ones before
        values[step.tensor] = evaluate_tensor(step.expr, step.indices, shape(step.tensor),
                                              values, sizes)

    def close(got: np.ndarray, want: np.ndarray, what: str) -> None:
        scale = max(float(np.max(np.abs(want))), 1e-12)
        assert np.max(np.abs(got - want)) / scale < 1e-9, what

    for pname, line in doc.gradient_lines.items():
        got = evaluate_tensor(line.expr, line.indices, shape(line.tensor), values, sizes)
        close(got, np.asarray(grads[pname]), f"printed gradient line of {pname}")
    for pname, formula in doc.gradients.items():
        # An unrolled chain through attention or several normalisations runs to thousands
        # of operations, which this element-by-element sympy evaluation takes minutes
        # over; the one-line gradients and every backward step above cover those layers.
        if sp.count_ops(formula.expr) > MAX_UNROLLED_OPS:
            continue
        got = evaluate_tensor(formula.expr, formula.indices, shape(formula.tensor), values,
                              sizes)
        close(got, np.asarray(grads[pname]), f"unrolled gradient of {pname}")


# -- the seed network --------------------------------------------------------------------

@pytest.fixture(scope="module")
def seed_doc() -> latex.Document:
    return symbackprop.derive(SEED)


def test_seed_derivation_reads_like_a_textbook(seed_doc: latex.Document) -> None:
    md = seed_doc.markdown()
    sections = re.findall(r"^## (.*)$", md, re.M)
    assert sections == ["Notation", "The forward pass", "The backward pass", "The gradients"]
    forward = md[md.index("## The forward pass"):md.index("## The backward pass")]
    backward = md[md.index("## The backward pass"):md.index("## The gradients")]
    gradients = md[md.index("## The gradients"):]
    # 1. The forward pass once, in matrix form beside index form, layer subscripts.
    z1 = (r"\mathbf{z}_{\mathrm{fc1}} & = \mathbf{x} \mathbf{W}_{\mathrm{fc1}}^{\top} + "
          r"\mathbf{b}_{\mathrm{fc1}}")
    assert md.count(z1) == 1 and z1 in forward
    assert r"z_{\mathrm{fc1},ni} & = \sum_{j=1}^{2} W_{\mathrm{fc1},ij} x_{nj} + " \
        r"b_{\mathrm{fc1},i}" in forward
    assert r"\mathbf{h}_{\mathrm{fc1}} & = \sigma\left(\mathbf{z}_{\mathrm{fc1}}\right)" \
        in forward
    # 2. The backward pass once: each local Jacobian exactly once ...
    jacobians = [
        r"\frac{\partial y_{ni}}{\partial z_{\mathrm{fc2},ni}} & = \sigma'\left("
        r"z_{\mathrm{fc2},ni}\right) = y_{ni} \left(1 - y_{ni}\right)",
        r"\frac{\partial z_{\mathrm{fc2},ni}}{\partial h_{\mathrm{fc1},mj}} & = "
        r"\delta_{nm} W_{\mathrm{fc2},ij}",
        r"\frac{\partial h_{\mathrm{fc1},ni}}{\partial z_{\mathrm{fc1},ni}} & = \sigma'\left("
        r"z_{\mathrm{fc1},ni}\right) = h_{\mathrm{fc1},ni} \left(1 - h_{\mathrm{fc1},ni}"
        r"\right)",
    ]
    for text in jacobians:
        assert md.count(text) == 1, text
    assert md.count(r"\sigma'") == 6  # per sigmoid: its Jacobian, the index and matrix step
    # ... the contraction with the Kronecker delta summed out, in index and matrix form ...
    assert (r"\frac{\partial L}{\partial h_{\mathrm{fc1},ni}} & = \sum_{m=1}^{N} "
            r"\varepsilon_{\mathrm{fc2},m,1} \delta_{nm} W_{\mathrm{fc2},1i} = "
            r"\varepsilon_{\mathrm{fc2},n,1} W_{\mathrm{fc2},1i}") in backward
    assert (r"\frac{\partial L}{\partial \mathbf{h}_{\mathrm{fc1}}} & = "
            r"\boldsymbol{\varepsilon}_{\mathrm{fc2}} \mathbf{W}_{\mathrm{fc2}}") in backward
    # ... and the error recursion.
    assert (r"\boldsymbol{\varepsilon}_{\mathrm{fc1}} & = \left(\boldsymbol{\varepsilon}_"
            r"{\mathrm{fc2}} \mathbf{W}_{\mathrm{fc2}}\right) \odot \mathbf{h}_{\mathrm{fc1}} "
            r"\odot \left(1 - \mathbf{h}_{\mathrm{fc1}}\right)") in backward
    assert "simplifies across those layers" in backward  # fusion: MSE of a sigmoid
    # A leading fraction keeps a thin space from what it scales (2/N y, not 2/Ny).
    assert r"\frac{2}{N} \, \mathbf{y} \odot" in backward
    assert not re.search(r"\\frac\{\d\}\{N\} [a-z\\](?!,)", md)
    # 3. One line per gradient: matrix form with shape, index form.
    lines = [
        r"\frac{\partial L}{\partial \mathbf{W}_{\mathrm{fc1}}} & = \boldsymbol{\varepsilon}_"
        r"{\mathrm{fc1}}^{\top} \mathbf{x} \quad (3 \times 2) & \frac{\partial L}{\partial "
        r"W_{\mathrm{fc1},ij}} & = \sum_{n=1}^{N} \varepsilon_{\mathrm{fc1},ni} x_{nj}",
        r"\frac{\partial L}{\partial \mathbf{b}_{\mathrm{fc1}}} & = \mathbf{1}^{\top} "
        r"\boldsymbol{\varepsilon}_{\mathrm{fc1}} \quad (3)",
    ]
    for text in lines:
        assert text in gradients, text
    assert gradients.count(r"\frac{\partial L}{\partial \mathbf{") == 4
    # One index convention: a weight's entries are ij everywhere, an activation's ni.
    assert not re.search(r"W_\{\\mathrm\{fc\d\},(?!ij|1i|11|12|13)", md)
    # The error signal and the Kronecker delta never share a symbol.
    assert r"\boldsymbol{\delta}" not in md and r"\delta_{\mathrm" not in md
    assert all(len(m) == 2 for m in re.findall(r"\\delta_\{([a-z]+)\}", md))
    assert list(seed_doc.params) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert not seed_doc.chains  # the full chain only on request
    assert_names_print_well(seed_doc)
    assert str(seed_doc) == md
    assert seed_doc._repr_latex_().startswith("$$\\begin{array}{l}")


def test_sigmoid_bce_collapses_to_sigma_minus_t(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
        name: bce_net
        inputs: {x: [N, 2]}
        targets: {t: [N, 1]}
        layers:
          - {name: fc1, type: dense, units: 3, activation: tanh}
          - {name: fc2, type: dense, units: 1, activation: sigmoid}
        loss: {type: bce, prediction: fc2, target: t}
        """)
    md = symbackprop.derive(spec, params="fc1.weight").markdown()
    backward = md[md.index("## The backward pass"):md.index("## The gradients")]
    assert "simplifies across those layers" in backward
    assert (r"\boldsymbol{\varepsilon}_{\mathrm{fc2}} & = \left(\frac{\partial L}{\partial "
            r"\mathbf{y}}\right) \odot \sigma'\left(\mathbf{z}_{\mathrm{fc2}}\right)") in backward
    assert r"= \frac{1}{N} \, \left(\mathbf{y} - \mathbf{t}\right)" in backward
    assert (r"\varepsilon_{\mathrm{fc2},ni} & = \frac{\partial L}{\partial y_{ni}} \sigma'"
            r"\left(z_{\mathrm{fc2},ni}\right) = \frac{1}{N} \, \left(y_{ni} - t_{ni}\right)"
            ) in backward
    assert "## The full chain for `fc1.weight`" in md


def test_softmax_cross_entropy_collapses_to_softmax_minus_t() -> None:
    doc = symbackprop.derive(CLASSIFIER, params=["logits.bias"])
    md = doc.markdown()
    assert (r"\frac{1}{N} \, \left(\operatorname{softmax}\left(\mathbf{z}_{\mathrm{logits}}"
            r"\right) - \mathbf{label}\right)") in md
    assert "Each row of the target sums to 1" in md
    assert list(doc.params) == ["logits.bias"]
    # Only the part of the backward pass this parameter needs.
    assert r"\boldsymbol{\varepsilon}_{\mathrm{h1}}" not in md
    assert_names_print_well(doc)


# -- every registry entry ------------------------------------------------------------------

@pytest.mark.parametrize("spec_text", CASES)
def test_every_registry_entry_derives_renders_and_evaluates(tmp_path: Path,
                                                            spec_text: str) -> None:
    model, modules = build(tmp_path, spec_text)
    doc = latex.build(model.spec, model.derivation, model.label)
    trainable = [p.param for p in model.derivation.graph.params() if p.trainable]
    assert list(doc.params) == trainable
    assert_names_print_well(doc)
    for fmt in latex.FORMATS:
        assert doc.render(fmt)  # html converts every formula to MathML or raises
    assert modules["numpy"].DERIVATIONS == {p: doc.latex(p) for p in trainable}
    assert modules["numpy"].DERIVATION_PASSES == doc.passes()
    assert modules["torch"].DERIVATIONS == modules["numpy"].DERIVATIONS
    assert modules["torch"].DERIVATION_PASSES == modules["numpy"].DERIVATION_PASSES
    if "type: attention" in spec_text and "heads: 1" not in spec_text:
        # This evaluator reads every printed formula element by element through sympy;
        # attention's take minutes at several heads. The one-head case is evaluated, and
        # the generated gradients of every case are checked in test_registry_gradients.
        return
    check_numerically(model, doc, modules["numpy"])


def test_seed_gradients_evaluate_to_loss_and_grad(tmp_path: Path, seed_doc) -> None:
    model, modules = build(tmp_path, SEED.read_text())
    check_numerically(model, seed_doc, modules["numpy"], batch_size=3)


def test_softmax_classifier_gradients_evaluate_to_loss_and_grad(tmp_path: Path) -> None:
    text = """
    name: small_classifier
    inputs: {x: [N, 3]}
    targets: {label: [N, 3]}
    layers:
      - {name: h1, type: dense, units: 3, activation: relu}
      - {name: logits, type: dense, units: 3}
    loss: {type: softmax_cross_entropy, prediction: logits, target: label}
    """
    model, modules = build(tmp_path, text)
    doc = latex.build(model.spec, model.derivation, model.label)
    check_numerically(model, doc, modules["numpy"], batch_size=3)


def test_a_parameter_the_loss_does_not_read(tmp_path: Path) -> None:
    text = """
    name: unused
    inputs: {x: [N, 2]}
    targets: {t: [N, 1]}
    layers:
      - {name: side, type: dense, units: 2, input: x}
      - {name: head, type: dense, units: 1, input: x}
    loss: {type: mse, prediction: head, target: t}
    """
    model, modules = build(tmp_path, text)
    doc = latex.build(model.spec, model.derivation, model.label)
    assert r"\text{(the loss does not read it)}" in doc.params["side.weight"]
    assert r"\boldsymbol{\varepsilon}_{\mathrm{side}}" not in doc.markdown()
    check_numerically(model, doc, modules["numpy"])


def test_deep_gradients_keep_the_recursion_and_still_evaluate(tmp_path: Path) -> None:
    """The full chain (--param) is unrolled into forward quantities only up to
    UNROLL_MAX_NESTING contractions; the lazily built formula still equals loss_and_grad."""
    layers = "".join(f"  - {{name: h{n}, type: dense, units: 2, activation: tanh}}\n"
                     for n in range(1, 6))
    text = ("name: deep\ninputs: {x: [N, 2]}\ntargets: {t: [N, 1]}\nlayers:\n" + layers
            + "  - {name: out, type: dense, units: 1}\n"
            "loss: {type: mse, prediction: out, target: t}\n")
    model, modules = build(tmp_path, text)
    doc = latex.build(model.spec, model.derivation, model.label,
                      params=["h1.weight", "h3.weight"])
    md = {name: latex.render.markdown(blocks) for name, blocks in doc.chains.items()}
    assert latex.UNROLL_MAX_NESTING == 3
    # h1 sits under h2..h5 and out: five contractions; h3 under h4, h5, out: three.
    assert "Not unrolled into forward quantities: 5 contractions" in md["h1.weight"]
    assert "Unrolled into forward quantities only" not in md["h1.weight"]
    assert "Unrolled into forward quantities only" in md["h3.weight"]
    assert "Not unrolled" not in md["h3.weight"]
    check_numerically(model, doc, modules["numpy"], batch_size=2)


# -- determinism ---------------------------------------------------------------------------

def test_same_spec_gives_byte_identical_latex(tmp_path: Path) -> None:
    first = symbackprop.derive(SEED)
    again = symbackprop.derive(SEED)
    for fmt in latex.FORMATS:
        assert first.render(fmt) == again.render(fmt)
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-m", "symbackprop.cli", "latex", str(SEED),
                              "--format", "tex"], capture_output=True, text=True, env=env,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        outputs.append(res.stdout)
    assert outputs[0] == outputs[1] == first.tex()


# -- the command line ----------------------------------------------------------------------

def test_cli_markdown_to_stdout(capsys) -> None:
    assert main(["latex", str(SEED)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Backpropagation in `seed_mlp`")
    assert "$$\n\\begin{aligned}" in out


def test_cli_one_parameter(capsys) -> None:
    assert main(["latex", str(SEED), "--param", "fc1.weight"]) == 0
    out = capsys.readouterr().out
    assert "## The full chain for `fc1.weight`" in out
    assert r"\partial \mathbf{W}_{\mathrm{fc1}}}" in out
    assert r"\partial \mathbf{b}_{\mathrm{fc2}}}" not in out


def test_cli_unknown_and_frozen_parameters_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["latex", str(SEED), "--param", "fc9.weight"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'fc9.weight'" in err and "fc1.weight" in err
    frozen = write_spec(tmp_path, """
        name: frozen
        inputs: {x: [N, 2]}
        targets: {t: [N, 1]}
        layers:
          - {name: base, type: dense, units: 3, activation: tanh, trainable: false}
          - {name: head, type: dense, units: 1}
        loss: {type: mse, prediction: head, target: t}
        """)
    assert main(["latex", str(frozen), "--param", "base.weight"]) == 2
    assert "frozen" in capsys.readouterr().err
    doc = symbackprop.derive(frozen)
    assert list(doc.params) == ["head.weight", "head.bias"]
    assert "frozen parameter (no gradient) `base.weight`" in doc.markdown()


def test_cli_writes_files_and_infers_the_format(tmp_path: Path, capsys) -> None:
    tex = tmp_path / "seed.tex"
    assert main(["latex", str(SEED), "--format", "tex", "-o", str(tex)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tex}"
    assert tex.read_text().startswith("\\documentclass")
    page = tmp_path / "seed.html"
    assert main(["latex", str(SEED), "-o", str(page)]) == 0
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_expand_writes_every_scalar_weight(capsys) -> None:
    assert main(["latex", str(SEED), "--expand"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("## Every scalar, expanded"):]
    rows = re.findall(r"\\frac\{\\partial L\}\{\\partial [Wb]_\{\\mathrm\{fc[12]\},\d+\}\} &",
                      section)
    assert len(rows) == 13  # the seed network's 13 parameters
    assert r"\frac{\partial L}{\partial W_{\mathrm{fc1},12}} & = \frac{2}{N} \, " \
           r"W_{\mathrm{fc2},11} \sum_{n=1}^{N}" in section
    assert r"z_{\mathrm{fc1},n,1} & = " in section


def test_expand_refuses_big_networks(capsys) -> None:
    assert main(["latex", str(CLASSIFIER), "--expand"]) == 2
    err = capsys.readouterr().err
    assert f"the limit is {latex.EXPAND_MAX_PARAMS}" in err and "3466" in err


def test_generated_module_carries_derivations(tmp_path: Path) -> None:
    assert main(["generate", str(SEED), "--out", str(tmp_path / "gen")]) == 0
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
            "import seed_mlp_numpy as m; print(json.dumps([m.DERIVATION_PASSES, "
            "m.DERIVATIONS]))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "gen")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    passes, derivations = json.loads(res.stdout)
    doc = symbackprop.derive(SEED)
    assert derivations == {p: doc.latex(p) for p in doc.params}
    assert passes == doc.passes() and list(passes) == ["forward", "backward"]
    assert derivations["fc1.weight"].count("\n") <= 4  # one line, not the whole chain
    source = (tmp_path / "gen" / module_filename("seed_mlp", "numpy")).read_text()
    assert not re.search(r"^\s*(import|from) (sympy|symbackprop)", source, re.M)


# -- real renderers ------------------------------------------------------------------------

def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


def _pdflatex(folder: Path, text: str) -> int:
    """Compile ``text`` with pdflatex; the number of pages it wrote."""
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (Debian: apt-get install texlive-latex-base)")
    (folder / "doc.tex").write_text(text)
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                          "-no-shell-escape", "doc.tex"], cwd=folder, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "! " not in res.stdout
    assert (folder / "doc.pdf").stat().st_size > 10_000
    found = re.search(r"Output written on doc\.pdf \((\d+) pages?", res.stdout)
    assert found, res.stdout[-2000:]
    return int(found.group(1))


@pytest.mark.parametrize("spec", [SEED, CLASSIFIER], ids=["seed_mlp", "mlp_classifier"])
def test_tex_compiles_with_pdflatex(tmp_path: Path, spec: Path) -> None:
    pages = _pdflatex(tmp_path, symbackprop.derive(spec, expand=spec == SEED).tex())
    assert pages >= 1
    shutil.copy(tmp_path / "doc.pdf", _artifact(f"latex_{spec.stem}.pdf"))


def test_seed_derivation_fits_on_three_pages(tmp_path: Path, seed_doc) -> None:
    """The whole derivation of the 2-3-1 network, as pdflatex sets it."""
    assert _pdflatex(tmp_path, seed_doc.tex()) <= 3


@pytest.mark.parametrize("name", ["gpt_block", "multitask"])
def test_long_derivatives_break_inside_the_page(tmp_path: Path, name: str) -> None:
    """GPT-2's tanh GELU derivative and a long weight-decay sum are cut across lines (at a
    sum's signs, or between factors), so pdflatex reports no line wider than the page."""
    text = symbackprop.derive(EXAMPLES / f"{name}.yaml").tex()
    _pdflatex(tmp_path, text)
    log = (tmp_path / "doc.log").read_text(encoding="latin-1")
    assert "Overfull \\hbox" not in log, log[log.find("Overfull"):][:600]
    assert "\\quad {} +" in text  # the check can fail: there was something to cut


def test_linebreak_keeps_each_row_balanced() -> None:
    from symbackprop.latex.linebreak import break_cell, break_rows, width

    term = r"\frac{\sqrt{2}}{\sqrt{\pi}} \, \tanh{\left(x_{nmi}^{3} + x_{nmi}\right)}"
    cell = r"= a \left(" + " + ".join([term] * 12) + r"\right) \left(b + 1\right)"
    pieces = break_cell(cell, 300.0)
    assert len(pieces) > 2
    for piece in pieces:
        assert piece.count(r"\left") == piece.count(r"\right"), piece
        assert piece.count("{") == piece.count("}"), piece
        assert width(piece) <= 300.0 + 10.0, piece
    assert pieces[1].startswith(r"\quad \left. {} + ")
    assert pieces[0].endswith(r"\right.")
    # nothing lost or reordered: the pieces without the inserted delimiters are the cell
    glued = re.sub(r"\\quad (\\left\. )*\{\} (\\times )?", "", " ".join(pieces))
    glued = glued.replace(r" \right.", "")
    assert glued.split() == cell.split()
    assert break_cell(r"= a + b", 300.0) == [r"= a + b"]
    # never inside an environment: a cases block keeps its own rows
    cases = r"= \begin{cases} " + " + ".join(["a_{i}"] * 60) + r" & \text{if } j = 0 \\ 0 & " \
        r"\text{otherwise} \end{cases} + " + " + ".join(["b"] * 60)
    pieces = break_cell(cases, 300.0)
    assert len(pieces) > 1 and r"\end{cases}" in pieces[0]
    # an aligned row: the left-hand side keeps its place; the rest continue after it
    rows = break_rows([("y", cell), (r"= c",)], page=400.0)
    assert rows[0][0] == "y" and all(len(r) == 1 for r in rows[1:])
    assert rows[-1] == (r"= c",)


LAYOUT_CHECK = """<script>
(function () {
  var maths = Array.from(document.querySelectorAll('math'));
  var empty = maths.filter(function (m) {
    var r = m.getBoundingClientRect(); return !(r.width > 0 && r.height > 0); }).length;
  var fracs = Array.from(document.querySelectorAll('mfrac'));
  var stacked = fracs.filter(function (f) {
    var a = f.children[0].getBoundingClientRect(), b = f.children[1].getBoundingClientRect();
    return a.bottom <= b.top + 0.5; }).length;
  var sections = Array.from(document.querySelectorAll('section')).map(function (s) {
    return [s.querySelector('h2').textContent, Math.ceil(s.getBoundingClientRect().height)];
  });
  var wide = Array.from(document.querySelectorAll('div.eq')).filter(function (d) {
    return d.scrollWidth > d.clientWidth + 1; }).length;
  var out = document.createElement('pre'); out.id = 'layout-check';
  out.textContent = JSON.stringify({math: maths.length, empty: empty, mfrac: fracs.length,
    stacked: stacked, merror: document.querySelectorAll('merror').length,
    sections: sections, wide: wide});
  document.body.appendChild(out);
})();
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True,
                          timeout=180)


# One screen: a 1280 x 960 CSS-pixel viewport (a 1080p display, less the browser's bars).
SCREEN = (1280, 960)


def _layout(tmp_path: Path, page: str) -> dict:
    """Lay the page out in headless Chromium and measure it (LAYOUT_CHECK)."""
    (tmp_path / "check.html").write_text(page.replace("</body>", LAYOUT_CHECK + "</body>"))
    res = _chromium(tmp_path, "--dump-dom", f"--window-size={SCREEN[0]},{SCREEN[1]}",
                    (tmp_path / "check.html").as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="layout-check">([^<]*)</pre>', res.stdout)
    assert found, res.stdout[-2000:]
    return json.loads(found.group(1))


def test_html_renders_offline_in_chromium(tmp_path: Path) -> None:
    page = symbackprop.derive(SEED, expand=True).html()
    assert not re.search(r"<script|<link|src=|href=|url\(|@import", page)  # nothing fetched
    (tmp_path / "seed.html").write_text(page)
    layout = _layout(tmp_path, page)
    assert layout["math"] > 30 and layout["empty"] == 0 and layout["merror"] == 0
    assert layout["mfrac"] > 40 and layout["stacked"] == layout["mfrac"]  # real MathML layout
    shot = _artifact("latex_seed_mlp.png")
    shot.unlink(missing_ok=True)
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000",
                    (tmp_path / "seed.html").as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_seed_html_reads_one_screen_per_section(tmp_path: Path, seed_doc) -> None:
    """Each section of the seed network's page fits one screen, and no equation needs
    a horizontal scroll bar."""
    layout = _layout(tmp_path, seed_doc.html())
    names = [name for name, _ in layout["sections"]]
    assert names == ["Notation", "The forward pass", "The backward pass", "The gradients"]
    for name, height in layout["sections"]:
        assert 50 < height <= SCREEN[1], (name, height)
    assert layout["wide"] == 0 and layout["merror"] == 0


def test_html_tells_arrays_from_entries(seed_doc) -> None:
    """Chromium ignores mathvariant: bold arrays are Unicode bold letters, so a bold
    matrix never looks like its entries; a prime sits on its function."""
    page = seed_doc.html()
    assert "mathvariant=\"bold" not in page
    assert "&#x1D73A;" in page and "&#x003B5;" in page  # bold epsilon, plain epsilon
    assert "&#x1D433;" in page and "<mi>z</mi>" in page  # bold z, plain z
    assert "<mi>&#x003C3;</mi><mi>&#x02032;</mi>" in page  # sigma, then its prime
    assert re.search(r'<mo stretchy="false" fence="true" form="prefix">', page)


def test_notebook_display_and_fragment(seed_doc) -> None:
    fragment = seed_doc.latex("fc2.bias")
    assert fragment.startswith("\\begin{array}{l}") and fragment.endswith("\\end{array}")
    assert "$" not in fragment and r"\mathbf{b}_{\mathrm{fc2}}" in fragment
    passes = seed_doc.passes()
    assert "\\text{" in passes["forward"] and "$" not in passes["backward"]
    assert seed_doc._repr_markdown_() == seed_doc.markdown()
    with pytest.raises(symbackprop.SymbackpropError):
        seed_doc.latex("nope.weight")
    assert textwrap.dedent(seed_doc.markdown()) == seed_doc.markdown()


# -- size ----------------------------------------------------------------------------------

def _deep_spec(depth: int) -> str:
    layers = "".join(f"  - {{name: h{n}, type: dense, units: 3, activation: tanh}}\n"
                     for n in range(1, depth + 1))
    return ("name: deep\ninputs: {x: [N, 3]}\ntargets: {t: [N, 1]}\nlayers:\n" + layers
            + "  - {name: out, type: dense, units: 1}\n"
            "loss: {type: mse, prediction: out, target: t}\n")


def test_derivations_grow_linearly_with_depth(tmp_path: Path) -> None:
    """DERIVATIONS (with the passes) of a network twice as deep is about twice as big:
    the passes are written once, each parameter's entry is one line."""
    sizes = {}
    for depth in (6, 12, 24):
        model = symbackprop.compile_spec(write_spec(tmp_path, _deep_spec(depth),
                                                    f"deep{depth}.yaml"))
        passes, lines = latex.module_derivations(model.spec, model.derivation, model.label)
        sizes[depth] = sum(len(e["literal"]) for e in passes + lines)
    assert sizes[24] <= 2.2 * sizes[12] and sizes[12] <= 2.2 * sizes[6], sizes
    assert sizes[24] >= 1.8 * sizes[12], sizes  # and it does grow: every layer is there


def test_max_pooling_states_its_arg_max_and_one_hot_in_the_derivation(tmp_path: Path) -> None:
    """The CNN's pooling: the arg-max of each window and its one-hot, the position written
    in the derivation's 1-based indices ((h - 1) W + w for the 1-based row h and column w:
    row 2(j - 1) + k, column 2(l - 1) + p of the 8 x 8 image), and the note's routing.
    The document compiles with pdflatex without an overfull line."""
    text = symbackprop.derive(EXAMPLES / "cnn.yaml").tex()
    assert (r"\mathrm{arg1}_{\mathrm{pool1},nijk} & = \operatorname{argmax}_{l, p} "
            r"\left(h_{\mathrm{relu1},n,i,2\,(j-1) + l,2\,(k-1) + p}\right)") in text
    assert (r"\text{if } \mathrm{arg1}_{\mathrm{pool1},nijl} = "
            r"16\,(j-1) + 8\,(k-1) + 2\,(l-1) + p") in text
    assert "routed to that one arg-max of each window" in text
    _pdflatex(tmp_path, text)
    log = (tmp_path / "doc.log").read_text(encoding="latin-1")
    assert "Overfull \\hbox" not in log, log[log.find("Overfull"):][:600]
