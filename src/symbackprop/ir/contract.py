"""The order of a contraction of several arrays, chosen by cost.

``out[f] = sum_c  A[..] B[..] C[..]`` is computed as a chain of pairwise products. The
order matters: for a low-rank adapter ``x[n,i] A[r,i] B[o,r]`` the pair (x, A) first
costs N·R·I + N·R·O multiply-adds, while (A, B) first builds an O×I matrix (O·R·I) and
pairing x with B first would make an N×I×O×R-sized intermediate. Every pairing tree is
tried (dynamic programming over subsets: operands are few), each pairwise product
costing the product of the extents of the indices it touches. Symbolic extents (the
batch ``N``) are valued at :data:`NOMINAL_DIM` — a dimension named by a symbol is assumed
large, which is what decides orders in practice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import sympy as sp

NOMINAL_DIM = 1024


@dataclass(frozen=True)
class Step:
    """One pairwise product: operands ``left`` and ``right`` (positions in the working
    list) into a new array with ``indices``."""

    left: int
    right: int
    indices: tuple[sp.Symbol, ...]


def _size(extent: sp.Expr) -> int:
    value = extent.subs({s: NOMINAL_DIM for s in extent.free_symbols})
    return max(int(value), 1)


def plan(operands: Sequence[tuple[sp.Symbol, ...]], free: tuple[sp.Symbol, ...],
         extents: Mapping[sp.Symbol, sp.Expr]) -> list[Step]:
    """Pairwise steps that contract ``operands`` (their index tuples) down to ``free``.

    Working list semantics: each step removes ``left`` and ``right`` (left < right) and
    appends the product at the end, like ``opt_einsum``'s contraction paths.
    """
    n = len(operands)
    sizes = {i: _size(e) for i, e in extents.items()}
    full = frozenset(range(n))
    sets = [frozenset(ix) for ix in operands]

    def keep(group: frozenset[int]) -> frozenset[sp.Symbol]:
        inside = frozenset().union(*(sets[k] for k in group))
        outside = frozenset(free).union(*(sets[k] for k in full - group))
        return inside & outside

    best: dict[frozenset[int], tuple[int, tuple]] = {frozenset({k}): (0, (k,)) for k in range(n)}
    for size in range(2, n + 1):
        for combo in combinations(range(n), size):
            group = frozenset(combo)
            first = min(group)
            choice: tuple[int, tuple] | None = None
            rest = sorted(group - {first})
            # every split into two non-empty halves, the half holding `first` on the left
            for r in range(0, len(rest)):
                for extra in combinations(rest, r):
                    left = frozenset({first, *extra})
                    right = group - left
                    cost_l, tree_l = best[left]
                    cost_r, tree_r = best[right]
                    touched = keep(left) | keep(right)
                    cost = cost_l + cost_r + _prod(sizes, touched)
                    if choice is None or cost < choice[0]:
                        choice = (cost, (tree_l, tree_r))
            assert choice is not None
            best[group] = choice
    steps: list[Step] = []
    working: list[object] = list(range(n))
    index_of: dict[object, tuple[sp.Symbol, ...]] = {k: tuple(operands[k]) for k in range(n)}

    def members(tree: tuple) -> frozenset[int]:
        if len(tree) == 1:
            return frozenset(tree)
        return members(tree[0]) | members(tree[1])

    def walk(tree: tuple) -> object:
        if len(tree) == 1:
            return tree[0]
        a, b = walk(tree[0]), walk(tree[1])
        group = members(tree)
        if group == full:
            out = tuple(free)
        else:
            kept = keep(group)
            seen = [*index_of[a], *index_of[b]]
            out = tuple(dict.fromkeys(i for i in seen if i in kept))
        pa, pb = working.index(a), working.index(b)
        left, right = min(pa, pb), max(pa, pb)
        steps.append(Step(left, right, out))
        key = ("step", len(steps))
        working.pop(right)
        working.pop(left)
        working.append(key)
        index_of[key] = out
        return key

    walk(best[full][1])
    return steps


def _prod(sizes: Mapping[sp.Symbol, int], indices: frozenset[sp.Symbol]) -> int:
    total = 1
    for i in indices:
        total *= sizes.get(i, NOMINAL_DIM)
    return total


def cost(operands: Sequence[tuple[sp.Symbol, ...]], free: tuple[sp.Symbol, ...],
         extents: Mapping[sp.Symbol, sp.Expr], steps: Sequence[Step]) -> int:
    """Multiply-adds of a path (for tests and the derivation's notes)."""
    sizes = {i: _size(e) for i, e in extents.items()}
    working = [tuple(o) for o in operands]
    total = 0
    for step in steps:
        a, b = working[step.left], working[step.right]
        total += _prod(sizes, frozenset(a) | frozenset(b))
        working.pop(step.right)
        working.pop(step.left)
        working.append(step.indices)
    return total
