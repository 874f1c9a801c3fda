"""Rewrites for display: identities that make an expression read like a textbook.

Each rule here is a mathematical identity (a Piecewise as an indicator, constants pulled
out of sums, a sign absorbed into a difference, summation indices renamed in order, a
sum over one value written as its one term); none changes a value, so an expression
rewritten here still evaluates to what the generated code computes. The rules are
applied bottom-up by :func:`_rebuild`, which switches sympy's ``distribute`` flag only
where a rebuilt node would come out differently (each switch clears sympy's cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sympy as sp
from sympy.core.parameters import distribute, global_parameters

from .notation import Indicator, Select, _index

# Rewrites for display (mathematically identities; never change a value).

def _set_distribute(flag: bool) -> None:
    """``sympy.core.parameters.distribute`` without the ``with``: sympy clears its whole
    cache on every change of the flag, so callers switch it only when it must change."""
    if global_parameters.distribute != flag:
        global_parameters.distribute = flag


def _rebuild(expr: sp.Expr, rule: Callable[[sp.Expr], sp.Expr],
             kinds: type | tuple[type, ...] | None = None, *,
             neutral: bool = False) -> sp.Expr:
    """Apply ``rule`` bottom-up (rebuilding only the nodes whose arguments changed).

    A rebuilt node and the rule on it are evaluated with ``distribute(False)``; the rule
    on an untouched node with the caller's setting. ``kinds``: the types the rule can
    change (it returns every other node as it is), so untouched nodes of other types are
    left alone without switching. The flag is switched lazily (each switch clears sympy's
    cache, which made printing cost several times what it computes).

    ``neutral``: what the rule builds does not depend on the flag (it wraps a tensor
    reference, or returns a number). Then a rebuild whose every rebuilt node is
    ``_neutral`` is done without switching at all, which gives the same expression.
    """
    if kinds is not None and not expr.has(*(kinds if isinstance(kinds, tuple) else (kinds,))):
        return expr  # the rule changes nothing here: no walk (has() is cached by sympy)
    outer = global_parameters.distribute
    if neutral and outer:
        out = _rebuild_neutral(expr, rule, kinds)
        if out is not None:
            return out
    try:
        return _rebuild_in(expr, rule, kinds, outer)
    finally:
        _set_distribute(outer)


def _rebuild_neutral(expr: sp.Expr, rule: Callable[[sp.Expr], sp.Expr],
                     kinds: type | tuple[type, ...] | None) -> sp.Expr | None:
    """``_rebuild_in`` in the current setting; None at the first node that might build
    differently under ``distribute(False)``."""
    if not expr.args or isinstance(expr, sp.Indexed | sp.IndexedBase):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        return rule(expr)
    args = []
    for old in expr.args:
        new = _rebuild_neutral(old, rule, kinds)
        if new is None:
            return None
        args.append(new)
    if all(new is old for new, old in zip(args, expr.args, strict=True)):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        return rule(expr)
    built = expr.func(*args)
    return rule(built) if _neutral(expr.func, args, built) else None


def _rebuild_in(expr: sp.Expr, rule: Callable[[sp.Expr], sp.Expr],
                kinds: type | tuple[type, ...] | None, outer: bool) -> sp.Expr:
    if not expr.args or isinstance(expr, sp.Indexed | sp.IndexedBase):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        _set_distribute(outer)
        return rule(expr)
    args = tuple(_rebuild_in(a, rule, kinds, outer) for a in expr.args)
    if all(new is old for new, old in zip(args, expr.args, strict=True)):
        if kinds is not None and not isinstance(expr, kinds):
            return expr
        _set_distribute(outer)
        return rule(expr)
    _set_distribute(False)
    return rule(expr.func(*args))


def _indicators(expr: sp.Expr) -> sp.Expr:
    """Piecewise((e, c), (0, True)) -> e * I[c]; any other Piecewise -> Select.

    Besides reading better, this keeps Piecewise out of sums: sympy's ``Sum`` folds a
    Piecewise in its body outwards (``piecewise_fold``), past the index it depends on.
    """
    expr = _tidy_logic(expr)

    def rule(e: sp.Expr) -> sp.Expr:
        if not isinstance(e, sp.Piecewise) or e.args[-1].cond != sp.true:
            return e
        out = e.args[-1].expr
        for value, cond in reversed(e.args[:-1]):
            if out == 0:
                out = value * Indicator(cond) if value != 1 else Indicator(cond)
            else:
                out = Select(cond, value, out)
        return out
    return _rebuild(expr, rule, sp.Piecewise)


def _tidy_logic(expr: sp.Expr) -> sp.Expr:
    """Simplify boolean conditions (ITE(c, c, False) -> c) and fold nested Piecewise."""
    def rule(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.logic.boolalg.BooleanFunction) and not isinstance(
                e, sp.core.relational.Relational):
            return sp.logic.boolalg.simplify_logic(e)
        return e
    out = _rebuild(expr, rule, sp.logic.boolalg.BooleanFunction)
    return sp.piecewise_fold(out) if out.has(sp.Piecewise) and not out.has(sp.Sum) else out


def _pull_constants(expr: sp.Expr) -> sp.Expr:
    """Sum(c * f) -> c * Sum(f) for factors c that do not depend on the summed indices."""
    def rule(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.Sum):
            bound = {lim[0] for lim in e.limits}
            inside, outside = [], []
            for f in sp.Mul.make_args(e.function):
                (inside if f.free_symbols & bound else outside).append(f)
            if outside and inside:
                return sp.Mul(*outside) * sp.Sum(sp.Mul(*inside), *e.limits)
        return e
    return _rebuild(expr, rule, sp.Sum)


def _flip_signs(expr: sp.Expr) -> sp.Expr:
    """-c (h - 1) x -> c (1 - h) x: absorb a negative coefficient into a difference."""
    def rule(e: sp.Expr) -> sp.Expr:
        if not isinstance(e, sp.Mul):
            return e
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_negative:
            return e
        adds = [f for f in sp.Mul.make_args(rest) if isinstance(f, sp.Add)]
        if not adds:
            return e
        adds.sort(key=lambda a: 0 if any(t.is_number and t.is_negative for t in a.args) else 1)
        pick = adds[0]
        others = list(sp.Mul.make_args(rest))
        others.remove(pick)
        flipped = sp.Add(*(-t for t in pick.args))
        with distribute(False):
            return sp.Mul(-coeff, flipped, *others) if -coeff != 1 else sp.Mul(flipped, *others)
    return _rebuild(expr, rule, sp.Mul)


@dataclass(frozen=True)
class _Node:
    """A node of :meth:`_Builder.matrix`'s plan: ``func(*args)``, made once all are placed."""

    func: type
    args: list[object]


def _neutral(func: type, args: Sequence[sp.Basic], built: sp.Basic) -> bool:
    """Whether ``func(*args)``, which gave ``built`` in the current setting, gives the
    same under ``distribute(False)`` (conservatively: False where unsure).

    In sympy the flag is read in two places of ``Mul.flatten`` only, both of which turn
    a product whose commutative part is a number times a sum into a sum (and in
    ``Add.__neg__``, which construction calls only through function ``eval`` code). So
    a node is the same either way when it is an Add (``Add.flatten`` never
    distributes: a ``c * Add`` term is rebuilt unevaluated), a Mul that did not come
    out as a sum, has no Mul to flatten and combines no powers (no exponent sums, no
    ``exp`` merging), a power with a number exponent that did not come out as a sum, a
    tensor reference, a Sum with no Piecewise to fold, or a function with atomic
    arguments (no sum for its ``eval`` to negate).
    """
    if func is sp.Add:
        return True
    if built.is_Add:
        return False
    if func is sp.Mul:
        bases = [a.as_base_exp()[0] for a in args]  # type: ignore[attr-defined]
        return len(set(bases)) == len(bases) and not any(
            isinstance(a, sp.Mul) or isinstance(a, sp.Pow) and not a.exp.is_Number
            for a in args)
    if func is sp.Pow:
        return bool(args[1].is_Number)
    if func in (sp.Indexed, sp.Tuple):
        return True
    if func is sp.Sum:
        return not args[0].has(sp.Piecewise)
    return isinstance(func, type) and issubclass(func, sp.Function) and all(
        not a.args for a in args)


def _build_neutral(plan: _Node) -> sp.Expr | None:
    """``plan`` built in the current setting where every node of it is ``_neutral``;
    None elsewhere (the caller then builds it under ``distribute(False)``)."""
    args = [_build_neutral(a) if isinstance(a, _Node) else a for a in plan.args]
    if any(a is None for a in args):
        return None
    built: sp.Expr = plan.func(*args)
    return built if _neutral(plan.func, args, built) else None




def _set_first(table: dict[sp.Symbol, sp.Expr],
               items: list[tuple[sp.Basic, list[tuple[sp.Symbol, sp.Expr]]]]) -> None:
    """``table.setdefault(key, value)`` for the pairs of every item, the items taken in
    ``default_sort_key`` order. Only keys the items disagree on need that order, and
    sorting sums by it walks their whole bodies, so only those are sorted."""
    found: dict[sp.Symbol, list[tuple[sp.Basic, sp.Expr]]] = {}
    for item, pairs in items:
        seen: set[sp.Symbol] = set()
        for key, value in pairs:
            if key not in table and key not in seen:  # an item's first pair for a key
                seen.add(key)
                found.setdefault(key, []).append((item, value))
    for key, options in found.items():
        if len({value for _, value in options}) == 1:
            table[key] = options[0][1]
        else:
            table[key] = min(options, key=lambda o: sp.default_sort_key(o[0]))[1]


def _trivial_sums(expr: sp.Expr) -> sp.Expr:
    """A sum over a single value is that one term: Sum(f(j), (j, 0, 0)) -> f(0)."""
    def rule(e: sp.Expr) -> sp.Expr:
        # A Sum with nothing to drop is returned as it is: an equal new Sum would make
        # ``_rebuild`` rebuild every ancestor (and clear sympy's cache twice doing so).
        if not isinstance(e, sp.Sum) or all(lo != hi for _, lo, hi in e.limits):
            return e
        body, kept = e.function, []
        for var, lo, hi in e.limits:
            if lo == hi:
                body = body.xreplace({var: lo})
            else:
                kept.append((var, lo, hi))
        return sp.Sum(body, *kept) if kept else body
    return _rebuild(expr, rule, sp.Sum)


def _canonical_bound(expr: sp.Expr) -> sp.Expr:
    """Rename summation indices s0, s1, ... in the order they appear (stable letters)."""
    sums = []

    def collect(e: sp.Expr) -> None:
        if isinstance(e, sp.Sum):
            sums.append(e)
        for a in e.args:
            collect(a)
    collect(expr)
    bound: list[sp.Symbol] = []
    for s in sums:
        for var, _, _ in s.limits:
            if var not in bound:
                bound.append(var)
    if not bound:
        return expr
    # One simultaneous replacement: xreplace maps every node at most once, so a swap
    # such as {s1: s0, s0: s1} needs no temporary names.
    return expr.xreplace({v: _index("s", n) for n, v in enumerate(bound)})


def _bound(expr: sp.Expr) -> set[sp.Symbol]:
    return {lim[0] for s in expr.atoms(sp.Sum) for lim in s.limits}


def _expand_sums(expr: sp.Expr) -> sp.Expr:
    """Write out every sum whose bounds are numbers; keep sums over the batch."""
    def rule(e: sp.Expr) -> sp.Expr:
        if not isinstance(e, sp.Sum):
            return e
        body = e.function
        kept = []
        for var, lo, hi in reversed(e.limits):
            if lo.is_number and hi.is_number:
                body = sp.Add(*(body.xreplace({var: sp.Integer(v)})
                                for v in range(int(lo), int(hi) + 1)))
            else:
                kept.append((var, lo, hi))
        return sp.Sum(body, *reversed(kept)) if kept else body
    return _rebuild(expr, rule, sp.Sum)


