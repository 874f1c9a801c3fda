"""Softmax cross-entropy with integer class ids as a log-softmax and one ``nll_loss``.

The loss layer states it as the chain rule needs it (``layers/losses.py``): per row the
log-sum-exp ``lse`` of the logits ``z``, the target's logit ``picked`` (a sum of ``z``
over a one-hot ``oh = [c == ids]``), rows counted where ``ids != ignore``, and

    loss = sum over counted rows of (lse - picked) / count.

Its derivation gives ``d_picked = [counted] (-dL/count)``, ``d_lse = [counted] dL/count``
and ``d_z = d_lse exp(z - lse) + [oh] d_picked``. Printed as they stand that is about
ten small kernels each way; torch's own cross-entropy is two: ``log_softmax`` and
``nll_loss`` forward, ``nll_loss_backward`` and ``_log_softmax_backward_data`` back.
This pass finds the statements by their exact bodies and, where the backward is there
too, checks that its adjoints are exactly the ones above, then writes

    logp = log_softmax(z);  loss = nll_loss(logp, ids, ignore)
    d_logp = nll_loss_backward(dL, logp, ids, ignore);  d_z = log_softmax_backward(d_logp, logp)

The numbers are the same: ``lse - picked = -logp[ids]`` on a counted row, and
``d_lse = -sum(d_logp)`` along the row (what ``log_softmax_backward`` assumes) because
the one-hot of a counted row has one entry (the modules check every id at run time).
Anything else the statements feed leaves them as they are: another loss on ``z``, a
reader of ``lse``, or a second cross-entropy head on the same targets (CSE then shares
the counted rows and their count between the heads; both heads keep the derived form).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from ... import naming
from ..nodes import (
    Assign,
    Iota,
    LogSoftmax,
    LogSoftmaxBackward,
    Map,
    NllLoss,
    NllLossBackward,
    Program,
    Reduce,
    Seed,
    View,
    by_source,
    free_name,
    join_comments,
    readers,
    row_view,
)


@dataclass
class _Found:
    """The forward statements of one class-id cross-entropy."""

    z: str
    ids: str
    ignore: int
    rank: int
    lse: Assign
    one_hot: Assign | None  # the one-hot as an array of its own, or None (inline)
    cond: sp.Expr  # the one-hot as picked's condition reads it
    cond_views: dict[sp.Symbol, object]
    picked: Assign
    counted: Assign
    count: Assign
    total: Assign
    loss: Assign


def _identity(view: object) -> str | None:
    return view.src if isinstance(view, View) and view.is_identity else None


def _piecewise(body: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(value, condition) of ``Piecewise((value, condition), (0, True))``."""
    if (isinstance(body, sp.Piecewise) and len(body.args) == 2
            and body.args[1] == (0, sp.true)):
        return body.args[0][0], body.args[0][1]
    return None


def _one_hot(cond: sp.Expr, views: dict[sp.Symbol, object], defs: dict[str, Assign],
             rank: int) -> str | None:
    """The ids when ``cond`` is ``c == ids[...]`` over the last of ``rank`` axes: inline,
    or an array of its own that CSE made of it."""
    source = defs.get(_identity(views.get(cond)) or "") if isinstance(cond, sp.Symbol) else None
    if source is not None and isinstance(source.op, Map):
        cond, views = source.op.body, dict(source.op.views)
    if not isinstance(cond, sp.Eq):
        return None
    sides = [views.get(a) for a in cond.args]
    iota = next((v for v in sides if isinstance(v, Iota)), None)
    row = next((v for v in sides if isinstance(v, View)), None)
    if (iota is None or row is None or iota.axis != rank - 1 or iota.out_rank != rank
            or row.out_rank != rank or row.places != tuple(range(rank - 1))
            or any(p is not None for p in row.picks)):
        return None
    return row.src


def _find(stmts: list[Assign], defs: dict[str, Assign]) -> list[_Found]:
    found = []
    for picked in stmts:
        op = picked.op
        if not isinstance(op, Reduce) or op.kind != "sum" or op.axes != (op.rank - 1,):
            continue
        rank, views = op.rank, dict(op.views)
        parts = _piecewise(op.body)
        if rank < 2 or parts is None:
            continue
        value, cond = parts
        z = _identity(views.get(value)) if isinstance(value, sp.Symbol) else None
        ids = _one_hot(cond, views, defs, rank)
        if z is None or ids is None:
            continue
        one_hot = defs.get(_identity(views.get(cond)) or "") if isinstance(
            cond, sp.Symbol) else None
        cond_views = {s: views[s] for s in cond.free_symbols}
        lse = next((s for s in stmts if isinstance(s.op, Reduce) and s.op.kind == "logsumexp"
                    and s.op.axes == (rank - 1,) and s.op.rank == rank
                    and isinstance(s.op.body, sp.Symbol)
                    and _identity(dict(s.op.views).get(s.op.body)) == z), None)
        if lse is None:
            continue
        total, counted_name = next(((s, c) for s in stmts
                                    if (c := _total_of(s, lse.target, picked.target))),
                                   (None, None))
        if total is None:
            continue
        counted = defs.get(counted_name)
        if counted is None or not _counts_ids(counted, ids):
            continue
        ignore = int(counted.op.body.args[1])
        count = next((s for s in stmts if isinstance(s.op, Reduce) and s.op.kind == "count"
                      and isinstance(s.op.body, sp.Symbol)
                      and _identity(dict(s.op.views).get(s.op.body)) == counted.target), None)
        if count is None:
            continue
        loss = next((s for s in stmts if isinstance(s.op, Map)
                     and _ratio(s, total.target, count.target)), None)
        if loss is None:
            continue
        found.append(_Found(z, ids, ignore, rank, lse, one_hot, cond, cond_views, picked,
                            counted, count, total, loss))
    return found


def _total_of(stmt: Assign, lse: str, picked: str) -> str | None:
    """The counted-rows mask when ``stmt`` sums ``[counted] (lse - picked)`` over every
    axis; None otherwise."""
    op = stmt.op
    if not isinstance(op, Reduce) or op.kind != "sum" or op.axes != tuple(range(op.rank)):
        return None
    parts = _piecewise(by_source(op.body, op.views))
    if parts is None or not isinstance(parts[1], sp.Symbol) or isinstance(parts[1], sp.Dummy):
        return None
    if sp.expand(parts[0] - (sp.Symbol(lse) - sp.Symbol(picked))) != 0:
        return None
    return parts[1].name


def _counts_ids(stmt: Assign, ids: str) -> bool:
    """``stmt`` is ``ids != ignore`` for an integer ``ignore``, ids read as they are."""
    op = stmt.op
    if not isinstance(op, Map):
        return False
    body = by_source(op.body, op.views)
    return (isinstance(body, sp.Ne) and body.args[0] == sp.Symbol(ids)
            and body.args[1].is_Integer)


def _ratio(stmt: Assign, total: str, count: str) -> bool:
    """``stmt`` is ``total / count``."""
    body = by_source(stmt.op.body, stmt.op.views)
    want = sp.Symbol(total) / sp.Symbol(count)
    return body.free_symbols == want.free_symbols and sp.expand(body - want) == 0


def _backward(defs: dict[str, Assign], f: _Found, seed: str,
              ones: dict[sp.Symbol, sp.Expr]) -> tuple[Assign, Assign, Assign] | None:
    """(d_lse, d_picked, d_z) when the backward holds exactly the adjoints the
    derivation gives for this loss alone."""
    d_lse = defs.get(naming.adjoint(f.lse.target))
    d_picked = defs.get(naming.adjoint(f.picked.target))
    d_z = defs.get(naming.adjoint(f.z))
    if d_lse is None or d_picked is None or d_z is None:
        return None
    # [counted] dL/count and its negation, dL the seed array or 1 where the function makes
    # it (ones); bodies compared with each array read as it is standing for the array
    count, counted = sp.Symbol(f.count.target), sp.Symbol(f.counted.target)
    for stmt, sign in ((d_lse, 1), (d_picked, -1)):
        if not isinstance(stmt.op, Map):
            return None
        parts = _piecewise(by_source(stmt.op.body, stmt.op.views))
        if (parts is None or parts[1] != counted or sp.expand(
                (parts[0] - sign * sp.Symbol(seed) / count).xreplace(ones)) != 0):
            return None
    op = d_z.op
    if not isinstance(op, Map):
        return None
    views = dict(op.views)
    r = next((s for s, v in views.items() if row_view(v, f.rank) and v.src == d_lse.target),
             None)
    p = next((s for s, v in views.items() if row_view(v, f.rank)
              and v.src == d_picked.target), None)
    zs = next((s for s, v in views.items() if _identity(v) == f.z), None)
    lse = next((s for s, v in views.items() if row_view(v, f.rank)
                and v.src == f.lse.target), None)
    if None in (r, p, zs, lse) or not all(_same_read(views.get(s), v)
                                          for s, v in f.cond_views.items()):
        return None
    if len(views) != 4 + len(f.cond_views):
        return None
    want = r * sp.exp(zs - lse) + sp.Piecewise((p, f.cond), (0, True))
    if op.body != want:
        return None
    return d_lse, d_picked, d_z


def _same_read(a: object, b: object) -> bool:
    """Two views read the same values (identity reads of one array are alike whatever
    rank of body they sit in)."""
    return a == b or (_identity(a) is not None and _identity(a) == _identity(b))


def _comments(*stmts: Assign) -> str:
    text = ""
    for stmt in stmts:
        text = join_comments(text, stmt.comment)
    return text


def cross_entropy(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    defs = {s.target: s for s in stmts}
    taken = set(defs) | {r for s in stmts for r in s.reads}
    seeds = [s.target for s in stmts if isinstance(s.op, Seed)]
    ones = {sp.Symbol(name): sp.Integer(1) for name in seeds}
    out = list(stmts)
    has_backward = any(s.phase == "backward" for s in stmts)
    for f in _find(stmts, defs):
        seed = naming.adjoint(f.loss.target)
        back = _backward(defs, f, seed, ones)
        if has_backward and back is None:
            continue
        inner = [s for s in (f.lse, f.one_hot, f.picked, f.counted, f.count, f.total) if s]
        gone = {s.target for s in inner} | ({s.target for s in back[:2]} if back else set())
        users = readers(s for s in stmts if s.target not in gone
                        and s is not (back[2] if back else None) and s is not f.loss)
        if any(s.target in protected or users.get(s.target) for s in inner):
            continue
        if back and any(s.target in protected or users.get(s.target) for s in back[:2]):
            continue
        logp, d_logp = naming.loss_part(f.z, "logp"), naming.adjoint(
            naming.loss_part(f.z, "logp"))
        if not all(free_name(n, program.shapes[f.z], taken, program) for n in (logp, d_logp)):
            continue
        taken |= {logp, d_logp}
        program.shapes[logp] = program.shapes[d_logp] = program.shapes[f.z]
        # the count of rows the forward's call gives, kept for the backward (which would
        # count them again); it takes the name of the count statement it replaces
        count = f.count.target if back and free_name(f.count.target, (), taken - {
            f.count.target}, program) else ""
        forward = [
            Assign(logp, LogSoftmax(f.z, f.rank - 1), join_comments(
                f.lse.comment, f"log-softmax: {logp} = {f.z} - {f.lse.target}, in one call"),
                f.lse.phase),
            replace(f.loss, op=NllLoss(logp, f.ids, f.ignore), comment=join_comments(
                _comments(f.picked, f.count, f.total, f.loss),
                f"cross-entropy: {f.loss.target} = the mean of -{logp}[..., {f.ids}] over "
                f"rows whose id is not {f.ignore}, in one call"
                + (f" (and {count}, how many rows are counted)" if count else "")),
                also=(count,) if count else ()),
        ]
        # the new forward goes where lse was, among the statements that stay
        at = sum(1 for s in out[:out.index(f.lse)] if s.target not in gone)
        out = [s for s in out if s.target not in gone and s is not f.loss]
        out[at:at] = forward
        if back:
            d_lse, d_picked, d_z = back
            backward = [
                Assign(d_logp, NllLossBackward(seed, logp, f.ids, f.ignore, count), join_comments(
                    d_picked.comment, f"dL/d{logp}: -dL/count at each counted row's id, "
                    "0 elsewhere"), d_z.phase),
                replace(d_z, op=LogSoftmaxBackward(d_logp, logp, f.rank - 1),
                        comment=join_comments(_comments(d_lse, d_z),
                                              f"log-softmax backward: {d_z.target} = "
                                              f"{d_logp} - exp({logp})*sum({d_logp}), in one "
                                              "call")),
            ]
            at = out.index(d_z)
            out[at:at + 1] = backward
        defs = {s.target: s for s in out}
    return out
