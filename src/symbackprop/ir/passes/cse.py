"""Common subexpressions across a function's elementwise bodies (forward and backward).

``sympy.cse`` runs over every :class:`Map` and :class:`Reduce` body at once. Because
equal reads are equal placeholder symbols (one per distinct view), a subexpression found
here is the same computation wherever it occurs. A shared subexpression is laid out in
the axes of the bodies it came from, so it is read back as it is (a view with no axes
of its own, see :class:`~symbackprop.ir.nodes.View`). Shared subexpressions of sizes and
numbers alone (``1/N``) are cheaper inline and are put back, and so is a negated array
(``-a``): the sign folds into each reader's own arithmetic, where a shared ``-a`` would be
one more pass over memory, and one more array kept from forward to backward when its
readers sit on both sides. Nothing is shared out of a
``where`` branch (see :func:`_hide_branches`).
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ... import naming
from ..nodes import AnyView, Assign, Map, Phase, Program, Reduce, View, ordered


def cse(stmts: list[Assign], program: Program) -> list[Assign]:
    positions = [i for i, s in enumerate(stmts) if isinstance(s.op, Map | Reduce)]
    if not positions:
        return stmts
    bodies = [stmts[i].op.body for i in positions]  # type: ignore[union-attr]
    views: dict[sp.Symbol, AnyView] = {}
    for i in positions:
        views.update(stmts[i].op.views)  # type: ignore[union-attr]
    taken = ({s.target for s in stmts} | set(program.shapes)
             | {name for v in views.values() for name in v.reads})
    names = (sp.Symbol(naming.temp(n)) for n in range(10**6) if naming.temp(n) not in taken)
    hidden: dict[sp.Expr, sp.Symbol] = {}
    bodies = [_hide_branches(b, hidden) for b in bodies]
    replacements, reduced = sp.cse(bodies, symbols=names, order="none", list=True)
    # A hidden value may hold an inner where() whose values were hidden first: resolve
    # in creation order, so each stand-in maps to its fully restored value.
    shown: dict[sp.Symbol, sp.Expr] = {}
    for value, sym in hidden.items():
        shown[sym] = value.xreplace(shown)
    replacements = [(sym, expr.xreplace(shown)) for sym, expr in replacements]
    reduced = [expr.xreplace(shown) for expr in reduced]
    inline = _inline(replacements, views)
    while inline:
        # Each put-back value closed over the others put back in the same round (a
        # negation of a scalar: -x0 with x0 = 1/N): one xreplace is one substitution.
        closed = {sym: _closure(expr, inline) for sym, expr in inline.items()}
        replacements = [(sym, expr.xreplace(closed)) for sym, expr in replacements
                        if sym not in closed]
        reduced = [expr.xreplace(closed) for expr in reduced]
        inline = _inline(replacements, views)
    temp_views = {sym: View(sym.name, (), (), 0) for sym, _ in replacements}
    all_views = {**views, **temp_views}

    def own(expr: sp.Expr) -> tuple[tuple[sp.Symbol, View], ...]:
        used = expr.free_symbols
        return ordered({s: all_views[s] for s in used if s in all_views})

    out = list(stmts)
    for i, expr in zip(positions, reduced, strict=True):
        out[i] = replace(out[i], op=replace(out[i].op, body=expr, views=own(expr)))
    if not replacements:
        return out
    temps = {sym.name: Assign(sym.name, Map(expr, own(expr))) for sym, expr in replacements}
    # Place each temporary just before the first statement that (transitively) reads it,
    # visiting dependencies in sorted order so the output never depends on set order.
    result: list[Assign] = []
    placed: set[str] = set()

    def place(name: str, phase: Phase) -> None:
        temp = temps.get(name)
        if temp is None or name in placed:
            return
        for dep in sorted(temp.reads):
            place(dep, phase)
        placed.add(name)
        result.append(replace(temp, phase=phase))

    for stmt in out:
        for dep in sorted(stmt.reads):
            place(dep, stmt.phase)
        result.append(stmt)
    return result


def _inline(replacements: list[tuple[sp.Symbol, sp.Expr]],
            views: dict[sp.Symbol, AnyView]) -> dict[sp.Symbol, sp.Expr]:
    """Replacements cheaper inline: those that read no array, directly or through another
    replacement, and negations of one array (``-a``)."""
    defined = {sym for sym, _ in replacements}
    return {sym: expr for sym, expr in replacements
            if not any(s in views or s in defined for s in expr.free_symbols)
            or _negation(expr)}


def _closure(expr: sp.Expr, inline: dict[sp.Symbol, sp.Expr]) -> sp.Expr:
    """``expr`` with every symbol of ``inline`` replaced until none is left (the values
    come from sympy.cse, which never defines a symbol through itself)."""
    while expr.free_symbols & inline.keys():
        expr = expr.xreplace(inline)
    return expr


def _negation(expr: sp.Expr) -> bool:
    return (expr.is_Mul and len(expr.args) == 2 and expr.args[0] == -1
            and expr.args[1].is_Symbol)


def _hide_branches(expr: sp.Expr, hidden: dict[sp.Expr, sp.Symbol]) -> sp.Expr:
    """``expr`` with each compound branch value of a ``where`` replaced by a stand-in
    symbol (equal values, equal symbols). A subexpression shared out of a branch would be
    computed for every entry, also those the condition discards: ``log(x)`` where
    ``x > 0`` fails, warning (numpy) on exactly the entries the result never uses."""
    if not expr.has(sp.Piecewise):
        return expr

    def hide(value: sp.Expr) -> sp.Expr:
        if value.is_Atom:
            return value
        if value not in hidden:
            hidden[value] = sp.Symbol(f"<branch{len(hidden)}>")
        return hidden[value]

    return expr.replace(lambda e: isinstance(e, sp.Piecewise),
                        lambda e: sp.Piecewise(*((hide(v), c) for v, c in e.args),
                                               evaluate=False))
