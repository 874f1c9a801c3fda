"""Products against the parts of a stacked array, as one product against the whole.

A layer that reads an array at a fixed index of its first axis (attention's ``c_attn``
viewed as [3, H, D, C], read at part 0, 1, 2 for q, k and v) lowers to one contraction
per part, and the chain rule gives one per part again for each gradient: the weight's
is a :class:`Stack` of them, the input's a sum of them. Each is a small product; nanoGPT
runs one ``x @ c_attnᵀ`` instead. Three rules, over any array and any subscripts:

* parts ``E_j = einsum(..., W[j], ...)`` for every j of W's first axis, the other
  operands the same -> one ``E = einsum(..., W, ...)`` with W's first axis leading the
  output, and ``E_j = E[j]`` (a view);
* ``stack([einsum(..., D_j, ...) for j])`` with the other operands the same ->
  ``einsum(..., stack(D_j), ...)``;
* ``Σ_j einsum(..., W[j], ..., D_j, ...)`` over every j ->
  ``einsum(..., W, ..., stack(D_j), ...)``, the new axis summed;

and ``stack([sum(D_j, axes) for j])`` -> ``sum(stack(D_j), axes + 1)``. A stack of the
same arrays is made once. Each rule is the distributive law of a contraction over the
stacked axis: the numbers are the same products, summed in the same order per entry.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import replace

import sympy as sp

from ... import naming
from ..nodes import (
    Assign,
    Einsum,
    Map,
    Program,
    Reduce,
    Stack,
    View,
    join_comments,
    ordered,
    readers,
)


def _pick(stmt: Assign | None) -> tuple[str, int] | None:
    """(W, j) when ``stmt`` is the view ``W[j]`` of an array's first axis."""
    if stmt is None or not isinstance(stmt.op, Map) or len(stmt.op.views) != 1:
        return None
    ((sym, view),) = stmt.op.views
    if (stmt.op.body != sym or not isinstance(view, View) or not view.picks
            or not isinstance(view.picks[0], int) or any(p is not None for p in view.picks[1:])
            or view.places != tuple(range(view.out_rank))):
        return None
    return view.src, view.picks[0]


def _view_map(src: str, part: int, rank: int) -> Map:
    """``src[part]`` as a Map of one view (a view of the stacked result, no copy)."""
    view = View(src, (part, *([None] * rank)), tuple(range(rank)), rank)
    return Map(view.placeholder(), ordered({view.placeholder(): view}))


def _letter(subscripts: str) -> str:
    return next(c for c in string.ascii_letters if c not in subscripts)


def stacked(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    out: list[Assign | None] = list(stmts)
    defs = {s.target: n for n, s in enumerate(stmts)}
    taken = ({s.target for s in stmts} | set(program.shapes)
             | {r for s in stmts for r in s.reads})
    fresh = (naming.partial(n) for n in range(10**6) if naming.partial(n) not in taken)
    count = readers(stmts)
    stacks: dict[tuple[tuple[str, ...], int], str] = {}
    inserted: dict[int, list[Assign]] = {}

    def stmt_of(name: str) -> Assign | None:
        return out[defs[name]] if name in defs else None

    def extent(name: str) -> int | None:
        shape = program.shapes.get(name)
        return int(shape[0]) if shape and isinstance(shape[0], sp.Integer) else None

    def stack_of(parts: tuple[str, ...], at: int, phase: str) -> str:
        key = (parts, 0)
        if key not in stacks:
            target = next(fresh)
            inserted.setdefault(at, []).append(Assign(target, Stack(parts, 0), "", phase))
            stacks[key] = target
            for p in parts:
                count[p] = count.get(p, 0) + 1
        return stacks[key]

    def emit(op: Einsum, comment: str, at: int, phase: str) -> str:
        target = next(fresh)
        inserted.setdefault(at, []).append(Assign(target, op, comment, phase))  # type: ignore[arg-type]
        for r in op.reads:
            count[r] = count.get(r, 0) + 1
        count[target] = 1
        return target

    def drop(name: str, heir: int) -> None:
        """Forget a statement nothing reads any more (and, in turn, the views it read);
        its comment (the layer and formula) moves to the statement at ``heir``."""
        pos = defs.get(name)
        if pos is None or out[pos] is None or name in protected or count.get(name, 0) > 0:
            return
        gone = out[pos]
        assert gone is not None
        out[pos] = None
        for r in gone.reads:
            count[r] = count.get(r, 0) - 1
            if _pick(stmt_of(r)) is not None:
                drop(r, heir)
        kept = out[heir]
        if gone.comment and kept is not None:
            out[heir] = replace(kept, comment=join_comments(gone.comment, kept.comment))

    # Parts of one product against every part of W: one product, then views.
    groups: dict[tuple[object, ...], list[tuple[int, int, int]]] = {}
    for n, stmt in enumerate(stmts):
        if not isinstance(stmt.op, Einsum) or stmt.target in protected:
            continue
        for idx, operand in enumerate(stmt.op.operands):
            found = _pick(stmt_of(operand))
            if found is not None:
                rest = stmt.op.operands[:idx] + stmt.op.operands[idx + 1:]
                key = (stmt.op.subscripts, idx, rest, found[0], stmt.phase)
                groups.setdefault(key, []).append((found[1], n, idx))
                break
    for (subscripts, idx, _, w, _), members in groups.items():
        parts = sorted(j for j, _, _ in members)
        if extent(w) is None or parts != list(range(extent(w) or 0)):
            continue
        first = min(n for _, n, _ in members)
        ins, res = subscripts.split("->")
        subs = ins.split(",")
        letter = _letter(subscripts)
        subs[idx] = letter + subs[idx]
        operands = list(stmts[first].op.operands)  # type: ignore[union-attr]
        operands[idx] = w
        target = next(fresh)
        comment = join_comments(stmts[first].comment, f"all {len(parts)} parts of {w} "
                                "in one product")
        inserted.setdefault(first, []).append(
            Assign(target, Einsum(f"{','.join(subs)}->{letter}{res}", tuple(operands)),
                   comment, stmts[first].phase))
        count[w] = count.get(w, 0) + 1
        for j, n, _ in members:
            pick = stmts[n].op.operands[idx]  # type: ignore[union-attr]
            out[n] = replace(stmts[n], op=_view_map(target, j, len(res)),
                             comment="" if n == first else stmts[n].comment)
            count[target] = count.get(target, 0) + 1
            count[pick] -= 1
            drop(pick, n)

    # Stacks of like products or sums, and sums of products against every part of W.
    for n, stmt in enumerate(stmts):
        if out[n] is None or out[n] is not stmt:
            continue
        op = stmt.op
        if isinstance(op, Stack) and op.axis == 0 and None not in op.parts:
            made = [stmt_of(p) for p in op.parts]
            if any(m is None or count.get(m.target) != 1 or m.target in protected
                   for m in made):
                continue
            new = _stack_products(made, stmt, stack_of, n) or _stack_sums(made, stmt, stack_of, n)
            if new is None:
                continue
            out[n] = new
            for m in made:
                count[m.target] -= 1  # type: ignore[union-attr]
                drop(m.target, n)  # type: ignore[union-attr]
        elif isinstance(op, Map) and isinstance(op.body, sp.Add):
            new = _sum_of_parts(stmt, stmt_of, count, protected, extent, stack_of,
                                lambda op, what, at=n, phase=stmt.phase: emit(op, what, at,
                                                                              phase), n)
            if new is None:
                continue
            out[n], terms = new
            for t in terms:
                count[t] -= 1
                drop(t, n)
    final: list[Assign] = []
    for n, stmt in enumerate(out):
        final.extend(inserted.get(n, ()))
        if stmt is not None:
            final.append(stmt)
    return final


StackOf = Callable[[tuple[str, ...], int, str], str]


def _stack_products(made: list[Assign], stmt: Assign, stack_of: StackOf, at: int
                    ) -> Assign | None:
    """``stack([einsum(s, ..., D_j, ...)])`` -> ``einsum(s', ..., stack(D_j), ...)``."""
    if not all(isinstance(m.op, Einsum) for m in made):
        return None
    ops = [m.op for m in made]
    if len({o.subscripts for o in ops}) != 1 or len({len(o.operands) for o in ops}) != 1:
        return None
    differ = [i for i in range(len(ops[0].operands))
              if len({o.operands[i] for o in ops}) != 1]
    if len(differ) != 1:
        return None
    (idx,) = differ
    target = stack_of(tuple(o.operands[idx] for o in ops), at, stmt.phase)
    ins, res = ops[0].subscripts.split("->")
    subs = ins.split(",")
    letter = _letter(ops[0].subscripts)
    subs[idx] = letter + subs[idx]
    operands = list(ops[0].operands)
    operands[idx] = target
    return replace(stmt, op=Einsum(f"{','.join(subs)}->{letter}{res}", tuple(operands)),
                   comment=join_comments(stmt.comment, "the parts' products as one product "
                                         "of the stacked arrays"))


def _stack_sums(made: list[Assign], stmt: Assign, stack_of: StackOf, at: int
                ) -> Assign | None:
    """``stack([sum(D_j, axes)])`` -> ``sum(stack(D_j), axes shifted by one)``."""
    ops = [m.op for m in made]
    if not all(isinstance(o, Reduce) and o.kind == "sum" and len(o.views) == 1
               and o.body == o.views[0][0] and o.views[0][1].is_identity
               and isinstance(o.views[0][1], View) for o in ops):
        return None
    if len({(o.axes, o.rank) for o in ops}) != 1:
        return None
    target = stack_of(tuple(o.views[0][1].src for o in ops), at, stmt.phase)
    rank = ops[0].rank + 1
    view = View(target, (None,) * rank, tuple(range(rank)), rank)
    sym = view.placeholder()
    return replace(stmt, op=Reduce("sum", sym, ordered({sym: view}),
                                   tuple(a + 1 for a in ops[0].axes), rank))


def _sum_of_parts(stmt: Assign, stmt_of: Callable[[str], Assign | None],
                  count: dict[str, int], protected: set[str],
                  extent: Callable[[str], int | None], stack_of: StackOf,
                  emit: Callable[[Einsum, str], str], at: int
                  ) -> tuple[Assign, list[str]] | None:
    """``Σ_j einsum(s, W[j], D_j)`` over every part j of W (among the terms of a sum) ->
    one einsum of W and ``stack(D_j)``, the stacked axis summed."""
    views = dict(stmt.op.views)
    groups: dict[tuple[object, ...], list[tuple[sp.Symbol, Assign, int, int]]] = {}
    for term in sp.Add.make_args(stmt.op.body):
        view = views.get(term)
        if not isinstance(view, View) or not view.is_identity:
            continue
        made = stmt_of(view.src)
        if (made is None or not isinstance(made.op, Einsum) or count.get(made.target) != 1
                or made.target in protected):
            continue
        found = [(i, _pick(stmt_of(x))) for i, x in enumerate(made.op.operands)]
        found = [(i, f) for i, f in found if f is not None]
        if len(found) == 1:
            (iw, (w, j)), = found
            groups.setdefault((made.op.subscripts, iw, w), []).append((term, made, iw, j))
    for (subscripts, iw, w), members in groups.items():
        members.sort(key=lambda m: m[3])
        if [m[3] for m in members] != list(range(extent(w) or -1)):
            continue
        ops = [m[1].op for m in members]
        differ = [i for i in range(len(ops[0].operands))
                  if i != iw and len({o.operands[i] for o in ops}) != 1]
        if len(differ) != 1 or len({len(o.operands) for o in ops}) != 1:
            continue
        (idd,) = differ
        target = stack_of(tuple(o.operands[idd] for o in ops), at, stmt.phase)
        ins, res = subscripts.split("->")  # type: ignore[attr-defined]
        subs = ins.split(",")
        letter = _letter(subscripts)  # type: ignore[arg-type]
        subs[iw] = letter + subs[iw]
        subs[idd] = letter + subs[idd]
        operands = list(ops[0].operands)
        operands[iw], operands[idd] = w, target
        product = Einsum(f"{','.join(subs)}->{res}", tuple(operands))
        what = f"the sum over the parts of {w} as one product"
        rest = stmt.op.body - sp.Add(*(m[0] for m in members))
        if rest == 0:
            new = replace(stmt, op=product, comment=join_comments(stmt.comment, what))
        else:  # the other terms stay: + the one product, computed just before
            name = emit(product, what)
            rank = next(v.out_rank for v in views.values() if isinstance(v, View))
            view = View(name, (None,) * rank, tuple(range(rank)), rank)
            kept = {k: v for k, v in views.items() if k in rest.free_symbols}
            kept[view.placeholder()] = view
            new = replace(stmt, op=Map(rest + view.placeholder(), ordered(kept)))
        return new, [m[1].target for m in members]
    return None
