"""Lowering: index notation -> one straight-line program of array statements.

Each forward tensor and each adjoint is an index expression. Lowering turns it into
statements a backend can print:

* ``Sum`` of a product of two tensors -> a matrix product (``x @ W.T``), or einsum when
  the indices do not form one;
* ``Sum`` of one tensor -> ``.sum(axis)``; any other ``Sum`` -> a fused elementwise
  expression reduced over its summed axes;
* ``log(Sum(exp(f)))`` -> the max-shifted logsumexp helper (stable by construction);
* everything else -> one elementwise expression where each tensor reference becomes an
  aligned view (``lse[:, None]``, ``W.T``), so numpy/torch broadcasting implements the
  index semantics.

Then, per generated function: dead statements are dropped, elementwise temporaries used
once are inlined into their single reader (one fused expression per elementwise region),
and ``sympy.cse`` factors what forward and backward share.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import sympy as sp

from . import naming
from .backprop import Derivation, target_indices
from .graph import ref, ref_name
from .naming import TEMP_PREFIX

Phase = Literal["forward", "backward"]


class Dialect(Protocol):
    """How one backend spells array operations that are not elementwise math."""

    module: str

    def transpose(self, var: str, perm: tuple[int, ...]) -> str: ...
    def matmul(self, a: str, b: str, *, nt: bool) -> str: ...
    def reduce_sum(self, code: str, axes: tuple[int, ...], *, wrap: bool) -> str: ...
    def einsum(self, subscripts: str, a: str, b: str) -> str: ...
    def logsumexp(self, code: str, axis: int) -> str: ...
    def log_softmax(self, code: str, axis: int) -> str: ...
    def filled(self, like: str, shape: str, value: str) -> str: ...
    def ones_like(self, var: str) -> str: ...


@dataclass
class Stmt:
    """``target = <expr or code>``.

    kind ``expr``: an elementwise sympy expression over view symbols (see ``Program.views``);
    kind ``sum``: ``expr`` reduced over ``axes``; kind ``code``: a printed call.
    """

    target: str
    kind: Literal["expr", "sum", "code"]
    expr: sp.Expr | None = None
    code: str = ""
    axes: tuple[int, ...] = ()
    reads: frozenset[str] = frozenset()
    comment: str = ""
    phase: Phase = "forward"


@dataclass
class Program:
    """All statements of a model, plus what each view symbol reads."""

    stmts: list[Stmt]
    views: dict[sp.Symbol, frozenset[str]] = field(default_factory=dict)
    dims: dict[str, tuple[str, int]] = field(default_factory=dict)
    shapes: dict[str, tuple[sp.Expr, ...]] = field(default_factory=dict)
    products: dict[str, tuple[str, str]] = field(default_factory=dict)
    dialect: Dialect | None = None

    def function(self, outputs: Sequence[str], *, keep: Iterable[str] = ()) -> list[Stmt]:
        """The statements needed for ``outputs``, optimised (inlined, CSE'd)."""
        needed = set(outputs)
        kept: list[Stmt] = []
        for stmt in reversed(self.stmts):
            if stmt.target in needed:
                kept.append(stmt)
                needed |= stmt.reads
        kept.reverse()
        protected = {*outputs, *keep}
        kept = _inline(kept, self.views, protected=protected)
        kept = _cse(kept, self.views)
        if self.dialect is not None:
            kept = _log_softmax(kept, self.views, self.shapes, self.dialect, protected)
        return kept


Views = dict[sp.Symbol, frozenset[str]]


def _reads(expr: sp.Expr, views: Views) -> frozenset[str]:
    out: set[str] = set()
    for sym in expr.free_symbols:
        out |= views.get(sym, frozenset())
    return frozenset(out)


def _identity_view(sym: sp.Symbol, views: Views) -> bool:
    return views.get(sym) == frozenset({sym.name})


def _inline(stmts: list[Stmt], views: Views, protected: set[str]) -> list[Stmt]:
    """Substitute elementwise temporaries read exactly once, through an identity view."""
    changed = True
    while changed:
        changed = False
        counts: dict[str, int] = {}
        for stmt in stmts:
            for name in stmt.reads:
                counts[name] = counts.get(name, 0) + (
                    _occurrences(stmt, name, views))
        for pos, stmt in enumerate(stmts):
            if (stmt.kind != "expr" or stmt.target in protected
                    or not stmt.target.startswith(TEMP_PREFIX)
                    or counts.get(stmt.target) != 1):
                continue
            for later in stmts[pos + 1:]:
                if stmt.target not in later.reads:
                    continue
                sym = sp.Symbol(stmt.target)
                if later.kind == "code" or later.expr is None or sym not in later.expr.free_symbols:
                    break
                if later.phase != stmt.phase:
                    break
                assert stmt.expr is not None
                new_expr = later.expr.xreplace({sym: stmt.expr})
                stmts = [s for s in stmts if s is not stmt]
                idx = stmts.index(later)
                stmts[idx] = replace(later, expr=new_expr, reads=_reads(new_expr, views),
                                     comment=_join(stmt.comment, later.comment))
                changed = True
                break
            if changed:
                break
    return stmts


def _log_softmax(stmts: list[Stmt], views: Views, shapes: dict[str, tuple[sp.Expr, ...]],
                 dialect: Dialect, protected: set[str]) -> list[Stmt]:
    """``lse = logsumexp(a, last axis); t = a - lse[..., None]`` -> ``t = log_softmax(a)``
    when nothing else reads ``lse``.

    Softmax cross-entropy's forward and its gradient share ``a - lse`` (sympy's cse finds
    it); the backends compute it in one call that never materialises ``lse`` (torch's
    log_softmax kernel; numpy's helper shifts by the row max once instead of twice).
    """
    readers: dict[str, int] = {}
    for stmt in stmts:
        for name in stmt.reads:
            readers[name] = readers.get(name, 0) + 1
    out = list(stmts)
    for lse in stmts:
        if lse.kind != "code" or lse.target in protected or readers.get(lse.target) != 1 \
                or len(lse.reads) != 1:
            continue
        (src,) = lse.reads
        axis = len(shapes.get(lse.target, ()))
        if lse.code != dialect.logsumexp(src, axis) or len(shapes.get(src, ())) != axis + 1:
            continue
        aligned = lse.target + ("[" + ", ".join([":"] * axis + ["None"]) + "]" if axis else "")
        want = sp.Symbol(src) - sp.Symbol(aligned)
        for pos, stmt in enumerate(out):
            if (stmt.kind == "expr" and stmt.expr == want and stmt.reads == {src, lse.target}
                    and _identity_view(sp.Symbol(src), views)
                    and views.get(sp.Symbol(aligned)) == frozenset({lse.target})):
                out[pos] = replace(stmt, kind="code", expr=None, reads=frozenset({src}),
                                   code=dialect.log_softmax(src, axis),
                                   comment=_join(lse.comment, f"log-softmax: {stmt.target} = "
                                                 f"{src} - {lse.target}, in one call"))
                out.remove(lse)
                break
    return out


def _join(first: str, second: str) -> str:
    if not first:
        return second
    if not second or first == second:
        return first
    return f"{first}\n{second}"


def _occurrences(stmt: Stmt, name: str, views: Views) -> int:
    if stmt.kind == "code" or stmt.expr is None:
        return 2  # read by a call: never inline into it
    total = 0
    for sym in stmt.expr.free_symbols:
        if name in views.get(sym, frozenset()):
            if not _identity_view(sym, views):
                return 2
            total += stmt.expr.count(sym)
    return total


def _cse(stmts: list[Stmt], views: Views) -> list[Stmt]:
    """Common subexpressions across the function's elementwise statements."""
    positions = [i for i, s in enumerate(stmts) if s.kind in ("expr", "sum")]
    exprs = [stmts[i].expr for i in positions]
    if not exprs:
        return stmts
    taken = {s.target for s in stmts} | {v for vs in views.values() for v in vs}
    names = (sp.Symbol(naming.temp(n)) for n in range(10**6)
             if naming.temp(n) not in taken)
    replacements, reduced = sp.cse(exprs, symbols=names, order="none", list=True)
    # A shared subexpression of shape symbols and numbers only (1/N) is cheaper inline.
    scalar = {sym: expr for sym, expr in replacements if not _reads(expr, views)
              and not any(s in dict(replacements) for s in expr.free_symbols)}
    while scalar:
        replacements = [(sym, expr.xreplace(scalar)) for sym, expr in replacements
                        if sym not in scalar]
        reduced = [expr.xreplace(scalar) for expr in reduced]
        scalar = {sym: expr for sym, expr in replacements if not _reads(expr, views)
                  and not any(s in dict(replacements) for s in expr.free_symbols)}
    if not replacements:
        for i, expr in zip(positions, reduced, strict=True):
            stmts[i] = replace(stmts[i], expr=expr)
        return stmts
    local_views = dict(views)
    for sym, _ in replacements:
        local_views[sym] = frozenset({sym.name})
    out = list(stmts)
    for i, expr in zip(positions, reduced, strict=True):
        out[i] = replace(out[i], expr=expr, reads=_reads(expr, local_views))
    # Place each temporary just before the first statement that (transitively) reads it.
    temps = [Stmt(sym.name, "expr", expr, reads=_reads(expr, local_views))
             for sym, expr in replacements]
    result: list[Stmt] = []
    placed: set[str] = set()

    def place(name: str, phase: Phase) -> None:
        for temp in temps:
            if temp.target == name and name not in placed:
                for dep in sorted(temp.reads):
                    place(dep, phase)
                placed.add(name)
                result.append(replace(temp, phase=phase))

    for stmt in out:
        for dep in sorted(stmt.reads):
            place(dep, stmt.phase)
        result.append(stmt)
    views.update({sym: frozenset({sym.name}) for sym, _ in replacements})
    return result


class Lowerer:
    """Turns a :class:`Derivation` into a :class:`Program` for one backend dialect."""

    def __init__(self, deriv: Derivation, dialect: Dialect, *, seed_argument: bool) -> None:
        """``seed_argument``: dL/dL arrives as an argument (autograd's grad_output);
        otherwise the program sets it to a one of the loss's dtype."""
        self.deriv = deriv
        self.dialect = dialect
        self.seed_argument = seed_argument
        self.stmts: list[Stmt] = []
        self.views: Views = {}
        self.shapes: dict[str, tuple[sp.Expr, ...]] = {}
        self.like = ""
        self.counter = 0
        self.embedded: dict[str, tuple[sp.Symbol, tuple[sp.Symbol, ...]]] = {}
        # "(a @ b)" -> (a, b) for 2-D products, so torch can fuse "+ bias" into addmm
        self.products: dict[str, tuple[str, str]] = {}
        graph = deriv.graph
        for node in graph.nodes.values():
            if node.role != "op":
                self.shapes[node.name] = node.shape
                if not self.like and node.role == "input":
                    self.like = node.name
        self.dims: dict[str, tuple[str, int]] = {}
        for node in graph.nodes.values():
            if node.role in ("input", "target"):
                for axis, dim in enumerate(node.shape):
                    if dim.is_Symbol and dim.name not in self.dims:
                        self.dims[dim.name] = (node.name, axis)

    # -- public -------------------------------------------------------------------------
    def lower(self) -> Program:
        deriv = self.deriv
        seed_sym = deriv.seed
        for name in deriv.computed:
            node = deriv.node(name)
            self.shapes[name] = node.shape
            self.assign(name, deriv.forward[name], node.indices(), "forward",
                        _forward_comment(deriv, name))
        for adj in deriv.adjoints:
            node = deriv.node(adj.node)
            self.shapes[adj.var] = node.shape
            if adj.var == seed_sym.name:
                self.shapes[adj.var] = ()
                if not self.seed_argument:
                    # A 0-d array rather than the number 1: every gradient then has the
                    # loss's dtype, even one that is a constant (a masked 1/N).
                    self.stmts.append(Stmt(adj.var, "code",
                                           code=self.dialect.ones_like(deriv.graph.loss),
                                           reads=frozenset({deriv.graph.loss}),
                                           comment="the seed: dL/dL = 1, in the loss's dtype",
                                           phase="backward"))
                continue
            self.assign(adj.var, adj.expr, target_indices(node), "backward",
                        _backward_comment(deriv, adj.node))
        return Program(self.stmts, self.views, self.dims, self.shapes, self.products,
                       self.dialect)

    # -- statements ---------------------------------------------------------------------
    def assign(self, target: str, expr: sp.Expr, axes: tuple[sp.Symbol, ...], phase: Phase,
               comment: str) -> None:
        extents = dict(zip(axes, self._target_shape(target), strict=True))
        first = len(self.stmts)
        bound = {lim[0] for lim in expr.limits} if isinstance(expr, sp.Sum) else set()
        if (isinstance(expr, sp.Sum) and not _is_lse(expr)
                and self._free(expr.function, bound, axes) == axes):
            self._lower_sum(expr, axes, extents, phase, "", target=target)
        elif _is_lse(expr):
            self._lower_lse(expr, phase, extents, target=target)
        else:
            lowered = self._lower_sums(expr, phase, extents)
            self._emit_elementwise(target, lowered, axes, extents, phase, "")
        self.stmts[first] = replace(self.stmts[first], comment=comment)

    def _target_shape(self, target: str) -> tuple[sp.Expr, ...]:
        return self.shapes[target]

    def _temp(self) -> str:
        self.counter += 1
        return naming.partial(self.counter)

    def _emit_elementwise(self, target: str, expr: sp.Expr, axes: tuple[sp.Symbol, ...],
                          extents: dict[sp.Symbol, sp.Expr], phase: Phase,
                          comment: str) -> None:
        viewed = self._viewify(expr, axes)
        covered = {i for r in expr.atoms(sp.Indexed) for i in r.indices}
        if any(a not in covered for a in axes):
            shape = self._shape_code(tuple(extents[a] for a in axes))
            code = self.dialect.filled(self.like, shape, "0")
            zero = self._code_symbol(code, [self.like])
            viewed = viewed + zero
        self.stmts.append(Stmt(target, "expr", viewed, reads=_reads(viewed, self.views),
                               comment=comment, phase=phase))

    def _code_symbol(self, code: str, reads: Iterable[str]) -> sp.Symbol:
        """An opaque array expression (a matrix product) embedded in elementwise code."""
        sym = sp.Symbol(code)
        self.views[sym] = frozenset(reads)
        return sym

    def _shape_code(self, shape: tuple[sp.Expr, ...]) -> str:
        parts = [str(d) for d in shape]
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"

    # -- sums ---------------------------------------------------------------------------
    def _lower_sums(self, expr: sp.Expr, phase: Phase,
                    extents: dict[sp.Symbol, sp.Expr]) -> sp.Expr:
        if _is_lse(expr):
            return self._lower_lse(expr, phase, extents)
        if isinstance(expr, sp.Sum):
            return self._lower_sum(expr, None, extents, phase, "")
        if not expr.args or isinstance(expr, sp.Indexed):
            return expr
        return expr.func(*(self._lower_sums(a, phase, extents) for a in expr.args))

    def _free(self, expr: sp.Expr, bound: set[sp.Symbol],
              order: tuple[sp.Symbol, ...] | None) -> tuple[sp.Symbol, ...]:
        seen: list[sp.Symbol] = []
        for r in sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key):
            for i in r.indices:
                if i.is_Symbol and i not in bound and i not in seen:
                    seen.append(i)
        if order is not None:
            return tuple(a for a in order if a in seen)
        return tuple(sorted(seen, key=lambda s: s.name))

    def _lower_sum(self, expr: sp.Sum, axes: tuple[sp.Symbol, ...] | None,
                   extents: dict[sp.Symbol, sp.Expr], phase: Phase, comment: str,
                   target: str | None = None) -> sp.Expr:
        limits = [lim[0] for lim in expr.limits]
        for var, lo, hi in expr.limits:
            extents[var] = hi - lo + 1
        body = self._lower_sums(expr.function, phase, extents)
        free = self._free(body, set(limits), axes)
        nested = target is None
        if target is None:
            target = self._temp()
        factors = sp.Mul.make_args(body)
        tensors = [f for f in factors if isinstance(f, sp.Indexed)]
        scalars = sp.Mul(*(f for f in factors if not isinstance(f, sp.Indexed)))
        index_free_scalar = not any(isinstance(a, sp.Indexed) for a in scalars.atoms(sp.Indexed))
        self.shapes[target] = tuple(extents[a] for a in free)
        out = ref(target, free)
        if index_free_scalar and len(tensors) == 2 and scalars == 1:
            code = self._contraction(tensors[0], tensors[1], tuple(limits), free)
            reads = frozenset(ref_name(t) for t in tensors)  # type: ignore[misc]
            if nested:
                self.shapes[_embed_name(code)] = self.shapes[target]
                return self._embedded(code, reads, free)
            self.stmts.append(Stmt(target, "code", code=code, reads=reads, comment=comment,
                                   phase=phase))
            return out
        if index_free_scalar and len(tensors) == 1 and scalars == 1 and \
                len(set(tensors[0].indices)) == len(tensors[0].indices):
            (tensor,) = tensors
            src = ref_name(tensor)
            assert src is not None
            axis_of = {i: n for n, i in enumerate(tensor.indices)}
            keep = [i for i in tensor.indices if i not in limits]
            if tuple(keep) == free:
                axes_code = tuple(axis_of[v] for v in limits)
                code = self.dialect.reduce_sum(src, axes_code, wrap=False)
                if nested:
                    return self._embedded(code, {src}, free)
                self.stmts.append(Stmt(target, "code", code=code, reads=frozenset({src}),
                                       comment=comment, phase=phase))
                return out
        full = (*free, *limits)
        viewed = self._viewify(body, full)
        covered = {i for r in body.atoms(sp.Indexed) for i in r.indices}
        scale = sp.Mul(*(extents[v] for v in limits if v not in covered))
        reduce_axes = tuple(n for n, v in enumerate(full) if v in limits and v in covered)
        if not reduce_axes:
            self.stmts.append(Stmt(target, "expr", viewed * scale,
                                   reads=_reads(viewed, self.views), comment=comment,
                                   phase=phase))
            return out
        self.stmts.append(Stmt(target, "sum", viewed * scale, axes=reduce_axes,
                               reads=_reads(viewed, self.views), comment=comment, phase=phase))
        return out

    def _embedded(self, code: str, reads: Iterable[str],
                  free: tuple[sp.Symbol, ...]) -> sp.Expr:
        """Stand-in tensor for an array call used inside a larger elementwise expression."""
        name = _embed_name(code)
        sym = self._code_symbol(name, reads)
        self.embedded[name] = (sym, free)
        return ref(name, free) if free else sym

    def _contraction(self, a: sp.Indexed, b: sp.Indexed, limits: tuple[sp.Symbol, ...],
                     free: tuple[sp.Symbol, ...]) -> str:
        an, bn = ref_name(a), ref_name(b)
        assert an is not None and bn is not None
        ia, ib = tuple(a.indices), tuple(b.indices)
        if len(limits) == 1 and len(set(ia)) == len(ia) and len(set(ib)) == len(ib):
            (c,) = limits
            operands = _matmul(an, ia, bn, ib, c, free) or _matmul(bn, ib, an, ia, c, free)
            if operands:
                left, right = operands
                matrices = len(ia) == 2 and len(ib) == 2
                nt = matrices and right.endswith(".T") and not left.endswith(".T")
                code = self.dialect.matmul(left, right, nt=nt)
                if matrices:
                    self.products[_embed_name(code)] = (left, right)
                return code
        letters: dict[sp.Symbol, str] = {}
        for i in (*ia, *ib):
            letters.setdefault(i, "abcdefghijklmnopqrstuvwxyz"[len(letters)])
        sub = ("".join(letters[i] for i in ia) + "," + "".join(letters[i] for i in ib)
               + "->" + "".join(letters[i] for i in free))
        return self.dialect.einsum(sub, an, bn)

    def _lower_lse(self, expr: sp.log, phase: Phase, extents: dict[sp.Symbol, sp.Expr],
                   target: str | None = None) -> sp.Expr:
        inner: sp.Sum = expr.args[0]
        limits = [lim[0] for lim in inner.limits]
        for var, lo, hi in inner.limits:
            extents[var] = hi - lo + 1
        (c,) = limits
        arg = self._lower_sums(inner.function.args[0], phase, extents)
        free = self._free(arg, {c}, None)
        full = (*free, c)
        if isinstance(arg, sp.Indexed) and tuple(arg.indices) == full:
            src = ref_name(arg)
            assert src is not None
        else:
            src = self._temp()
            self.shapes[src] = tuple(extents[a] for a in full)
            viewed = self._viewify(arg, full)
            self.stmts.append(Stmt(src, "expr", viewed, reads=_reads(viewed, self.views),
                                   phase=phase))
        target = target or self._temp()
        self.shapes[target] = tuple(extents[a] for a in free)
        self.stmts.append(Stmt(target, "code", code=self.dialect.logsumexp(src, len(full) - 1),
                               reads=frozenset({src}), phase=phase))
        return ref(target, free)

    # -- views --------------------------------------------------------------------------
    def _viewify(self, expr: sp.Expr, axes: tuple[sp.Symbol, ...]) -> sp.Expr:
        mapping: dict[sp.Expr, sp.Symbol] = {}
        for r in expr.atoms(sp.Indexed):
            mapping[r] = self._view(r, axes)
        for s in expr.free_symbols:
            name = ref_name(s)
            if name is not None and not isinstance(s, sp.Indexed):
                sym = sp.Symbol(name)
                self.views.setdefault(sym, frozenset({name}))
                mapping[s] = sym
        return expr.xreplace(mapping)

    def _view(self, r: sp.Indexed, axes: tuple[sp.Symbol, ...]) -> sp.Symbol:
        name = ref_name(r)
        assert name is not None
        idx = tuple(r.indices)
        prefix = name
        if any(i.is_Integer for i in idx):
            # A constant index is a stretched size-1 axis: drop it, then align the rest.
            picks = ", ".join(str(i) if i.is_Integer else ":" for i in idx)
            prefix = f"{name}[{picks}]"
            idx = tuple(i for i in idx if not i.is_Integer)
        if any(i not in axes for i in idx) or len(set(idx)) != len(idx):
            raise AssertionError(f"cannot align {r} to axes {axes}")  # pragma: no cover
        pos = [axes.index(i) for i in idx]
        order = tuple(sorted(range(len(idx)), key=lambda n: pos[n]))
        code = prefix
        if order != tuple(range(len(idx))):
            code = self.dialect.transpose(prefix, order)
        sorted_pos = sorted(pos)
        if sorted_pos:
            span = range(sorted_pos[0], len(axes))
            parts = [":" if p in sorted_pos else "None" for p in span]
            if "None" in parts:
                while parts and parts[-1] == ":":
                    parts.pop()
                code = f"{code}[{', '.join(parts)}]"
        sym = sp.Symbol(code)
        self.views[sym] = (self.views[self.embedded[name][0]] if name in self.embedded
                           else frozenset({name}))
        return sym


def _embed_name(code: str) -> str:
    """The printed stand-in for an array call inside a larger expression: a binary
    ``a @ b`` needs parentheses, a function call does not."""
    return f"({code})" if " @ " in code and not code.endswith(")") else code


def _matmul(an: str, ia: tuple, bn: str, ib: tuple, c: sp.Symbol,
            free: tuple[sp.Symbol, ...]) -> tuple[str, str] | None:
    """The operands of ``a @ b`` (with .T where needed) when the indices form a matrix
    product."""
    if c not in ia or c not in ib:
        return None
    if len(ib) != 2:
        return None
    (q,) = [i for i in ib if i != c]
    a_rest = [i for i in ia if i != c]
    if tuple(free) != (*a_rest, q):
        return None
    if len(ia) == 2:
        a_code = an if ia[-1] == c else f"{an}.T"
    elif ia[-1] == c:
        a_code = an
    else:
        return None
    b_code = bn if ib[0] == c else f"{bn}.T"
    return a_code, b_code


def _is_lse(expr: sp.Expr) -> bool:
    return (isinstance(expr, sp.log) and isinstance(expr.args[0], sp.Sum)
            and isinstance(expr.args[0].function, sp.exp) and len(expr.args[0].limits) == 1)


def _forward_comment(deriv: Derivation, name: str) -> str:
    node = deriv.node(name)
    kind = deriv.graph.nodes[name].label or node.kind
    who = f"{kind} {node.layer}" if node.layer != name or kind else name
    return f"{who}: {name}[{_idx(node.indices())}] = {index_str(deriv.forward[name])}"


def _backward_comment(deriv: Derivation, name: str) -> str:
    node = deriv.node(name)
    via = sorted({c.consumer for a in deriv.adjoints if a.node == name
                  for c in a.contributions})
    through = f" (through {', '.join(via)})" if via else ""
    adj = next(a for a in deriv.adjoints if a.node == name)
    return (f"dL/d{name}{through}: {adj.var}[{_idx(target_indices(node))}] = "
            f"{index_str(adj.expr)}")


def _idx(indices: tuple[sp.Symbol, ...]) -> str:
    return ", ".join(str(i) for i in indices)


class _IndexPrinter(sp.printing.str.StrPrinter):
    """Compact one-line index notation for comments: sum_{s0}(x[i0, s0]*W[i1, s0])."""

    def _print_Sum(self, expr: sp.Sum) -> str:
        over = ",".join(str(lim[0]) for lim in expr.limits)
        return f"sum_{{{over}}}({self._print(expr.function)})"

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        parts = [f"{self._print(e)} if {self._print(c)}" for e, c in expr.args[:-1]]
        parts.append(f"else {self._print(expr.args[-1][0])}")
        return "(" + " ".join(parts) + ")"

    def _print_Sigmoid(self, expr: sp.Expr) -> str:
        return f"sigmoid({self._print(expr.args[0])})"

    def _print_Softplus(self, expr: sp.Expr) -> str:
        return f"softplus({self._print(expr.args[0])})"


def index_str(expr: sp.Expr) -> str:
    return _IndexPrinter().doprint(expr)
