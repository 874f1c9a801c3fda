"""Render the generated modules: statements -> printed lines -> Jinja2 templates.

This module decides which statements each generated function holds (forward, loss,
loss-and-grad, and for torch the two halves of the ``autograd.Function``), prints them
with the backend's printer, and hands lines and metadata to the templates, which hold
module structure only.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import jinja2
import sympy as sp

from .. import __version__, naming
from ..backprop import Derivation, derive
from ..program import Lowerer, Program, Stmt
from ..spec import ModelSpec
from .guards import guards
from .printers import NumpyCodePrinter, NumpyDialect, TorchCodePrinter, TorchDialect

BACKENDS = ("numpy", "torch")


def template_dir() -> Path:
    """Templates ship inside the wheel; in a source checkout they live at the top level."""
    packaged = Path(__file__).resolve().parent.parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "templates"


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates are kept like Python keeps .pyc files: Jinja2's own per-user
    cache folder (private, in the temp directory), keyed by each template's source
    checksum, so an edited template is recompiled. Compiling both templates costs ~0.1 s,
    a twentieth of a cold ``generate``. No usable folder: compile every time."""
    try:
        return jinja2.FileSystemBytecodeCache()
    except (OSError, RuntimeError):
        return None


def _environment(*, cache: bool = True) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        bytecode_cache=_bytecode_cache() if cache else None,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["chomp"] = lambda text: str(text)[:-1] if str(text).endswith("\n") else str(text)
    return env


@dataclass
class Line:
    comment: list[str]
    code: str
    after: str = ""  # e.g. "del tmp0, fc1_z": free arrays right after their last use
    guard: str = ""  # run only under this condition (a gradient nobody asked for is skipped)
    release: str = ""  # e.g. "h1, h2": saved intermediates whose memory may be freed here


class _Printer:
    """Prints statements of one program with one backend's printer and dialect."""

    def __init__(self, backend: str, program: Program) -> None:
        self.backend = backend
        self.program = program
        self.printer = NumpyCodePrinter() if backend == "numpy" else TorchCodePrinter()
        self.printer.scalars = frozenset(n for n, shape in program.shapes.items() if not shape)
        self.dialect = NumpyDialect() if backend == "numpy" else TorchDialect()

    def lines(self, stmts: list[Stmt], *, mark_phases: bool = False,
              keep: frozenset[str] | set[str] | None = None,
              owned: frozenset[str] | set[str] = frozenset(),
              flags: dict[str, str | None] | None = None,
              released: frozenset[str] | set[str] = frozenset()) -> list[Line]:
        """Printed statements; with ``keep``, every other array this function computes
        (or is handed in ``owned``) is deleted after its last use, so peak memory is what
        is live, not all that was made."""
        last_use: dict[str, int] = {}
        defined = {stmt.target for stmt in stmts} | set(owned)
        for i, stmt in enumerate(stmts):
            for name in stmt.reads:
                last_use[name] = i
        dead: dict[int, list[str]] = {}
        if keep is not None:
            for name, i in last_use.items():
                if name in defined and name not in keep:
                    dead.setdefault(i, []).append(name)
        # Arrays this function allocated itself (not a plain alias of another name).
        fresh = {s.target for s in stmts if not (s.kind == "expr" and s.expr is not None
                                                  and s.expr.is_Symbol)}
        order = {stmt.target: n for n, stmt in enumerate(stmts)}
        conditions = guards(stmts, flags) if flags is not None else [""] * len(stmts)
        out = []
        phase = ""
        for i, stmt in enumerate(stmts):
            comment = stmt.comment.splitlines() if stmt.comment else []
            if mark_phases and stmt.phase != phase:
                phase = stmt.phase
                heading = ("forward pass" if phase == "forward" else
                           "backward pass: adjoints d_<tensor> = dL/d<tensor>, loss first")
                comment = [f"---- {heading} ----", *comment]
            names = sorted(dead.get(i, []), key=lambda n: (order.get(n, -1), n))
            code = self._in_place(stmt, set(names) & fresh) or self.code(stmt)
            freed = [n for n in names if n in released]
            names = [n for n in names if n not in released]
            out.append(Line(comment, f"{stmt.target} = {code}",
                            f"del {', '.join(names)}" if names else "", conditions[i],
                            ", ".join(freed)))
        return out

    def _in_place(self, stmt: Stmt, dying: set[str]) -> str:
        """numpy: f(a) written into a's own buffer when this statement is a's last use
        (``numpy.tanh(z, out=z)``): one array of that size fewer to allocate and fault in.
        Only arrays this function made itself qualify, never an argument or an alias."""
        expr = stmt.expr
        if (self.backend != "numpy" or stmt.kind != "expr" or expr is None
                or not isinstance(expr, sp.Function) or len(expr.args) != 1):
            return ""
        (arg,) = expr.args
        shape = self.program.shapes.get(stmt.target)
        if not (isinstance(arg, sp.Symbol) and arg.name in dying and shape
                and self.program.shapes.get(arg.name) == shape):
            return ""
        text = self.code(stmt)
        func = text[: -len(arg.name) - 2]
        if text != f"{func}({arg.name})" or func not in _NUMPY_UFUNCS:
            return ""
        return f"{func}({arg.name}, out={arg.name})"

    def code(self, stmt: Stmt) -> str:
        if stmt.kind == "code":
            return stmt.code
        assert stmt.expr is not None
        fused = self._product_plus(stmt)
        if fused:
            return fused
        expr = sp.piecewise_fold(stmt.expr) if stmt.expr.has(sp.Piecewise) else stmt.expr
        text = self.printer.doprint(expr)
        if stmt.kind == "sum":
            # A sum over every axis needs no axis argument (and is faster without one).
            full = self.program.shapes.get(stmt.target) == ()
            return self.dialect.reduce_sum(text, () if full else stmt.axes, wrap=True)
        return text

    def _product_plus(self, stmt: Stmt) -> str:
        """``(a @ b) + c`` as one call: torch ``addmm`` (the add rides on the product);
        numpy ``_linear(a, w, c)`` for ``a @ w.T`` (the add done in place), when the sum
        has the product's shape."""
        expr = stmt.expr
        if stmt.kind != "expr" or not isinstance(expr, sp.Add) or len(expr.args) != 2:
            return ""
        products = [a for a in expr.args if isinstance(a, sp.Symbol)
                    and a.name in self.program.products]
        others = [a for a in expr.args if isinstance(a, sp.Symbol) and a not in products
                  and not a.is_integer]
        if len(products) != 1 or len(others) != 1:
            return ""
        left, right = self.program.products[products[0].name]
        if self.backend == "torch":
            return f"torch.addmm({others[0].name}, {left}, {right})"
        shape = self.program.shapes.get(stmt.target)
        if (not right.endswith(".T") or left.endswith(".T")
                or self.program.shapes.get(products[0].name) != shape):
            return ""
        return f"_linear({left}, {right[:-2]}, {others[0].name})"


# numpy ufuncs that take out= (what the printer emits for one-argument functions).
_NUMPY_UFUNCS = frozenset(f"numpy.{name}" for name in (
    "tanh", "exp", "log", "sqrt", "sin", "cos", "tan", "sinh", "cosh", "arcsin", "arccos",
    "arctan", "arcsinh", "arccosh", "arctanh", "log1p", "expm1", "abs", "absolute",
    "square", "negative", "sign", "exp2", "log2", "log10"))


def _shape_tuple(shape: tuple[sp.Expr, ...]) -> str:
    parts = [str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _lower(deriv: Derivation, backend: str, *, seed_argument: bool) -> Program:
    dialect = NumpyDialect() if backend == "numpy" else TorchDialect()
    return Lowerer(deriv, dialect, seed_argument=seed_argument).lower()


def render(spec: ModelSpec, deriv: Derivation, backend: str, spec_label: str,
           *, derivations: bool = True) -> str:
    """The source of one generated module, checked with ``ast.parse``."""
    graph = deriv.graph
    params = graph.params()
    inputs = [n for n in graph.nodes.values() if n.role == "input"]
    targets = [n for n in graph.nodes.values() if n.role == "target"]
    used_targets = [t for t in targets if t.name in _reads_closure(deriv)]
    loss_var = graph.loss
    grads = deriv.grads

    functional = _lower(deriv, backend, seed_argument=False)
    pr = _Printer(backend, functional)
    forward_stmts = functional.function([graph.prediction])
    loss_stmts = functional.function([loss_var])
    grad_outputs = [loss_var, *grads.values()]
    lag_stmts = functional.function(grad_outputs)
    # Every leaf's adjoint (inputs, targets, frozen parameters too): what a caller may ask
    # for at run time (numpy ``wrt=``, torch ``needs_input_grad``).
    full = _with_leaves(deriv)
    leaves = [n for n in graph.nodes.values() if n.role != "op"]
    leaf_label = {n.name: n.param if n.role == "param" else n.name for n in leaves}

    context: dict[str, object] = {
        "version": __version__,
        "model": spec.name,
        "description": spec.description,
        "spec_label": spec_label,
        "sha256": spec.sha256,
        "params": [
            {"name": p.param, "var": p.name, "shape": _shape_tuple(p.shape),
             "trainable": p.trainable, "init": p.init, "layer": p.layer}
            for p in params
        ],
        "trainable": [p.param for p in params if p.trainable],
        "inputs": [{"name": n.name, "shape": _shape_tuple(n.shape),
                    "dims": [str(d) for d in n.shape]} for n in inputs],
        "targets": [{"name": n.name, "shape": _shape_tuple(n.shape),
                     "dims": [str(d) for d in n.shape]} for n in used_targets],
        "dims": [{"name": name, "source": src, "axis": axis}
                 for name, (src, axis) in functional.dims.items()],
        "prediction": graph.prediction,
        "loss_var": loss_var,
        "grads": [{"name": name, "var": var} for name, var in grads.items()],
        "forward_lines": pr.lines(forward_stmts, keep={graph.prediction}),
        "loss_lines": pr.lines(loss_stmts, keep={loss_var}),
        "lag_lines": pr.lines(lag_stmts, mark_phases=True, keep=set(grad_outputs)),
        "seed": deriv.seed.name,
    }
    used = {n.name for n in inputs} | {t.name for t in used_targets} | {p.name for p in params}
    wrt_leaves = [n for n in leaves if n.name in used]
    helpers = set(pr.printer.helpers)
    if backend == "numpy":
        # loss_and_grad(..., wrt=...): every leaf's gradient, each behind its flag.
        wide = _lower(full, backend, seed_argument=False)
        wpr = _Printer(backend, wide)
        wrt_outputs = [loss_var, *(full.leaf_grads[n.name] for n in wrt_leaves)]
        flags: dict[str, str | None] = {loss_var: None}
        flags.update({full.leaf_grads[n.name]: naming.need_flag(n.name) for n in wrt_leaves})
        context.update({
            "wrt_lines": wpr.lines(wide.function(wrt_outputs), mark_phases=True,
                                   keep=set(wrt_outputs), flags=flags),
            "wrt_leaves": [{"name": leaf_label[n.name], "var": full.leaf_grads[n.name],
                            "flag": naming.need_flag(n.name)} for n in wrt_leaves],
        })
        helpers |= wpr.printer.helpers
    if backend == "torch":
        autograd = _lower(full, backend, seed_argument=True)
        apr = _Printer(backend, autograd)
        # The autograd.Function's arguments: inputs, targets, then every parameter.
        args = [n.name for n in inputs] + [t.name for t in used_targets] + [p.name for p in params]
        outputs = [loss_var, *(full.leaf_grads[a] for a in args)]
        whole = autograd.function(outputs)
        fwd = [s for s in whole if s.phase == "forward"]
        bwd = [s for s in whole if s.phase == "backward"]
        defined = {s.target for s in fwd}
        kept = sorted({r for s in bwd for r in s.reads if r in defined} - {loss_var},
                      key=_order_key(whole, graph))
        flags = {full.leaf_grads[a]: naming.need_flag(a) for a in args}
        bwd_dims = [d for d in autograd.dims if any(
            d in {sym.name for sym in (s.expr.free_symbols if s.expr is not None else ())}
            or d in s.code for s in bwd)]
        context.update({
            "fn_args": args,
            "n_leading": len(inputs) + len(used_targets),
            "fn_flags": [naming.need_flag(a) for a in args],
            "fn_grads": [full.leaf_grads[a] for a in args],
            "fwd_lines": apr.lines(fwd, keep={*kept, loss_var}),
            # The backward may free each saved intermediate after its last use (see
            # _release in the template), as autograd frees a node's saved tensors.
            "bwd_lines": apr.lines(bwd, keep=set(flags), owned=set(kept), flags=flags,
                                   released=set(kept)),
            "kept": kept,
            "bwd_dims": bwd_dims,
        })
        helpers |= apr.printer.helpers
    all_code = "\n".join(line.code for key in ("forward_lines", "loss_lines", "lag_lines",
                                               "fwd_lines", "bwd_lines", "wrt_lines")
                         for line in context.get(key, []))  # type: ignore[attr-defined]
    for helper in ("logsumexp", "log_softmax", "linear", "matmul_nt"):
        if f"_{helper}(" in all_code:
            helpers.add(helper)
    context["helpers"] = sorted(helpers)
    context["param_vars"] = {p.param: p.name for p in params}
    from ..latex import module_derivations

    # Each parameter's derivation repeats the forward pass (each entry stands alone), so
    # the text grows with the square of the depth; --no-derivations leaves it out.
    context["derivations"] = module_derivations(spec, deriv, spec_label) if derivations else []
    context["derivations_off"] = not derivations
    name = f"{backend}_module.py.j2"
    try:
        template = _environment().get_template(name)
    except OSError:  # the bytecode cache could not be read or written (a full disk)
        template = _environment(cache=False).get_template(name)
    source = template.render(**context)
    try:
        ast.parse(source)
    except SyntaxError as exc:  # pragma: no cover - a bug in symbackprop, not user input
        raise RuntimeError(f"generated {backend} module does not parse: {exc}") from exc
    return source


def _with_leaves(deriv: Derivation) -> Derivation:
    """``deriv`` again with every leaf's adjoint, derived once per derivation (both
    backends' modules use it)."""
    full = getattr(deriv, "_with_leaves", None)
    if full is None:
        full = derive(deriv.graph, leaves=True, reuse=deriv)
        deriv._with_leaves = full  # type: ignore[attr-defined]
    return full


def _order_key(stmts: list[Stmt], graph: object) -> object:
    order = {s.target: n for n, s in enumerate(stmts)}
    names = list(graph.nodes)  # type: ignore[attr-defined]

    def key(name: str) -> tuple[int, int, str]:
        if name in names:
            return (0, names.index(name), name)
        return (1, order.get(name, 0), name)

    return key


def _reads_closure(deriv: Derivation) -> set[str]:
    """Leaf tensors the loss reads (targets the loss ignores are not arguments)."""
    names: set[str] = set()
    for node in deriv.fused.nodes.values():
        names.update(node.operands)
    names.update(deriv.graph.nodes[deriv.graph.prediction].operands)
    return names


def module_filename(model: str, backend: str) -> str:
    return f"{model}_{backend}.py"


__all__ = ["BACKENDS", "render", "module_filename", "naming"]
