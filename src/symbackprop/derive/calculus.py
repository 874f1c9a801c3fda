"""Index calculus: differentiate an op's index-notation body, contract with the adjoint.

For an op ``out[i] = body`` and an operand ``X``, the vector-Jacobian product is

    dL/dX[k] = sum_i  g[i] * d body / d X[k]

sympy's ``diff`` of ``Indexed`` objects yields ``KroneckerDelta(i, k)`` factors;
:func:`eliminate_deltas` sums them out (a delta over a summed index substitutes that
index and drops the sum). What is left is again index notation — ``sum_b g[b,k] x[b,l]``
for a dense weight, ``g[k] exp(z[k,l] - lse[k])`` for a logsumexp — which the lowering
pass turns into matrix products, reductions and fused elementwise code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import sympy as sp
from sympy.core.parameters import global_parameters

from .. import budget
from ..graph import Node, ref, target_index
from .radix import solve_deltas
from .stable import canonical_sigmoid

Limits = tuple[tuple[sp.Symbol, sp.Expr, sp.Expr], ...]


def _pull(expr: sp.Expr) -> tuple[frozenset[sp.Expr], sp.Expr]:
    """Split ``expr`` into (KroneckerDelta factors common to all of it, the rest).

    The chain rule multiplies every term of a derivative by the same deltas (one target
    element), but the product rule nests them inside sums: (a delta + b delta) c. Pulling
    shared deltas to the top makes them visible to the summation step without expanding.
    """
    if isinstance(expr, sp.KroneckerDelta):
        return frozenset({expr}), sp.Integer(1)
    if isinstance(expr, sp.Mul):
        deltas: frozenset[sp.Expr] = frozenset()
        rests = []
        for factor in expr.args:
            d, r = _pull(factor)
            deltas |= d
            rests.append(r)
        return deltas, sp.Mul(*rests)
    if isinstance(expr, sp.Add | sp.Piecewise):
        parts = list(expr.args) if isinstance(expr, sp.Add) else [b for b, _ in expr.args]
        pulled = [_pull(p) for p in parts]
        nonzero = [d for (d, r) in pulled if r != 0]
        common = frozenset.intersection(*nonzero) if nonzero else frozenset()
        rebuilt = [r * sp.Mul(*(d - common)) for d, r in pulled]
        if isinstance(expr, sp.Add):
            return common, sp.Add(*rebuilt)
        return common, sp.Piecewise(*((r, c) for r, (_, c) in zip(rebuilt, expr.args,
                                                                  strict=True)))
    return frozenset(), expr


def _split_delta(term: sp.Expr, summed: list[sp.Symbol]) -> sp.Expr | None:
    """Remove one KroneckerDelta that pins a summed index; None when there is none."""
    for factor in sp.Mul.make_args(term):
        if isinstance(factor, sp.KroneckerDelta):
            a, b = factor.args
            for var, other in ((a, b), (b, a)):
                if var in summed:
                    summed.remove(var)
                    rest = sp.Mul(*(f for f in sp.Mul.make_args(term) if f is not factor))
                    return rest.xreplace({var: other})
    return None


def _sum(term: sp.Expr, limits: Limits) -> sp.Expr:
    """Build sum(term) over ``limits``, pulling out factors that do not depend on them."""
    if not limits or term == 0:
        return term
    variables = {lim[0] for lim in limits}
    inside, outside = [], []
    for factor in sp.Mul.make_args(term):
        (inside if factor.free_symbols & variables else outside).append(factor)
    used = tuple(lim for lim in limits if any(lim[0] in f.free_symbols for f in inside))
    unused = [lim for lim in limits if lim not in used]
    scale = sp.Mul(*(hi - lo + 1 for _, lo, hi in unused))
    body = sp.Mul(*inside)
    core = sp.Sum(body, *used) if used else body
    return sp.Mul(*outside) * scale * core


def _drop_constant_deltas(term: sp.Expr) -> sp.Expr:
    """delta(0, k) = 1: a constant index only marks a size-1 (broadcast) axis, so the
    target index k on that axis ranges over {0} alone."""
    return term.replace(
        lambda e: isinstance(e, sp.KroneckerDelta) and any(a.is_Integer for a in e.args),
        lambda e: sp.Integer(1))


def _is_window_delta(expr: sp.Basic, inner: set[sp.Symbol]) -> bool:
    """A delta that pins an affine combination of summation indices (a strided or padded
    window, ``delta(2*i + a - 1, k)``), which no substitution of one index removes."""
    return isinstance(expr, sp.KroneckerDelta) and any(
        not a.is_Symbol and a.free_symbols & inner for a in expr.args)


def _flatten(term: sp.Expr, limits: Limits) -> tuple[sp.Expr, Limits, set[sp.Symbol]]:
    """Merge each factor ``Sum(f, inner)`` of ``term`` whose ``f`` keeps a window delta
    into the outer sum: ``sum_i g[i] * sum_a (W[a] delta(2i + a, k))`` becomes
    ``sum_{i,a} g[i] W[a] delta(2i + a, k)``, the form a window's adjoint lowers from
    (the inner sum alone would pair every kernel tap with every position). Also returns
    the merged indices (the taps)."""
    outer = {lim[0] for lim in limits}
    factors = list(sp.Mul.make_args(term))
    merged: set[sp.Symbol] = set()
    for n, factor in enumerate(factors):
        if not isinstance(factor, sp.Sum):
            continue
        inner_vars = {lim[0] for lim in factor.limits}
        others = sp.Mul(*(f for m, f in enumerate(factors) if m != n)).free_symbols
        if (inner_vars & (outer | others)
                or not any(_is_window_delta(d, inner_vars)
                           for d in factor.function.atoms(sp.KroneckerDelta))):
            continue
        factors[n] = factor.function
        limits = (*limits, *(tuple(lim) for lim in factor.limits))  # type: ignore[misc]
        merged |= inner_vars
    return (sp.Mul(*factors) if merged else term), limits, merged


def eliminate_deltas(expr: sp.Expr,
                     bounds: Mapping[sp.Symbol, sp.Expr] | None = None) -> sp.Expr:
    """Sum out every KroneckerDelta that involves a summation index, recursively.

    ``bounds``: the extents of the free (target) indices, where known. A mixed-radix
    delta ``delta(2*i + a, k)`` is solved as a reshape only when its digits span k's
    whole range; otherwise (a pooling window that drops the input's last row) it stays,
    as a window's adjoint."""
    if isinstance(expr, sp.Sum):
        inner = eliminate_deltas(expr.function, bounds)
        limits: Limits = tuple(tuple(lim) for lim in expr.limits)  # type: ignore[misc]
        total = sp.Integer(0)
        terms = []
        for term in sp.Add.make_args(inner):
            deltas, rest = _pull(term)
            if rest.has(sp.KroneckerDelta):  # deltas that differ between terms: distribute
                terms += [sp.Mul(*deltas) * t for t in sp.Add.make_args(sp.expand(rest))]
            else:
                terms.append(sp.Mul(*deltas) * rest)
        outer_limits = limits
        for term in terms:
            term, limits, taps = _flatten(term, outer_limits)
            extents = {lim[0]: lim[2] - lim[1] + 1 for lim in limits if lim[1] == 0}
            summed = [lim[0] for lim in limits]
            while True:
                reduced = _split_delta(term, summed)
                if reduced is None:  # an affine (reshape) delta: solve its digits
                    # A window's taps are not digits: delta(2*i + a, k) stays (even
                    # where the windows tile k exactly, a pooling's adjoint reads only
                    # i = floor(k/2), which no reshape view expresses).
                    open_ = [v for v in summed if v in extents and v not in taps]
                    before = set(open_)
                    reduced = solve_deltas(term, extents, open_, bounds)
                    solved = before - set(open_)
                    summed[:] = [v for v in summed if v not in solved]
                if reduced is None:
                    break
                term = reduced
            left = tuple(lim for lim in limits if lim[0] in summed)
            total += _sum(_drop_constant_deltas(term), left)
        return total
    if not expr.args or isinstance(expr, sp.Indexed | sp.KroneckerDelta):
        return expr
    return expr.func(*(eliminate_deltas(a, bounds) for a in expr.args))


class _Memo:
    """A bounded table of results of a pure sympy function, keyed by its arguments.

    ``distribute`` is part of the key because it changes what sympy builds. Oldest
    entries go first, so a long-lived process compiling many specs stays bounded.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.table: dict[tuple[object, ...], sp.Expr] = {}

    def get(self, key: tuple[object, ...]) -> sp.Expr | None:
        return self.table.get((*key, bool(global_parameters.distribute)))

    def put(self, key: tuple[object, ...], value: sp.Expr) -> sp.Expr:
        if len(self.table) >= self.size:
            del self.table[next(iter(self.table))]
        self.table[(*key, bool(global_parameters.distribute))] = value
        return value


_LOCAL = _Memo()
_SIMPLIFIED = _Memo()


def local_derivative(body: sp.Expr, wrt: sp.Expr,
                     shape: tuple[sp.Expr, ...] | None = None) -> sp.Expr:
    """``sp.diff(body, wrt)``, remembered: the LaTeX pass asks again for the derivatives
    the engine took (a dense layer's index-notation diff costs tens of milliseconds).

    ``shape`` is the shape of the tensor ``wrt`` is an element of. A body that reads that
    tensor at a constant index on an axis longer than one (attention reads its stacked
    projection at part 0, 1 or 2) depends on it only where the target index equals the
    constant: that delta(c, k) becomes the mask [k = c], which no later step drops (a
    constant index on a size-1 axis is a broadcast, whose delta is 1)."""
    key = (body, wrt, shape)
    found = _LOCAL.get(key)
    if found is not None:
        return found
    out = _derivative(body, wrt)
    if shape is not None and isinstance(wrt, sp.Indexed):
        fixed = {k for k, n in zip(wrt.indices, shape, strict=True) if n != 1}
        out = out.replace(
            lambda e: isinstance(e, sp.KroneckerDelta) and any(a.is_Integer for a in e.args)
            and any(a in fixed for a in e.args),
            lambda e: sp.Piecewise((sp.Integer(1), sp.Eq(*e.args)), (sp.Integer(0), True)))
    return _LOCAL.put(key, out)


def _derivative(body: sp.Expr, wrt: sp.Expr) -> sp.Expr:
    """d body / d wrt, with ``wrt`` one element X[k] of a tensor.

    For an elementwise body (no sum) each reference X[i] is a scalar variable: the
    derivative is sum over the references of (d body / d X[i]) * delta(i, k), taking
    each partial derivative with respect to a plain symbol. That is the same result as
    differentiating with respect to the ``Indexed`` object, without sympy's slow path
    through index-aware differentiation (seconds for a 16-term formula).
    """
    if not isinstance(wrt, sp.Indexed) or body.has(sp.Sum):
        return sp.diff(body, wrt)
    total = sp.Integer(0)
    refs = sorted((r for r in body.atoms(sp.Indexed) if r.base == wrt.base),
                  key=sp.default_sort_key)
    for r in refs:
        u = sp.Dummy("u", real=True)
        partial = sp.diff(body.xreplace({r: u}), u).xreplace({u: r})
        deltas = sp.Mul(*(sp.KroneckerDelta(a, b) for a, b in zip(r.indices, wrt.indices,
                                                                   strict=True)))
        total += partial * deltas
    return total


def vjp(node: Node, operand: Node, adjoint_name: str) -> sp.Expr:
    """dL/d operand[k0, k1, ...] contributed through ``node``, in index notation.

    ``adjoint_name`` names the tensor holding dL/d node (shaped like ``node``).
    """
    assert node.body is not None
    target = tuple(target_index(k) for k in range(operand.rank))
    local = local_derivative(node.body, ref(operand.name, target), operand.shape)
    if local == 0:
        return sp.Integer(0)
    bounds = dict(zip(target, operand.shape, strict=True))
    if local.has(sp.Sum) and local.has(sp.Piecewise):
        # Sum out the body's own deltas first: building the outer sum below runs sympy's
        # piecewise_fold, which would lift a condition on an inner sum's variable (a mask
        # s <= t) out of that sum.
        local = eliminate_deltas(local, bounds)
    out = node.indices()
    g = ref(adjoint_name, out)
    if not out:
        total = eliminate_deltas(sp.Sum(g * local, (sp.Dummy("unit"), 0, 0)), bounds)
    else:
        limits = tuple((i, sp.Integer(0), n - 1)
                       for i, n in zip(out, node.shape, strict=True))
        total = eliminate_deltas(sp.Sum(g * local, *limits), bounds)
    if total.has(sp.Piecewise):
        total = _lift_conditions(_pin_conditions(total, frozenset(bounds)), bounds)
    return total


def _pin_conditions(expr: sp.Expr, targets: frozenset[sp.Symbol]) -> sp.Expr:
    """In a sum of ``Piecewise((delta(k, e) * a, c(x[e])), (0, True))`` (a relu after an
    embedding, differentiated by the table: e = ids[i], summed over i), read the
    condition at the target element k instead of e: the delta makes them equal wherever
    the branch is not zero. The condition then no longer reads the sum's variables, and
    :func:`_lift_conditions` takes it out of the sum."""
    if isinstance(expr, sp.Sum):
        function = _pin_conditions(expr.function, targets)
        summed = {lim[0] for lim in expr.limits}
        pieces = [f for f in sp.Mul.make_args(function) if isinstance(f, sp.Piecewise)]
        if len(pieces) == 1:
            (piece,) = pieces
            pins: dict[sp.Expr, sp.Expr] | None = None
            for value, _ in piece.args:
                if value == 0:
                    continue
                found = {}
                for factor in _pull(value)[0]:
                    if isinstance(factor, sp.KroneckerDelta):
                        a, b = factor.args
                        for k, e in ((a, b), (b, a)):
                            if k in targets and e.free_symbols & summed:
                                found[e] = k
                pins = found if pins is None else {e: k for e, k in pins.items()
                                                   if found.get(e) == k}
            if pins:
                piece_pinned = sp.Piecewise(*((v, c.xreplace(pins)) for v, c in piece.args))
                function = function.xreplace({piece: piece_pinned})
        return sp.Sum(function, *expr.limits)
    if not expr.args or isinstance(expr, sp.Indexed):
        return expr
    return expr.func(*(_pin_conditions(a, targets) for a in expr.args))


def _lift_conditions(expr: sp.Expr, bounds: Mapping[sp.Symbol, sp.Expr]) -> sp.Expr:
    """``Sum(Piecewise((v, c), (0, True)), ...)`` whose condition reads none of the
    sum's variables as ``Piecewise((Sum(v, ...), c), (0, True))``, the sum in the flat
    form eliminate_deltas gives it: a mask on the target element outside the sum it does
    not depend on (what _pin_conditions leaves)."""
    if isinstance(expr, sp.Sum):
        function = _lift_conditions(expr.function, bounds)
        summed = {lim[0] for lim in expr.limits}
        if (isinstance(function, sp.Piecewise) and len(function.args) == 2
                and function.args[1] == (0, sp.true)
                and not function.args[0][1].free_symbols & summed):
            value, cond = function.args[0]
            return sp.Piecewise((eliminate_deltas(sp.Sum(value, *expr.limits), bounds), cond),
                                (0, True))
        return sp.Sum(function, *expr.limits)
    if not expr.args or isinstance(expr, sp.Indexed):
        return expr
    return expr.func(*(_lift_conditions(a, bounds) for a in expr.args))


def _atomize(expr: sp.Expr) -> tuple[sp.Expr, dict[sp.Symbol, sp.Expr]]:
    """Replace tensor references and sums by plain symbols so rational algebra sees atoms."""
    table: dict[sp.Expr, sp.Symbol] = {}

    def atom(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.Indexed | sp.Sum):
            if e not in table:
                table[e] = sp.Symbol(f"_atom{len(table)}", real=True)
            return table[e]
        if not e.args:
            return e
        return e.func(*(atom(a) for a in e.args))

    reduced = atom(expr)
    return reduced, {v: k for k, v in table.items()}


def _cost(expr: sp.Expr) -> int:
    return int(sp.count_ops(expr, visual=False))


def simplify_local(expr: sp.Expr) -> sp.Expr:
    """Rational simplification that never trades a function for another.

    Candidates are the expression itself, ``cancel`` and ``factor(cancel)``; the one with
    the fewest operations wins. Generic ``sympy.simplify`` is avoided on purpose: it may
    rewrite 1 - tanh(x)^2 as 1/cosh(x)^2, which overflows where the original does not.
    Results are remembered: the LaTeX pass simplifies the engine's raw derivatives again.
    """
    found = _SIMPLIFIED.get((expr,))
    return found if found is not None else _SIMPLIFIED.put((expr,), _simplify_local(expr))


# Rational simplification (cancel, factor) of a large expression can take minutes; past
# this many tree nodes the expression is used as derived (exact, just not simplified).
MAX_SIMPLIFY_NODES = 160


def tree_size(expr: sp.Expr, limit: int) -> int:
    """The number of nodes of ``expr``'s tree, counting stops past ``limit``."""
    count = 0
    stack = [expr]
    while stack and count <= limit:
        e = stack.pop()
        count += 1
        if not isinstance(e, sp.Indexed):
            stack.extend(e.args)
    return count


def too_large_to_simplify(expr: sp.Expr) -> bool:
    return tree_size(expr, MAX_SIMPLIFY_NODES) > MAX_SIMPLIFY_NODES


def _simplify_local(expr: sp.Expr) -> sp.Expr:
    if too_large_to_simplify(expr):
        return expr
    candidates: list[sp.Expr] = []
    variants = [expr]
    canonical = canonical_sigmoid(expr)
    if canonical != expr:
        variants.append(canonical)
    for variant in variants:
        reduced, back = _atomize(variant)
        if reduced.has(sp.Piecewise):
            options = [reduced, sp.piecewise_fold(reduced)]
        else:
            options = [reduced]
            try:
                # cancel/factor can explode on a large expression: bounded by the
                # generation budget, past which the unsimplified form is kept.
                options = budget.within(budget.SIMPLIFY_SECONDS,
                                        lambda r=reduced: _rational_forms(r),
                                        lambda r=reduced: [r], "simplify")
            except (sp.PolynomialError, NotImplementedError):  # pragma: no cover
                pass
        candidates += [o.xreplace(back) for o in options]
    return min(candidates, key=lambda c: (_cost(c), candidates.index(c)))


def _rational_forms(reduced: sp.Expr) -> list[sp.Expr]:
    cancelled = sp.cancel(reduced)
    return [sp.factor(cancelled), reduced, cancelled]


def is_index_symbol(expr: sp.Basic) -> bool:
    """An index (``i0``, ``s1``, ``k0``): an integer symbol that is not a dimension (the
    dimensions ``N``, ``T`` are positive)."""
    return isinstance(expr, sp.Symbol) and bool(expr.is_integer) and not expr.is_positive


def canonical(expr: sp.Expr) -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    """``expr`` with its index symbols renamed by order of first appearance, and that order.

    Two elements of one elementwise formula read at different indices
    (``sigmoid(z[i0, i1])`` and ``sigmoid(z[k0, k1])``) get the same canonical form, so a
    forward body is found again in a derivative by one hash lookup instead of by matching
    a wildcard pattern against every subexpression.
    """
    order: list[sp.Symbol] = []
    for node in sp.preorder_traversal(expr):
        # every index symbol, also one compared outside a reference (a mask s <= t)
        if is_index_symbol(node) and node not in order:
            order.append(node)
    mapping = {i: sp.Symbol(f"_c{n}", integer=True) for n, i in enumerate(order)}
    return expr.xreplace(mapping), tuple(order)


class KnownForms:
    """Forward tensors by the canonical form of their bodies: a table that grows as the
    forward pass is walked, and rewrites expressions to read those tensors.

    ``sigmoid(z[k0, k1])`` becomes ``y[k0, k1]`` when ``y[i0, i1] = sigmoid(z[i0, i1])`` is
    computed in the forward pass, so the backward pass reuses it (sigma' = y (1 - y)). A
    body ``log(S)`` also lets ``S`` be read as ``exp(out)`` (logsumexp: the normaliser of a
    softmax is exp(lse), and exp(z)/exp(lse) folds to the stable exp(z - lse)). Each
    subexpression costs one canonicalisation and one lookup, so rewriting is linear in
    the expression's size and independent of how many tensors are known.
    """

    def __init__(self, known: Iterable[Node] = ()) -> None:
        self.table: dict[sp.Expr, tuple[str, tuple[sp.Symbol, ...], bool]] = {}
        self.heads: set[type] = set()
        for node in known:
            self.add(node)

    def add(self, node: Node) -> None:
        """Make ``node`` findable; a later tensor with the same body takes precedence."""
        body = node.body
        if body is None or isinstance(body, sp.Indexed):
            return
        is_log = isinstance(body, sp.log)
        if body.has(sp.Sum) and not is_log:
            return  # a contraction's value is never a subexpression of elementwise code
        forms = [(body, False)] + ([(body.args[0], True)] if is_log else [])
        for form, as_exp in forms:
            key, order = canonical(form)
            position = {i: n for n, i in enumerate(node.indices())}
            # -1 marks an index bound inside the form (a sum's own variable)
            axes = tuple(position.get(i, -1) for i in order)
            if {a for a in axes if a >= 0} != set(range(node.rank)):
                continue  # an output index the form does not mention
            self.table[key] = (node.name, axes, as_exp)
            self.heads.add(type(form))

    def substitute(self, expr: sp.Expr) -> sp.Expr:
        memo: dict[sp.Expr, sp.Expr] = {}

        def visit(e: sp.Expr) -> sp.Expr:
            if not e.args or isinstance(e, sp.Indexed):
                return e
            if e in memo:
                return memo[e]
            found = self._lookup(e) if type(e) in self.heads else None
            if found is None:
                args = tuple(visit(a) for a in e.args)
                found = e.func(*args) if args != e.args else e
            memo[e] = found
            return found

        out = visit(expr) if self.table else expr
        if not out.has(sp.exp):
            return out
        out = sp.powsimp(out, combine="exp")
        # exp(z)/exp(lse) folds to exp(z - lse) only now: a softmax output holds it
        memo.clear()
        return visit(out) if self.table else out

    def _lookup(self, e: sp.Expr) -> sp.Expr | None:
        key, order = canonical(e)
        hit = self.table.get(key)
        if hit is None:
            return None
        name, axes, as_exp = hit
        indices: list[sp.Expr] = [sp.Integer(0)] * (max(axes, default=-1) + 1)
        for symbol, axis in zip(order, axes, strict=True):
            if axis >= 0:
                indices[axis] = symbol
        value = ref(name, tuple(indices))
        return sp.exp(value) if as_exp else value


def substitute_known(expr: sp.Expr, known: Iterable[Node]) -> sp.Expr:
    """Replace forward subexpressions by the tensors that already hold them (the first
    of ``known`` wins where two hold the same); see :class:`KnownForms`."""
    return KnownForms(reversed(list(known))).substitute(expr)


def rename(expr: sp.Expr, mapping: Mapping[sp.Symbol, sp.Expr]) -> sp.Expr:
    return expr.xreplace(dict(mapping))
