"""Render the generated modules: statements -> printed lines -> Jinja2 templates.

This module decides which statements each generated function holds (forward, loss,
loss-and-grad, and for torch the two halves of the ``autograd.Function``), prints them
with the backend's printer, and hands lines and metadata to the templates, which hold
module structure only.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
import sympy as sp
from sympy.core.relational import Relational

from .. import __version__, naming
from ..backprop import Derivation, derive
from ..graph import Graph, Node
from ..ir import passes
from ..ir.lower import Lowerer, gradient_statements
from ..ir.nodes import Assign, Map, Program
from ..ir.passes import memory
from ..spec import ModelSpec
from .arrays import array_printer
from .guards import guards

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


def docstring_text(text: str, *, multiline: bool = False) -> str:
    """``text`` escaped for the inside of a triple-double-quoted docstring.

    Spec text (a description, a file name) may hold quotes, backslashes, NUL, lone
    surrogates or control characters; pasted raw into a docstring, ``\"\"\"`` would end it
    and the next line would run at import. Escaped like this, the docstring evaluates to
    exactly ``text``, and the module's statements are the same whatever the text is.
    Only ``multiline`` text keeps its newlines as line breaks.
    """
    out: list[str] = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n" and multiline:
            out.append(ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


@dataclass
class Line:
    comment: list[str]
    code: str
    after: str = ""  # e.g. "del tmp0, fc1_z": free arrays right after their last use
    guard: str = ""  # run only under this condition (a gradient nobody asked for is skipped)
    release: str = ""  # e.g. "h1, h2": saved intermediates whose memory may be freed here
    heading: str = ""  # a pass begins here ("forward pass"): printed outside any guard


class _Printer:
    """Prints the statements of one program with one backend's array printer."""

    def __init__(self, backend: str, program: Program) -> None:
        self.program = program
        self.arrays = array_printer(backend, program)

    @property
    def helpers(self) -> set[str]:
        return self.arrays.helpers

    def lines(self, stmts: list[Assign], *, mark_phases: bool = False,
              keep: frozenset[str] | set[str],
              owned: frozenset[str] | set[str] = frozenset(),
              flags: dict[str, str | None] | None = None,
              released: frozenset[str] | set[str] = frozenset()) -> list[Line]:
        """Printed statements; every other array this function computes (or is handed in
        ``owned``) is deleted after its last use, so peak memory is what is live, not all
        that was made. ``flags``: optional outputs and the flag that asks for each (each
        statement then runs only when an output that needs it is asked for);
        ``released``: arrays freed through the template's release hook instead of
        ``del``."""
        stmts = memory(stmts, self.program, keep=keep, owned=owned)
        conditions = guards(stmts, flags) if flags is not None else [""] * len(stmts)
        # Boolean temporaries of this function, so a where() on a shared mask can still
        # be printed NaN-preserving (see the printers' _nan_preserving).
        self.arrays.scalar.conditions = {
            s.target: self.arrays.expression(s.op) for s in stmts
            if isinstance(s.op, Map) and isinstance(s.op.body, Relational)}
        out = []
        phase = ""
        for stmt, condition in zip(stmts, conditions, strict=True):
            comment = stmt.comment.splitlines() if stmt.comment else []
            heading = ""
            if mark_phases and stmt.phase != phase:
                phase = stmt.phase
                heading = ("---- forward pass ----" if phase == "forward" else
                           "---- backward pass: adjoints d_<tensor> = dL/d<tensor>, loss "
                           "first (d_loss = dL/dL = 1) ----")
            freed = [n for n in stmt.frees if n in released]
            dead = [n for n in stmt.frees if n not in released]
            out.append(Line(comment, f"{self.arrays.left_side(stmt)} = {self.arrays.code(stmt)}",
                            f"del {', '.join(dead)}" if dead else "", condition,
                            ", ".join(freed), heading))
        return out


def _shape_tuple(shape: tuple[sp.Expr, ...]) -> str:
    parts = [str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _lower(deriv: Derivation, *, seed_argument: bool) -> Program:
    return Lowerer(deriv, seed_argument=seed_argument).lower()


def render(spec: ModelSpec, deriv: Derivation, backend: str, spec_label: str,
           *, derivations: bool = True) -> str:
    """The source of one generated module, checked with ``ast.parse``."""
    graph = deriv.graph
    params = graph.params()
    inputs = [n for n in graph.nodes.values() if n.role == "input"]
    targets = [n for n in graph.nodes.values() if n.role == "target"]
    masks = [n for n in graph.nodes.values() if n.role == "mask"]
    used_targets = [t for t in targets if t.name in _reads_closure(deriv)]
    loss_var = graph.loss
    grads = deriv.grads

    # loss_and_grad's statements are what `latex --program` prints: lowered in one place.
    functional, lag_stmts = gradient_statements(deriv)
    pr = _Printer(backend, functional)
    forward_stmts = passes.function(functional, [graph.prediction])
    loss_stmts = passes.function(functional, [loss_var])
    grad_outputs = [loss_var, *grads.values()]
    # Every leaf's adjoint (inputs, targets, frozen parameters too): what a caller may ask
    # for at run time (numpy ``wrt=``, torch ``needs_input_grad``).
    full = _with_leaves(deriv)
    leaves = [n for n in graph.nodes.values() if n.role not in ("op", "mask")]
    leaf_label = {n.name: n.param if n.role == "param" else n.name for n in leaves}

    context: dict[str, object] = {
        "version": __version__,
        "model": spec.name,
        "description": docstring_text(spec.description, multiline=True),
        "spec_label": docstring_text(spec_label),
        "sha256": spec.sha256,
        "params": [
            {"name": p.param, "var": p.name, "shape": _shape_tuple(p.shape),
             "trainable": p.trainable, "init": p.init, "layer": p.layer}
            for p in params
        ],
        "trainable": [p.param for p in params if p.trainable],
        # Low-rank adapters merge_lora folds into their weights: W + scale * B @ A.
        "loras": [{"weight": p.param, "a": p.meta["lora"][0], "b": p.meta["lora"][1],
                   "scale": repr(float(p.meta["lora"][2]))}
                  for p in params if "lora" in p.meta],
        "inputs": [_tensor_context(graph, n) for n in inputs],
        "targets": [_tensor_context(graph, n) for n in used_targets],
        "dims": [{"name": name, "source": src, "axis": axis,
                  "limit": _limit_args(graph, name)}
                 for name, (src, axis) in functional.dims.items()],
        # Dropout masks: drawn by the module (0 or 1/(1-p)), arguments of nobody's.
        "masks": [{"name": n.name, "p": repr(float(n.meta["p"])), "shape": _shape_tuple(n.shape)}
                  for n in masks],
        # Any dropout layer (p = 0 too): the functions take training= and seed=.
        "dropout": any(layer.type == "dropout" for layer in spec.layers),
        "prediction": graph.prediction,
        "loss_var": loss_var,
        "grads": [{"name": name, "var": var} for name, var in grads.items()],
        "forward_lines": pr.lines(forward_stmts, keep={graph.prediction}),
        "loss_lines": pr.lines(loss_stmts, keep={loss_var}),
        "seed": deriv.seed.name,
    }
    used = {n.name for n in inputs} | {t.name for t in used_targets} | {p.name for p in params}
    # integer tensors (ids, class labels) have no gradient to ask for
    wrt_leaves = [n for n in leaves if n.name in used and n.dtype == "float"]
    helpers = set(pr.helpers)
    if backend == "numpy":
        # loss_and_grad(..., wrt=...): every leaf's gradient, each behind its flag.
        wide = _lower(full, seed_argument=False)
        wpr = _Printer(backend, wide)
        wrt_outputs = [loss_var, *(full.leaf_grads[n.name] for n in wrt_leaves)]
        flags: dict[str, str | None] = {loss_var: None}
        flags.update({full.leaf_grads[n.name]: naming.need_flag(n.name) for n in wrt_leaves})
        context.update({
            "wrt_lines": wpr.lines(passes.function(wide, wrt_outputs), mark_phases=True,
                                   keep=set(wrt_outputs), flags=flags),
            "wrt_leaves": [{"name": leaf_label[n.name], "var": full.leaf_grads[n.name],
                            "flag": naming.need_flag(n.name)} for n in wrt_leaves],
        })
        helpers |= wpr.helpers
    if backend == "torch":
        autograd = _lower(full, seed_argument=True)
        apr = _Printer(backend, autograd)
        # The autograd.Function's arguments: inputs, targets, dropout masks, then every
        # parameter. A mask is never differentiated (it has no gradient code).
        args = ([n.name for n in inputs] + [t.name for t in used_targets]
                + [m.name for m in masks] + [p.name for p in params])
        outputs = [loss_var, *(full.leaf_grads[a] for a in args if a in full.leaf_grads)]
        whole = passes.function(autograd, outputs)
        fwd = [s for s in whole if s.phase == "forward"]
        bwd = [s for s in whole if s.phase == "backward"]
        defined = {t for s in fwd for t in s.targets}
        kept = sorted({r for s in bwd for r in s.reads if r in defined} - {loss_var},
                      key=_order_key(whole, graph))
        flags = {full.leaf_grads[a]: naming.need_flag(a) for a in args
                 if a in full.leaf_grads}
        context.update({
            "fn_args": args,
            "n_leading": len(inputs) + len(used_targets) + len(masks),
            "fn_flags": [naming.need_flag(a) for a in args],
            # None: an integer or a dropout mask, which never gets a gradient
            "fn_grads": [full.leaf_grads.get(a) for a in args],
            "fwd_lines": apr.lines(fwd, keep={*kept, loss_var}),
            # The backward may free each saved intermediate after its last use (see
            # _release in the template), as autograd frees a node's saved tensors.
            "bwd_lines": apr.lines(bwd, keep=set(flags), owned=set(kept), flags=flags,
                                   released=set(kept)),
            "kept": kept,
            # numpy's loss_and_grad runs wrt_lines; torch's runs the plain gradient pass
            "lag_lines": pr.lines(lag_stmts, mark_phases=True, keep=set(grad_outputs)),
        })
        helpers |= apr.helpers
    # (pr printed loss_and_grad's lines last: helpers only they call count too)
    context["helpers"] = sorted(helpers | pr.helpers)
    from ..latex import module_derivations

    # The forward and backward passes once, then one line per parameter in their
    # symbols: the text grows linearly with depth; --no-derivations leaves it out.
    derivation_passes, lines = (module_derivations(spec, deriv, spec_label) if derivations
                                else ([], []))
    context["derivation_passes"] = derivation_passes
    context["derivations"] = lines
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


def _tensor_context(graph: Graph, node: Node) -> dict[str, object]:
    """An input or target as the templates see it. ``ids``: an integer tensor, and
    ``check`` the arguments of its run-time range check (empty when nothing bounds it)."""
    out: dict[str, object] = {"name": node.name, "shape": _shape_tuple(node.shape),
                              "dims": [str(d) for d in node.shape],
                              "ids": node.dtype == "int64", "check": ""}
    bound = graph.id_bounds.get(node.name)
    if bound is not None:
        out["check"] = f"{bound.high}, {bound.ignore!r}, {json.dumps(bound.reason)}"
    return out


def _limit_args(graph: Graph, dim: str) -> str:
    """The arguments of a bounded dimension's run-time check (empty when unbounded)."""
    limit = graph.dim_limits.get(dim)
    return "" if limit is None else f"{limit.max}, {json.dumps(limit.reason)}"


def _with_leaves(deriv: Derivation) -> Derivation:
    """``deriv`` again with every leaf's adjoint, derived once per derivation (both
    backends' modules use it)."""
    full = getattr(deriv, "_with_leaves", None)
    if full is None:
        full = derive(deriv.graph, leaves=True, reuse=deriv)
        deriv._with_leaves = full  # type: ignore[attr-defined]
    return full


def _order_key(stmts: list[Assign], graph: object) -> object:
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


__all__ = ["BACKENDS", "docstring_text", "render", "module_filename", "naming"]
