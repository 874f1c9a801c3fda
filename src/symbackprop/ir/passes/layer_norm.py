"""A layer norm's statements -> one :class:`LayerNorm`; its adjoints -> one
:class:`LayerNormBackward`.

The layer builds a layer norm from index-notation ops (the mean, the variance, the
affine output; ``layers/normalization.py``) and the chain rule differentiates them one
by one, so lowering leaves about a dozen elementwise kernels each way: the row sums,
the centred rows, the reciprocal deviation, the affine map; then the adjoints of the
variance and the mean and the three terms they send back to the input. The same
numbers come from one fused kernel each way (torch's ``native_layer_norm`` and
``native_layer_norm_backward``, what ``torch.nn.functional.layer_norm`` and its
autograd run; numpy: one helper each), with the row means and reciprocal deviations
passed from the first to the second.

Nothing is taken on trust from the layer's name. The layer records which arrays it
built (``Program.layer_norms``); this pass evaluates the statements that compute them,
symbolically, as functions of the input ``x``, the weight ``w``, the bias ``b`` and the
output's adjoint ``g``, with two linear operators, ``rowsum`` (over the feature axis)
and ``colsum`` (over every other axis), checked to be what each statement's axes say.
Each must equal its definition:

* ``mean = rowsum(x)/C``, ``var = rowsum((x - mean)^2)/C``,
  ``out = (x - mean)/sqrt(var + eps) * w + b``;
* the input's adjoint, the terms of its statement that read ``g`` or the adjoints of
  the mean and the variance: ``rstd (g w - rowsum(g w)/C - xhat rowsum(g w xhat)/C)``
  with ``xhat = (x - mean) rstd``;
* the weight's and the bias's gradients: ``colsum(g xhat)`` and ``colsum(g)``.

Anything else (a statement fused with its neighbours another way, a read through a
view other than a broadcast) stays as it was. The statements that only fed the
replaced ones are then dead and dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import sympy as sp

from ... import naming
from ..nodes import (
    Assign,
    Einsum,
    LayerNorm,
    LayerNormBackward,
    Map,
    Program,
    Reduce,
    View,
    free_name,
    join_comments,
)

ROWSUM = sp.Function("rowsum")
COLSUM = sp.Function("colsum")

Level = str  # "full" (rows and features), "rows", "feat", "scalar"


class _NoMatch(Exception):
    """The statements are not the layer norm's (or not in a form this pass reads)."""


class _Evaluator:
    """The value of an array as a sympy expression in x, w, b, g, rowsum and colsum."""

    def __init__(self, stmts: list[Assign], program: Program, leaves: dict[str, Level],
                 rank: int, features: int) -> None:
        self.defs = {s.target: s for s in stmts}
        self.program = program
        self.leaves = leaves
        self.rank = rank
        self.features = features
        self.symbols = {name: sp.Symbol(f"<{name}>") for name in leaves}
        self.cache: dict[str, tuple[sp.Expr, Level]] = {}

    def labels(self, level: Level) -> list[str]:
        rows = [f"r{k}" for k in range(self.rank - 1)]
        return {"full": [*rows, "f"], "rows": rows, "feat": ["f"], "scalar": []}[level]

    def value(self, name: str) -> tuple[sp.Expr, Level]:
        if name in self.cache:
            return self.cache[name]
        if name in self.leaves:
            found = (self.symbols[name], self.leaves[name])
        else:
            stmt = self.defs.get(name)
            if stmt is None or stmt.also:
                raise _NoMatch(name)
            op = stmt.op
            if isinstance(op, Map):
                found = self._map(op)
            elif isinstance(op, Reduce):
                found = self._reduce(op)
            elif isinstance(op, Einsum):
                found = self._einsum(op)
            else:
                raise _NoMatch(name)
        self.cache[name] = found
        return found

    def _reads(self, views: tuple, body: sp.Expr) -> list[tuple[sp.Symbol, View]]:
        used = [(s, v) for s, v in views if s in body.free_symbols]
        if not all(isinstance(v, View) and all(p is None for p in v.picks) for _, v in used):
            raise _NoMatch("a view other than a broadcast")
        return used  # type: ignore[return-value]

    def _map(self, op: Map) -> tuple[sp.Expr, Level]:
        levels: set[Level] = set()
        subs = {}
        for sym, view in self._reads(op.views, op.body):
            value, level = self.value(view.src)
            subs[sym] = value
            if view.is_identity:
                levels.add(level)
            else:
                # a broadcast into the full shape: rows along the features, or the
                # features along the rows
                wanted = self.labels("full")
                got = [wanted[p] for p in view.places] if view.out_rank == self.rank else None
                if got != self.labels(level):
                    raise _NoMatch("a broadcast along another axis")
                levels.add("full")
        levels.discard("scalar")
        if len(levels) > 1:
            raise _NoMatch("arrays of different shapes read as they are")
        return op.body.xreplace(subs), (levels.pop() if levels else "scalar")

    def _axes(self, views: list[tuple[sp.Symbol, View]], rank: int) -> list[str]:
        axes: list[str | None] = [None] * rank
        for _, view in views:
            labels = self.labels(self.value(view.src)[1])
            places = range(len(labels)) if view.is_identity else view.places
            if len(labels) != len(places):
                raise _NoMatch("a view of another rank")
            for label, place in zip(labels, places, strict=True):
                if place >= rank or axes[place] not in (None, label):
                    raise _NoMatch("axes that do not line up")
                axes[place] = label
        if None in axes:
            raise _NoMatch("an axis no array covers")
        return axes  # type: ignore[return-value]

    def _summed(self, summed: set[str], body: sp.Expr) -> tuple[sp.Expr, Level]:
        if summed == {"f"}:
            return ROWSUM(body), "rows"
        if summed == set(self.labels("rows")):
            return COLSUM(body), "feat"
        raise _NoMatch("a sum over other axes")

    def _reduce(self, op: Reduce) -> tuple[sp.Expr, Level]:
        if op.kind != "sum":
            raise _NoMatch(op.kind)
        views = self._reads(op.views, op.body)
        axes = self._axes(views, op.rank)
        body = op.body.xreplace({s: self.value(v.src)[0] for s, v in views})
        return self._summed({axes[a] for a in op.axes}, body)

    def _einsum(self, op: Einsum) -> tuple[sp.Expr, Level]:
        inputs, out = op.subscripts.split("->")
        letters: dict[str, str] = {}
        body: sp.Expr = sp.Integer(1)
        for sub, name in zip(inputs.split(","), op.operands, strict=True):
            value, level = self.value(name)
            labels = self.labels(level)
            if len(labels) != len(sub):
                raise _NoMatch("an operand of another rank")
            for letter, label in zip(sub, labels, strict=True):
                if letters.setdefault(letter, label) != label:
                    raise _NoMatch("axes that do not line up")
            body = body * value
        summed = {letters[c] for c in letters if c not in out}
        kept = [letters[c] for c in out]
        value, level = self._summed(summed, body)
        if kept != self.labels(level):
            raise _NoMatch("a result in another axis order")
        return value, level


def _canonical(expr: sp.Expr, features: int, varying_in_row: set[sp.Symbol],
               varying_in_col: set[sp.Symbol]) -> sp.Expr:
    """``expr`` with every rowsum / colsum split over the terms of its argument and the
    factors constant along what it sums taken out (rowsum of a row constant k is C k),
    innermost first; then expanded. Two expressions equal this way are equal."""

    def constant(factor: sp.Expr, varying: set[sp.Symbol], row: bool) -> bool:
        # along a row, a row sum is constant and a column sum varies (one per feature);
        # along a column, either is taken as varying (safe: at worst no match)
        if factor.has(COLSUM) or (not row and factor.has(ROWSUM)):
            return False
        masked = factor.replace(lambda e: isinstance(e, ROWSUM), lambda e: sp.Integer(1))
        return not (masked.free_symbols & varying)

    def walk(e: sp.Expr) -> sp.Expr:
        if not e.args:
            return e
        args = [walk(a) for a in e.args]
        if isinstance(e, (ROWSUM, COLSUM)):
            row = isinstance(e, ROWSUM)
            varying = varying_in_row if row else varying_in_col
            total = sp.Integer(0)
            for term in sp.Add.make_args(sp.expand(args[0])):
                inside, outside = [], []
                for factor in sp.Mul.make_args(term):
                    (outside if constant(factor, varying, row) else inside).append(factor)
                rest = sp.Mul(*inside)
                if rest == 1:
                    if not row:
                        raise _NoMatch("a column sum of a constant")
                    total += features * sp.Mul(*outside)
                else:
                    total += sp.Mul(*outside) * e.func(rest)
            return total
        return e.func(*args)

    return sp.expand(walk(sp.expand(expr)))


def _same(a: sp.Expr, b: sp.Expr, ev: _Evaluator) -> bool:
    s = ev.symbols
    full = {s[n] for n, level in ev.leaves.items() if level == "full"}
    feat = {s[n] for n, level in ev.leaves.items() if level == "feat"}
    try:
        diff = (_canonical(a, ev.features, full | feat, full)
                - _canonical(b, ev.features, full | feat, full))
    except _NoMatch:
        return False
    return sp.expand(diff) == 0


def _dead_code(stmts: list[Assign], protected: set[str]) -> list[Assign]:
    while True:
        read = {r for s in stmts for r in s.reads}
        dead = [n for n, s in enumerate(stmts)
                if not any(t in read or t in protected for t in s.targets)]
        if not dead:
            return stmts
        stmts = [s for n, s in enumerate(stmts) if n not in dead]


def layer_norm(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    for out, group in program.layer_norms.items():
        stmts = _one(stmts, program, protected, out, group)
    return stmts


def _one(stmts: list[Assign], program: Program, protected: set[str], out: str,
         group: tuple[str, str, str, str, str, float]) -> list[Assign]:
    src, mean, var, weight, bias, eps = group
    where = {s.target: n for n, s in enumerate(stmts)}
    shape = program.shapes.get(src)
    if out not in where or stmts[where[out]].phase != "forward" or not shape:
        return stmts
    features = shape[-1]
    rows = shape[:-1]
    if not sp.sympify(features).is_Integer or (features,) == tuple(rows):
        return stmts
    d_out = naming.adjoint(out)
    leaves = {src: "full", weight: "feat", d_out: "full"}
    if bias:
        leaves[bias] = "feat"
    ev = _Evaluator(stmts, program, leaves, len(shape), int(features))
    x, w, g = ev.symbols[src], ev.symbols[weight], ev.symbols[d_out]
    b = ev.symbols[bias] if bias else sp.Integer(0)
    count = sp.Integer(int(features))
    m = ROWSUM(x) / count
    v = ROWSUM((x - m) ** 2) / count
    rstd = 1 / sp.sqrt(v + sp.Float(eps))
    xhat = (x - m) * rstd
    try:
        if not (_same(ev.value(mean)[0], m, ev) and _same(ev.value(var)[0], v, ev)
                and _same(ev.value(out)[0], xhat * w + b, ev)):
            return stmts
    except _NoMatch:
        return stmts

    taken = {t for s in stmts for t in s.targets} | {r for s in stmts for r in s.reads}
    row_mean, row_rstd = naming.layer_part(out, "row_mean"), naming.layer_part(out, "row_rstd")
    stat_shape = (*rows, sp.Integer(1))
    if not (free_name(row_mean, stat_shape, taken, program)
            and free_name(row_rstd, stat_shape, taken, program)):
        return stmts
    backward = _backward(stmts, program, ev, (src, mean, var, weight, bias, d_out),
                         (g * w - ROWSUM(g * w) / count - xhat * ROWSUM(g * w * xhat) / count)
                         * rstd, COLSUM(g * xhat), COLSUM(g), (row_mean, row_rstd), out)
    result = list(stmts)
    forward = stmts[where[out]]
    stats = backward is not None
    what = (f"layer norm {out} in one call: (x - mean) / sqrt(var + {eps}) * weight"
            f"{' + bias' if bias else ''} over the last axis"
            + (f"; its row means and 1/sqrt(var + eps) kept as {row_mean}, {row_rstd}"
               if stats else ""))
    result[where[out]] = replace(forward, op=LayerNorm(src, weight, bias, eps, stats),
                                 comment=join_comments(forward.comment, what),
                                 also=(row_mean, row_rstd) if stats else ())
    if backward is not None:
        program.shapes[row_mean] = stat_shape
        program.shapes[row_rstd] = stat_shape
        result = backward(result)
    return _dead_code(result, protected)


def _backward(stmts: list[Assign], program: Program, ev: _Evaluator,
              names: tuple[str, str, str, str, str, str], dx: sp.Expr, dw: sp.Expr,
              db: sp.Expr, stats: tuple[str, str], out: str,
              ) -> Callable[[list[Assign]], list[Assign]] | None:
    """A function that puts the :class:`LayerNormBackward` in the backward statements'
    place (``dx``, ``dw``, ``db``: what they must equal), or None when they are not the
    layer norm's."""
    src, mean, var, weight, bias, d_out = names
    where = {s.target: n for n, s in enumerate(stmts)}
    if d_out not in where:
        return None
    adjoints = {d_out, naming.adjoint(mean), naming.adjoint(var)}
    # the statement that sums the input's adjoint: a Map with terms through g (and the
    # mean's and the variance's adjoints)
    found = None
    for n, stmt in enumerate(stmts):
        if (stmt.phase == "backward" and isinstance(stmt.op, Map) and n > where[d_out]
                and stmt.target not in adjoints):
            views = dict(stmt.op.views)
            reads = {views[s].src for s in stmt.op.body.free_symbols if s in views}
            if d_out in reads or reads & adjoints:
                if found is not None:
                    return None  # g read by two statements' terms: not this pattern
                found = n
    ln_terms: list[sp.Expr] = []
    rest: list[sp.Expr] = []
    if found is not None:  # else the input gets no gradient here
        op = stmts[found].op
        assert isinstance(op, Map)
        views = dict(op.views)
        for term in sp.Add.make_args(op.body):
            reads = {views[s].src for s in term.free_symbols if s in views}
            (ln_terms if reads & adjoints or d_out in reads else rest).append(term)
        try:
            ln_value = ev._map(Map(sp.Add(*ln_terms), op.views))[0]  # noqa: SLF001
        except _NoMatch:
            return None
        if not _same(ln_value, dx, ev):
            return None
    grads = []
    for want, param in ((dw, weight), (db, bias)):
        name = naming.adjoint(param) if param else ""
        if name and name in where and stmts[where[name]].phase == "backward":
            try:
                ok = _same(ev.value(name)[0], want, ev)
            except _NoMatch:
                ok = False
            if not ok:
                return None
            grads.append(name)
        else:
            grads.append("")
    if found is None and not any(grads):
        return None
    src_shape = program.shapes[src]
    part = ""
    if found is not None:
        part = stmts[found].target
        if rest:
            part = naming.adjoint(f"{src}_via_{out}")
            taken = {t for s in stmts for t in s.targets} | {r for s in stmts for r in s.reads}
            if not free_name(part, src_shape, taken, program):
                return None
    first = min(n for n in (found, *(where[g] for g in grads if g)) if n is not None)
    computes = [f"{part} = rstd * (g' - mean(g') - xhat * mean(g' * xhat)) over the last "
                f"axis, g' = {d_out} * {weight}"] if part else []
    computes += [f"{grads[0]} = sum({d_out} * xhat)"] if grads[0] else []
    computes += [f"{grads[1]} = sum({d_out})"] if grads[1] else []
    comment = f"layer norm backward {out}, in one call: " + "; ".join(computes)

    def apply(result: list[Assign]) -> list[Assign]:
        op_back = LayerNormBackward(d_out, src, stats[0], stats[1], weight, bias,
                                    (bool(part), bool(grads[0]), bool(grads[1])))
        results = [n for n in (part, *grads) if n]
        new = Assign(results[0], op_back, comment, "backward", also=tuple(results[1:]))
        out_stmts: list[Assign] = []
        for n, s in enumerate(result):
            if n == first:
                out_stmts.append(new)
            if n == found:
                if rest:
                    sym = sp.Symbol(part)
                    body = sp.Add(sym, *rest)
                    views = {k: v for k, v in s.op.views if k in body.free_symbols}  # type: ignore[union-attr]
                    views[sym] = View(part, (), (), 0)
                    out_stmts.append(replace(s, op=Map(body, tuple(sorted(
                        views.items(), key=lambda kv: kv[0].name)))))
                continue
            if s.target in grads:
                continue
            out_stmts.append(s)
        if rest:
            program.shapes[part] = src_shape
        return out_stmts

    return apply
