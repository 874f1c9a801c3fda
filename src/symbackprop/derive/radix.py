"""Mixed-radix index arithmetic: the affine index maps of a row-major reshape.

A reshape reads its input at indices that regroup the output's axes. Splitting an axis of
32 into 4 x 8 reads ``x[i0, 8*i2 + i3]``; merging 4 x 8 back into 32 reads
``x[i0, floor(i2/8), Mod(i2, 8)]``. Both are sums of *digits*: ``Mod(floor(v/lo), size)``
of one index ``v`` (``floor(v/lo)`` for the leading digit, ``v`` itself for the whole
index), each scaled by a place value.

This module owns that arithmetic, used in two places:

* differentiation (:func:`solve_deltas`): the chain rule meets ``KroneckerDelta(8*i2 + i3,
  k2)`` with ``i2``, ``i3`` summed; the sum collapses at ``i2 = floor(k2/8)``,
  ``i3 = Mod(k2, 8)`` — the adjoint of a split is a merge and vice versa;
* lowering (:func:`axis_digits`): a reference whose indices are digits of the output's
  axes is a reshape / permute / reshape view of the array, never a per-element loop.

Every index is non-negative and below its axis' extent, so a digit of a value below
``lo * size`` needs no ``Mod`` on its leading digit. Dimensions are positive symbols or
integers; divisibility between them is decided exactly (a quotient with denominator 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp


def _is_index(expr: sp.Basic) -> bool:
    # as derive.calculus.is_index_symbol (kept local: calculus imports this module)
    return isinstance(expr, sp.Symbol) and bool(expr.is_integer) and not expr.is_positive


def divides(a: sp.Expr, b: sp.Expr) -> bool:
    """Whether ``b / a`` is a positive integer expression (a product of dimensions)."""
    if a == b:
        return True
    num, den = sp.fraction(sp.cancel(sp.sympify(b) / a))
    return den == 1 and bool(num.is_positive) and bool(num.is_integer)


def chain(values: set[sp.Expr]) -> list[sp.Expr] | None:
    """``values`` sorted so each divides the next; None when two do not divide either way."""
    out: list[sp.Expr] = []
    for v in sorted(values, key=sp.default_sort_key):
        pos = 0
        while pos < len(out) and divides(out[pos], v):
            pos += 1
        if pos < len(out) and not divides(v, out[pos]):
            return None
        if pos > 0 and not divides(out[pos - 1], v):
            return None
        out.insert(pos, v)
    return out


@dataclass(frozen=True)
class Digit:
    """``Mod(floor(var / lo), size)``; ``size`` None: everything above ``lo``."""

    var: sp.Symbol
    lo: sp.Expr
    size: sp.Expr | None


def parse_digit(expr: sp.Expr) -> Digit | None:
    if _is_index(expr):
        return Digit(expr, sp.Integer(1), None)
    if isinstance(expr, sp.floor):
        num, den = sp.fraction(expr.args[0])
        if _is_index(num) and not any(_is_index(s) for s in den.free_symbols):
            return Digit(num, den, None)
        return None
    if isinstance(expr, sp.Mod):
        inner, size = expr.args
        if any(_is_index(s) for s in size.free_symbols):
            return None
        base = parse_digit(inner)
        if base is None or base.size is not None:
            return None
        return Digit(base.var, base.lo, size)
    return None


def parse_index(expr: sp.Expr) -> list[tuple[sp.Expr, Digit]] | None:
    """``expr`` as ``sum(coef * digit)``, coefficients free of indices; None otherwise."""
    terms: list[tuple[sp.Expr, Digit]] = []
    for term in sp.Add.make_args(expr):
        coef, rest = sp.Integer(1), []
        for factor in sp.Mul.make_args(term):
            if any(_is_index(s) for s in factor.free_symbols):
                rest.append(factor)
            else:
                coef = coef * factor
        if len(rest) != 1 or not (coef.is_positive and coef.is_integer):
            return None
        digit = parse_digit(rest[0])
        if digit is None:
            return None
        terms.append((coef, digit))
    return terms


@dataclass(frozen=True)
class Fine:
    """One digit of an index between two consecutive cuts: ``floor(var/lo)`` mod ``size``."""

    var: sp.Symbol
    lo: sp.Expr
    size: sp.Expr


def fine_digits(var: sp.Symbol, extent: sp.Expr, cuts: set[sp.Expr]) -> list[Fine] | None:
    """``var``'s digits between the place values ``cuts`` (major first)."""
    ordered = chain({sp.Integer(1), sp.sympify(extent), *cuts})
    if ordered is None or ordered[-1] != extent:
        return None
    pairs = zip(ordered[:-1], ordered[1:], strict=True)
    return [Fine(var, a, sp.cancel(b / a)) for a, b in pairs][::-1]


def split_terms(terms: list[tuple[sp.Expr, Digit]], extents: Mapping[sp.Symbol, sp.Expr],
                fines: Mapping[sp.Symbol, list[Fine]]) -> list[tuple[sp.Expr, Fine]] | None:
    """Each (coef, digit) as (place value, fine digit) pairs, sorted major first, checked
    to be a mixed radix: the minor place value is 1 and each next is the one below times
    that digit's size."""
    out: list[tuple[sp.Expr, Fine]] = []
    for coef, digit in terms:
        hi = extents[digit.var] if digit.size is None else digit.lo * digit.size
        inside = [f for f in fines[digit.var]
                  if divides(digit.lo, f.lo) and divides(f.lo * f.size, hi)]
        if sp.cancel(sp.Mul(*(f.size for f in inside)) * digit.lo - hi) != 0:
            return None
        out += [(sp.cancel(coef * f.lo / digit.lo), f) for f in inside]
    out.sort(key=lambda pf: pf[0], reverse=False)
    place = sp.Integer(1)
    for value, f in out:
        if sp.cancel(value - place) != 0:
            return None
        place = place * f.size
    return out[::-1]


def cuts_of(terms: list[tuple[sp.Expr, Digit]],
            extents: Mapping[sp.Symbol, sp.Expr]) -> dict[sp.Symbol, set[sp.Expr]]:
    cuts: dict[sp.Symbol, set[sp.Expr]] = {}
    for _, digit in terms:
        hi = extents[digit.var] if digit.size is None else digit.lo * digit.size
        cuts.setdefault(digit.var, set()).update({digit.lo, sp.sympify(hi)})
    return cuts


Digits = tuple[list[list[Fine]], dict[sp.Symbol, list[Fine]]]


def axis_digits(indices: list[sp.Expr], extents: Mapping[sp.Symbol, sp.Expr],
                sizes: list[sp.Expr]) -> Digits | None:
    """For a reference ``A[indices]`` (A's axes of ``sizes``) whose indices are digit sums
    of the symbols in ``extents``: each A axis as its fine digits (major first), and each
    symbol's fine digits. None when an index is not of that form."""
    parsed = [parse_index(e) for e in indices]
    if any(p is None for p in parsed):
        return None
    cuts: dict[sp.Symbol, set[sp.Expr]] = {}
    for terms in parsed:
        for var, found in cuts_of(terms, extents).items():  # type: ignore[arg-type]
            if var not in extents:
                return None
            cuts.setdefault(var, set()).update(found)
    fines: dict[sp.Symbol, list[Fine]] = {}
    for var, found in cuts.items():
        digits = fine_digits(var, extents[var], found)
        if digits is None:
            return None
        fines[var] = digits
    axes: list[list[Fine]] = []
    for terms, size in zip(parsed, sizes, strict=True):
        split = split_terms(terms, extents, fines)  # type: ignore[arg-type]
        if split is None or sp.cancel(sp.Mul(*(f.size for _, f in split)) - size) != 0:
            return None
        axes.append([f for _, f in split])
    return axes, fines


def _value(f: Fine, of: sp.Expr, place: sp.Expr, leading: bool) -> sp.Expr:
    """The fine digit ``f`` read from ``of`` where it sits at ``place``."""
    shifted = of if place == 1 else sp.floor(of / place)
    return shifted if leading else sp.Mod(shifted, f.size)


def _top(terms: list[tuple[sp.Expr, Digit]], extents: Mapping[sp.Symbol, sp.Expr]) -> sp.Expr:
    """The largest value of a digit sum (each digit at its largest)."""
    total: sp.Expr = sp.Integer(0)
    for coef, digit in terms:
        if digit.size is not None:
            most = digit.size - 1
        elif divides(digit.lo, extents[digit.var]):
            most = sp.cancel(extents[digit.var] / digit.lo) - 1
        else:
            most = sp.floor((extents[digit.var] - 1) / digit.lo)
        total += coef * most
    return total


def solve_deltas(term: sp.Expr, limits: Mapping[sp.Symbol, sp.Expr],
                 summed: list[sp.Symbol],
                 bounds: Mapping[sp.Symbol, sp.Expr] | None = None) -> sp.Expr | None:
    """Sum out the summed indices pinned by mixed-radix deltas in the product ``term``.

    ``KroneckerDelta(lhs, rhs)`` with ``lhs`` a digit sum of summed indices and ``rhs``
    free of them fixes each of lhs's digits; once every digit of a summed index is fixed,
    the index is their place-value sum and its sum disappears. ``limits``: each summed
    index's extent. Removes the eliminated indices from ``summed``; None when no delta
    of this kind pins every digit of the indices it mentions. ``bounds``: extents of
    free indices; a delta whose digit sum does not span its free index's whole range
    (windows that skip the input's last rows) is not a reshape and is left alone.
    """
    factors = sp.Mul.make_args(term)
    found: list[tuple[sp.Expr, list[tuple[sp.Expr, Digit]], sp.Expr]] = []
    for factor in factors:
        if not isinstance(factor, sp.KroneckerDelta):
            continue
        for lhs, rhs in (factor.args, factor.args[::-1]):
            inner = {s for s in lhs.free_symbols if _is_index(s)}
            if not inner or not inner <= set(summed) or rhs.free_symbols & set(summed):
                continue
            terms = parse_index(lhs)
            if terms is not None and bounds is not None and rhs in bounds:
                span = sp.cancel(_top(terms, limits) + 1 - bounds[rhs])
                if span != 0:
                    terms = None
            if terms is not None:
                found.append((factor, terms, rhs))
                break
    if not found:
        return None
    extents = {v: limits[v] for v in summed}
    cuts: dict[sp.Symbol, set[sp.Expr]] = {}
    for _, terms, _ in found:
        for var, c in cuts_of(terms, extents).items():
            cuts.setdefault(var, set()).update(c)
    fines: dict[sp.Symbol, list[Fine]] = {}
    for var, c in cuts.items():
        digits = fine_digits(var, extents[var], c)
        if digits is None:
            return None
        fines[var] = digits
    values: dict[Fine, sp.Expr] = {}
    for _, terms, rhs in found:
        split = split_terms(terms, extents, fines)
        if split is None:
            return None
        for n, (place, f) in enumerate(split):
            if f in values:
                return None  # one digit pinned twice (a diagonal): leave it
            values[f] = _value(f, rhs, place, leading=n == 0)
    if any(f not in values for digits in fines.values() for f in digits):
        return None
    solution = {var: sp.Add(*(values[f] * f.lo for f in digits)) for var, digits in
                fines.items()}
    used = {factor for factor, _, _ in found}
    rest = sp.Mul(*(f for f in factors if f not in used))
    for var in solution:
        summed.remove(var)
    return rest.xreplace(solution)

