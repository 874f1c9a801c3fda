"""``s = sum(y * g, last axis); d = y*g - y*s`` -> ``d = softmax_backward(g, y)``.

The chain rule through ``y = exp(a - logsumexp(a))`` gives, after CSE, a row sum of
``y * g`` (the adjoint of ``logsumexp``, often negated in a statement of its own) and an
elementwise ``y*g + y*(-s)``: four passes over the array and two temporaries. The same
numbers come from one kernel (torch's ``_softmax_backward_data``, autograd's own
softmax backward; numpy: a row dot product and one subtraction, multiplied in place).

The identity ``y*g - y*s = y*(g - s)`` holds for any arrays, so the rule needs no
knowledge of where ``y`` came from: it checks, by expanding the sympy bodies, that the
statement is exactly that expression, with ``s`` the row sum of the same two arrays.

A masked softmax (``y = softmax(where(c, a, -inf))``, attention's causal mask) sends its
adjoint back through the mask too, ``d_a = where(c, d, 0)``: a pass over the whole array
that changes nothing, since ``d = y * (g - s)`` is already 0 wherever ``c`` is false
(there ``y = exp(-inf - lse) = 0``, and ``g`` is finite). That ``where`` becomes ``d``
itself, read as it is, where its condition is the very one the softmax's input was
masked with (the same array or expression, compared as the bodies read them).
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..nodes import (
    Assign,
    Einsum,
    Map,
    Program,
    Reduce,
    Softmax,
    SoftmaxBackward,
    View,
    by_source,
    join_comments,
    readers,
    row_view,
)


def _row_sum(stmt: Assign) -> tuple[str, str, int] | None:
    """(a, b, rank) when ``stmt`` is the sum over the last axis of ``a * b``, both read
    as they are."""
    op = stmt.op
    if isinstance(op, Einsum) and len(op.operands) == 2:
        inputs, out = op.subscripts.split("->")
        x, y = inputs.split(",")
        if x == y and len(set(x)) == len(x) and out == x[:-1] and op.operands[0] != op.operands[1]:
            return op.operands[0], op.operands[1], len(x)
        return None
    if isinstance(op, Reduce) and op.kind == "sum" and op.axes == (op.rank - 1,):
        views = dict(op.views)
        factors = sp.Mul.make_args(op.body)
        if len(factors) == 2 and all(f in views and views[f].is_identity
                                     and isinstance(views[f], View) for f in factors):
            a, b = (views[f].src for f in factors)
            if a != b:
                return a, b, op.rank
    return None


def softmax_backward(stmts: list[Assign], program: Program,
                     protected: set[str]) -> list[Assign]:
    count = readers(stmts)
    where = {s.target: n for n, s in enumerate(stmts)}
    out: list[Assign | None] = list(stmts)
    for pos, stmt in enumerate(stmts):
        op = stmt.op
        if not isinstance(op, Map) or stmt.phase != "backward":
            continue
        views = dict(op.views)
        rank = next((v.out_rank for v in views.values() if isinstance(v, View)), 0)
        # The broadcast row read: the row sum itself, or a scalar multiple of it.
        for sym, view in op.views:
            if not row_view(view, rank) or count.get(view.src) != 1:
                continue
            body, dead = op.body, [view.src]
            row = out[where[view.src]] if view.src in where else None
            if row is None or row.target in protected:
                continue
            found = _row_sum(row)
            if found is None and isinstance(row.op, Map) and len(row.op.views) == 1:
                (inner_sym, inner), = row.op.views
                coeff = row.op.body / inner_sym
                if (coeff.free_symbols or not inner.is_identity or inner.src not in where
                        or count.get(inner.src) != 1 or inner.src in protected):
                    continue
                inner_stmt = out[where[inner.src]]
                found = _row_sum(inner_stmt) if inner_stmt is not None else None
                body = body.xreplace({sym: coeff * sym})
                dead.append(inner.src)
            if found is None or found[2] != rank:
                continue
            a, b, _ = found
            placeholders = {v.src: s for s, v in op.views if isinstance(v, View)
                            and v.is_identity}
            if a not in placeholders or b not in placeholders:
                continue
            for y, g in ((a, b), (b, a)):
                ys, gs = placeholders[y], placeholders[g]
                if sp.expand(body - (ys * gs - ys * sym)) == 0:
                    break
            else:
                continue
            comment = ""
            for name in reversed(dead):
                gone = out[where[name]]
                assert gone is not None
                comment = join_comments(comment, gone.comment)
                out[where[name]] = None
            what = f"softmax backward: {stmt.target} = {y}*({g} - sum({y}*{g})), in one call"
            out[pos] = replace(stmt, op=SoftmaxBackward(g, y, rank - 1),
                               comment=join_comments(join_comments(comment, stmt.comment), what))
            break
    return _unmask(out)


def _masked_by(stmt: Assign | None, fill: sp.Expr) -> tuple[str, sp.Expr] | None:
    """(the array, the condition) when ``stmt`` is ``where(c, a, fill)``, ``a`` read as
    it is; the condition is given as the arrays it reads are named (``by_source``)."""
    if stmt is None or not isinstance(stmt.op, Map):
        return None
    body = stmt.op.body
    if not isinstance(body, sp.Piecewise) or len(body.args) != 2:
        return None
    (value, cond), (other, last) = body.args
    views = dict(stmt.op.views)
    view = views.get(value)
    if last != sp.true or other != fill or not isinstance(view, View) or not view.is_identity:
        return None
    return view.src, by_source(cond, stmt.op.views)


def _unmask(stmts: list[Assign | None]) -> list[Assign]:
    out = [s for s in stmts if s is not None]
    where = {s.target: n for n, s in enumerate(out)}

    def defined(name: str) -> Assign | None:
        return out[where[name]] if name in where else None

    for pos, stmt in enumerate(out):
        found = _masked_by(stmt, sp.Integer(0)) if stmt.phase == "backward" else None
        if found is None:
            continue
        d, cond = found
        back = defined(d)
        if back is None or not isinstance(back.op, SoftmaxBackward):
            continue
        soft = defined(back.op.out)
        if soft is None or not isinstance(soft.op, Softmax) or soft.op.axis != back.op.axis:
            continue
        masked = _masked_by(defined(soft.op.src), -sp.oo)
        if masked is None or masked[1] != cond or cond.has(sp.Dummy):
            continue
        what = (f"{d} is already 0 where the softmax's input was masked: the mask is not "
                "applied again")
        sym = sp.Symbol(d)
        out[pos] = replace(stmt, op=Map(sym, ((sym, View(d, (), (), 0)),)),
                           comment=join_comments(stmt.comment, what))
    return out
