"""Broadcast factors first: ``g[:, None] * e / c[:, None]`` -> ``e * (g / c)[:, None]``.

In an elementwise product, factors that broadcast (views that span only some of the
output's axes, such as a pooling's adjoint and tie count against its six-axis ties) are
multiplied together at their own, smaller shape before the one product at the full shape.
Printed left to right, the product would instead make one full-size pass per factor:
measured 282 µs against 134 µs for the CNN example's pooling adjoint in torch. The
grouped factors become a statement of their own (a temporary over the union of their
axes), read through one view; the rest of the body is unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ... import naming
from ..nodes import Assign, Map, Program, View, ordered


def _partial(factor: sp.Expr, views: dict[sp.Symbol, object], rank: int) -> View | None:
    """The view of a factor ``v`` or ``v**k`` when it broadcasts (spans some, not all, of
    the output's axes); None otherwise."""
    base = factor.base if isinstance(factor, sp.Pow) and factor.exp.is_Integer else factor
    view = views.get(base) if isinstance(base, sp.Symbol) else None
    if (not isinstance(view, View) or any(p is not None for p in view.picks)
            or not view.places or len(view.places) >= rank):
        return None
    return view


def broadcast(stmts: list[Assign], program: Program) -> list[Assign]:
    taken = {s.target for s in stmts} | set(program.shapes)
    counter = 0
    out: list[Assign] = []
    for stmt in stmts:
        op = stmt.op
        if not isinstance(op, Map) or not isinstance(op.body, sp.Mul):
            out.append(stmt)
            continue
        views = dict(op.views)
        rank = next((v.out_rank for v in views.values() if isinstance(v, View)), 0)
        factors = sp.Mul.make_args(op.body)
        partial = [(f, _partial(f, views, rank)) for f in factors]
        small = [(f, v) for f, v in partial if v is not None]
        rest = [f for f, v in partial if v is None]
        arrays = [f for f in rest if f.free_symbols & set(views)]
        if len(small) < 2 or not arrays:
            out.append(stmt)
            continue
        axes = sorted({p for _, v in small for p in v.places})
        if (any(set(v.places) != set(axes) for _, v in small)
                or not all(program.shapes.get(v.src) is not None for _, v in small)):
            # factors over different axes would multiply out to a larger array first
            out.append(stmt)
            continue
        extent = {}
        for _, v in small:
            for p, n in zip(v.places, program.shapes[v.src], strict=True):
                extent.setdefault(p, n)
        counter += 1
        while naming.grouped(counter) in taken:
            counter += 1
        temp = naming.grouped(counter)
        taken.add(temp)
        program.shapes[temp] = tuple(extent[p] for p in axes)
        # the grouped factors at their own rank: each view re-placed among ``axes``
        inner_views: dict[sp.Symbol, View] = {}
        mapping: dict[sp.Symbol, sp.Symbol] = {}
        for f, v in small:
            sym = f.base if isinstance(f, sp.Pow) else f
            local = View(v.src, v.picks, tuple(axes.index(p) for p in v.places), len(axes))
            inner_views[local.placeholder()] = local
            mapping[sym] = local.placeholder()
        inner = sp.Mul(*(f for f, _ in small)).xreplace(mapping)
        out.append(Assign(temp, Map(inner, ordered(inner_views)), "", stmt.phase))
        view = View(temp, (None,) * len(axes), tuple(axes), rank)
        kept = {s: v for s, v in op.views if s in sp.Mul(*rest).free_symbols}
        kept[view.placeholder()] = view
        body = sp.Mul(*rest) * view.placeholder()
        out.append(replace(stmt, op=Map(body, ordered(kept))))
    return out
