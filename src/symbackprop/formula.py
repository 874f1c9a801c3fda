"""User formulas: parsed with ``ast`` against a whitelist, built into sympy directly.

A formula is spec text, and spec text may come from anyone, so nothing here evaluates
it: no ``eval``, ``exec``, ``sympify`` or ``parse_expr`` (they all call ``eval``). The
grammar is numbers, the declared variable names, ``+ - * / **``, unary minus, comparisons
inside ``where``, the function table :data:`FUNCTIONS` and the reductions
:data:`REDUCTIONS` (``sum(x, axis=-1)``, ``mean``, ``max``, ``logsumexp``, whose ``axis``
is a constant integer or list of integers). Length, nesting depth, number size and
constant exponents are capped so that no formula can make sympy hang.

A reduction keeps the reduced axes as size-1 axes (numpy's ``keepdims=True``), so its
result broadcasts back against the formula: ``x - mean(x, axis=-1)``. Axes count over the
formula's own shape (the broadcast of its variables); an axis a reduction's argument does
not span (size 1 there) is left as it is. Who builds the formula says what a reduction
becomes (:data:`Reducer`): layers make each one an op of its own in index notation.

The same parsed tree can also be evaluated with torch ops (:func:`torch_eval`); that is
how the independent autograd oracle computes a custom formula without sympy.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sympy as sp

from .derive.functions import PRIMITIVES, Softplus

MAX_LENGTH = 500
MAX_DEPTH = 24
MAX_NODES = 200
MAX_EXPONENT = 16
MAX_NUMBER = 1e6
# Nested constant exponents multiply: ((x**16)**16)**16 is x**4096. Their product is
# capped like a single exponent, so parentheses cannot build a tower.
MAX_TOTAL_EXPONENT = 64
MAX_FLOAT = 1.7976931348623157e308


class FormulaProblem(Exception):
    """A formula outside the grammar; ``col`` is the 1-based column inside the formula."""

    def __init__(self, message: str, col: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.col = col


def _relu_like_max(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    # At a tie the derivative is the second argument's (max(x, 0) behaves like relu).
    return sp.Piecewise((a, a > b), (b, True))


def _min(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    return sp.Piecewise((a, a < b), (b, True))


def _abs(a: sp.Expr) -> sp.Expr:
    # abs'(0) = 0, as torch.abs.
    return sp.Piecewise((a, a > 0), (-a, a < 0), (sp.Integer(0), True))


def _where(cond: sp.Expr, a: sp.Expr, b: sp.Expr) -> sp.Expr:
    return sp.Piecewise((a, cond), (b, True))


@dataclass(frozen=True)
class Function:
    arity: int
    build: Callable[..., sp.Expr]
    torch: Callable[..., Any]  # the oracle's version: (torch module, *tensors) -> tensor
    doc: str


# Every scalar primitive marked ``formula`` (derive/functions.py), then the compositions
# that are not one primitive.
FUNCTIONS: Mapping[str, Function] = {
    **{p.name: Function(p.arity, p.func, p.oracle, p.doc) for p in PRIMITIVES if p.formula},
    "sqrt": Function(1, sp.sqrt, lambda t, a: t.sqrt(a), "square root"),
    "logsigmoid": Function(1, lambda a: -Softplus(-a),
                           lambda t, a: t.nn.functional.logsigmoid(a), "log(sigmoid(x))"),
    "abs": Function(1, _abs, lambda t, a: t.abs(a), "|x|, derivative 0 at 0"),
    "max": Function(2, _relu_like_max, lambda t, a, b: t.where(a > b, a, b),
                    "larger argument; at a tie the derivative follows the second"),
    "min": Function(2, _min, lambda t, a, b: t.where(a < b, a, b),
                    "smaller argument; at a tie the derivative follows the second"),
    "where": Function(3, _where, lambda t, c, a, b: t.where(c, a, b),
                      "where(condition, a, b): a where the comparison holds, else b"),
}
CONSTANTS: Mapping[str, sp.Expr] = {"pi": sp.pi, "e": sp.E}

# Reductions over axes, called with one argument and ``axis=``. ``max`` with two
# positional arguments stays the elementwise maximum above.
REDUCTIONS: Mapping[str, str] = {
    "sum": "sum over the axes",
    "mean": "mean over the axes",
    "max": "maximum over the axes; the gradient is shared evenly between tied maxima "
           "(as torch.amax)",
    "logsumexp": "log(sum(exp(x))) over the axes, computed max-shifted",
}
MAX_AXES = 8
# (kind, argument, axes as written or None for all, column of the call) -> the value
Reducer = Callable[[str, sp.Expr, tuple[int, ...] | None, int], sp.Expr]


def is_reduction(node: ast.AST) -> bool:
    """A call of a reduction (``sum(x, axis=...)``, ``sum(x)``; ``max`` with one
    argument, else it is the elementwise maximum of two)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in REDUCTIONS
            and (node.func.id not in FUNCTIONS or bool(node.keywords)
                 or len(node.args) == 1))


def reduction_axes(node: ast.Call) -> tuple[int, ...] | None:
    """The constant axes of a checked reduction call, as written (negative allowed);
    None without ``axis=``: every axis."""
    if not node.keywords:
        return None
    value = node.keywords[0].value
    items = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
    axes = []
    for item in items:
        axis = _constant_value(item)
        assert axis is not None
        axes.append(int(axis))
    return tuple(axes)


def _check_reduction(node: ast.Call) -> None:
    col = node.col_offset + 1
    name = node.func.id  # type: ignore[attr-defined]
    if len(node.args) != 1 or len(node.keywords) > 1 or any(
            k.arg != "axis" for k in node.keywords):
        raise FormulaProblem(f"{name}() takes one argument and optionally axis=, as "
                             f"{name}(x, axis=-1)", col)
    if not node.keywords:
        return
    value = node.keywords[0].value
    items = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
    if not items:
        raise FormulaProblem(f"{name}(): axis is an integer or a non-empty list of integers",
                             col)
    if len(items) > MAX_AXES:
        raise FormulaProblem(f"{name}(): more than {MAX_AXES} axes", col)
    for item in items:
        inner = item.operand if isinstance(item, ast.UnaryOp) and isinstance(
            item.op, ast.USub) else item
        if not (isinstance(inner, ast.Constant) and type(inner.value) is int
                and abs(inner.value) <= MAX_AXES):
            raise FormulaProblem(f"{name}(): axis must be a constant integer (or a list "
                                 f"of them) between {-MAX_AXES} and {MAX_AXES}",
                                 getattr(item, "col_offset", node.col_offset) + 1)


def normalise_axes(axes: tuple[int, ...], rank: int, col: int) -> tuple[int, ...]:
    """Axes as written -> 0..rank-1, refusing any out of range or named twice."""
    out: list[int] = []
    for axis in axes:
        b = axis + rank if axis < 0 else axis
        if not 0 <= b < rank:
            raise FormulaProblem(f"axis {axis} is out of range: the formula has {rank} "
                                 f"ax{'is' if rank == 1 else 'es'} ({-rank}..{rank - 1})",
                                 col)
        if b in out:
            raise FormulaProblem(f"axis {axis} is named twice", col)
        out.append(b)
    return tuple(out)


def _unchecked_reducer(kind: str, arg: sp.Expr, axes: tuple[int, ...] | None,
                       col: int) -> sp.Expr:
    # Used only to look at the constants of a formula: a reduction keeps its argument's
    # numbers (a sum multiplies them by a size, which is checked where it is known).
    return arg


def _no_reducer(kind: str, arg: sp.Expr, axes: tuple[int, ...] | None, col: int) -> sp.Expr:
    raise FormulaProblem(f"{kind}(..., axis=) is not available in this formula", col)


def dotted_name(node: ast.AST) -> str | None:
    """``fc1.weight`` (an attribute chain of plain names) as one string, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not parts:
        return None
    return ".".join([node.id, *reversed(parts)])


class AnyParameter(dict):  # type: ignore[type-arg]
    """Formula variables that also admit every dotted name (``fc1.weight``): a loss
    formula is checked when the spec is read, before the parameters exist; the names
    are checked against the network's parameters when the graph is built."""

    def __contains__(self, key: object) -> bool:
        return (isinstance(key, str) and "." in key) or super().__contains__(key)

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_COMPARE = {ast.Gt: sp.StrictGreaterThan, ast.Lt: sp.StrictLessThan,
            ast.GtE: sp.GreaterThan, ast.LtE: sp.LessThan}


def parse_tree(text: object, variables: Mapping[str, object]) -> ast.expr:
    """Parse and validate ``text``; return the checked expression tree."""
    if not isinstance(text, str):
        raise FormulaProblem("a formula is a string")
    if not text.strip():
        raise FormulaProblem("the formula is empty")
    if len(text) > MAX_LENGTH:
        raise FormulaProblem(f"the formula is longer than {MAX_LENGTH} characters")
    if not text.isascii() or any(ch in text for ch in "\n\r\t\x00"):
        raise FormulaProblem("a formula is one line of ASCII text")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaProblem(f"not a formula: {exc.msg}", exc.offset or 1) from None
    except (ValueError, RecursionError, MemoryError):
        raise FormulaProblem("not a formula") from None
    count = 0

    def check(node: ast.AST, depth: int) -> None:
        nonlocal count
        count += 1
        col = getattr(node, "col_offset", 0) + 1
        if depth > MAX_DEPTH:
            raise FormulaProblem(f"the formula nests deeper than {MAX_DEPTH} levels", col)
        if count > MAX_NODES:
            raise FormulaProblem(f"the formula has more than {MAX_NODES} parts", col)
        if isinstance(node, ast.Expression):
            check(node.body, depth + 1)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise FormulaProblem(f"only numbers are allowed, not {node.value!r}", col)
            if abs(node.value) > MAX_NUMBER:
                raise FormulaProblem(f"number {node.value!r} is larger than {MAX_NUMBER:g}", col)
        elif isinstance(node, ast.Name):
            if node.id not in variables and node.id not in CONSTANTS:
                known = ", ".join(sorted(variables)) or "none"
                raise FormulaProblem(f"unknown name {node.id!r} (variables: {known})", col)
        elif isinstance(node, ast.Attribute):
            dotted = dotted_name(node)
            if dotted is None or dotted not in variables:
                if dotted is not None and any("." in v for v in variables):
                    known = ", ".join(sorted(v for v in variables if "." in v))
                    raise FormulaProblem(f"unknown parameter {dotted!r} (parameters: "
                                         f"{known})", col)
                raise FormulaProblem("Attribute is not allowed in a formula", col)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise FormulaProblem(f"operator {type(node.op).__name__} is not allowed", col)
            if isinstance(node.op, ast.Pow) and not _mentions_variable(node.right, variables):
                # A constant exponent must be a plain number: 2**(16**16) would make sympy
                # compute a gigantic integer.
                exponent = _constant_value(node.right)
                if exponent is None:
                    raise FormulaProblem("a constant exponent must be a plain number", col)
                if abs(exponent) > MAX_EXPONENT:
                    raise FormulaProblem(f"exponent {exponent:g} is larger than "
                                         f"{MAX_EXPONENT}", col)
            check(node.left, depth + 1)
            check(node.right, depth + 1)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub | ast.UAdd):
                raise FormulaProblem(f"operator {type(node.op).__name__} is not allowed", col)
            check(node.operand, depth + 1)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise FormulaProblem("only the listed functions may be called, by plain name",
                                     col)
            if is_reduction(node):
                _check_reduction(node)
                count += 1  # the axis
                check(node.args[0], depth + 1)
                return
            if node.func.id not in FUNCTIONS:
                name = node.func.id
                raise FormulaProblem(f"unknown function {name!r} (allowed: "
                                     f"{', '.join(sorted({*FUNCTIONS, *REDUCTIONS}))})", col)
            fn = FUNCTIONS[node.func.id]
            if node.keywords or len(node.args) != fn.arity:
                also = (", or one and axis= to reduce" if node.func.id in REDUCTIONS
                        else "")
                raise FormulaProblem(f"{node.func.id}() takes {fn.arity} argument(s){also}",
                                     col)
            for i, arg in enumerate(node.args):
                if node.func.id == "where" and i == 0:
                    if not isinstance(arg, ast.Compare):
                        raise FormulaProblem("where() needs a comparison first", col)
                    check_compare(arg, depth + 1)
                else:
                    check(arg, depth + 1)
        elif isinstance(node, ast.Compare):
            raise FormulaProblem("comparisons are only allowed as where()'s condition", col)
        else:
            raise FormulaProblem(f"{type(node).__name__} is not allowed in a formula", col)

    def check_compare(node: ast.Compare, depth: int) -> None:
        col = node.col_offset + 1
        if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
            raise FormulaProblem("use one of < > <= >= in where()", col)
        check(node.left, depth + 1)
        check(node.comparators[0], depth + 1)

    check(tree, 0)
    _check_values(tree.body, variables)
    return tree.body


_REAL_FUNCTIONS: Mapping[str, Callable[..., float]] = {
    "exp": math.exp, "log": math.log, "log1p": math.log1p, "sqrt": math.sqrt,
    "sin": math.sin, "cos": math.cos, "tanh": math.tanh, "cosh": math.cosh, "erf": math.erf,
    "sigmoid": lambda a: 1.0 / (1.0 + math.exp(-a)) if a >= 0 else
    math.exp(a) / (1.0 + math.exp(a)),
    "softplus": lambda a: max(a, 0.0) + math.log1p(math.exp(-abs(a))),
    "logsigmoid": lambda a: -(max(-a, 0.0) + math.log1p(math.exp(-abs(a)))),
    "abs": abs, "max": lambda a, b: a if a > b else b, "min": lambda a, b: a if a < b else b,
}
def _real_function(name: str) -> Callable[..., float]:
    """How a constant call is evaluated: the table above, else the primitive's record
    (its high-precision reference), so every function a formula may call is covered."""
    if name in _REAL_FUNCTIONS:
        return _REAL_FUNCTIONS[name]
    record = next(p for p in PRIMITIVES if p.name == name)
    return lambda *args: float(record.reference(*args))


_REAL_COMPARE = {ast.Gt: operator.gt, ast.Lt: operator.lt, ast.GtE: operator.ge,
                 ast.LtE: operator.le}


def _check_values(tree: ast.expr, variables: Mapping[str, object]) -> None:
    """Refuse constants that are not finite real numbers, and exponent towers.

    Every part of the formula without a variable is evaluated in float64 (``log(0)``,
    ``0/0``, ``sqrt(-1)``, ``exp(710)`` or a product past 1.8e308 is refused where it is
    written); constant exponents that nest multiply, and their product is capped; an
    exponent that mentions a variable may not contain another such exponent (``x**x**x``
    grows the derivative exponentially). Then the sympy expression is built once and
    must hold only finite real numbers (sympy combines ``x*1e300*1e300`` itself).
    """

    def fold(node: ast.AST) -> tuple[float | None, int, bool]:
        """(constant value or None, product of nested exponents, has a variable exponent)"""
        col = getattr(node, "col_offset", 0) + 1
        try:
            value, degree, var_exp = _fold_node(node)
        except (ArithmeticError, ValueError, TypeError):
            raise FormulaProblem("this part is not a finite real number", col) from None
        if value is not None and (isinstance(value, complex) or not
                                  math.isfinite(value) or abs(value) > MAX_FLOAT):
            raise FormulaProblem("this part is not a finite real number", col)
        return value, degree, var_exp

    def _fold_node(node: ast.AST) -> tuple[float | None, int, bool]:
        if isinstance(node, ast.Constant):
            return float(node.value), 0, False
        if isinstance(node, ast.Name):
            if node.id in variables:
                return None, 1, False
            return {"pi": math.pi, "e": math.e}[node.id], 0, False
        if isinstance(node, ast.Attribute):  # a parameter (parse_tree checked the name)
            return None, 1, False
        if isinstance(node, ast.UnaryOp):
            value, degree, var_exp = fold(node.operand)
            return (None if value is None else
                    -value if isinstance(node.op, ast.USub) else value), degree, var_exp
        if isinstance(node, ast.BinOp):
            left, ldeg, lvar = fold(node.left)
            right, rdeg, rvar = fold(node.right)
            op = _BINARY[type(node.op)]
            if op == "**":
                if right is None:
                    if rvar or lvar:
                        raise FormulaProblem("an exponent that mentions a variable may not "
                                             "contain another one", node.col_offset + 1)
                    return None, max(ldeg, 1), True
                if left is None:
                    degree = ldeg * max(1, math.ceil(abs(right)))
                    if degree > MAX_TOTAL_EXPONENT:
                        raise FormulaProblem(f"nested exponents multiply to {degree}, more "
                                             f"than {MAX_TOTAL_EXPONENT}",
                                             node.col_offset + 1)
                    return None, degree, lvar
                if left == 0 and right < 0:
                    raise ZeroDivisionError
                return left ** right, 0, False
            if op == "/" and right == 0:
                raise ZeroDivisionError
            if left is None or right is None:
                return None, max(ldeg, rdeg), lvar or rvar
            return _APPLY[op](left, right), 0, False
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            name = node.func.id
            if is_reduction(node):
                value, degree, var_exp = fold(node.args[0])
                if value is not None:
                    raise FormulaProblem(f"{name}() of a constant: reduce an expression of "
                                         "the variables", node.col_offset + 1)
                return None, degree, var_exp
            if name == "where":
                cond = node.args[0]
                assert isinstance(cond, ast.Compare)
                a, adeg, avar = fold(cond.left)
                b, bdeg, bvar = fold(cond.comparators[0])
                p, pdeg, pvar = fold(node.args[1])
                q, qdeg, qvar = fold(node.args[2])
                has_var = avar or bvar or pvar or qvar
                if a is not None and b is not None and p is not None and q is not None:
                    return (p if _REAL_COMPARE[type(cond.ops[0])](a, b) else q), 0, False
                return None, max(adeg, bdeg, pdeg, qdeg, 1), has_var
            folded = [fold(arg) for arg in node.args]
            has_var = any(f[2] for f in folded)
            if all(f[0] is not None for f in folded):
                return float(_real_function(name)(*(f[0] for f in folded))), 0, False
            return None, max(1, *(f[1] for f in folded)), has_var
        raise AssertionError(type(node))  # pragma: no cover - parse_tree rejects these

    fold(tree)
    names = set(variables) | {d for d in map(dotted_name, ast.walk(tree)) if d is not None}
    symbols = {name: sp.Symbol(name, real=True) for name in names}
    expr = to_sympy(tree, symbols, _unchecked_reducer)
    for atom in expr.atoms(sp.Number):
        try:
            bad = (atom.is_finite is False or atom.is_real is False or atom is sp.nan
                   or abs(float(atom)) > MAX_FLOAT)
        except (OverflowError, TypeError):  # an integer past float range
            bad = True
        if bad:
            text = str(atom) if len(str(atom)) <= 40 else str(sp.Float(atom, 4))
            raise FormulaProblem(f"the formula simplifies to a constant {text} that is not "
                                 "a finite real number")
    if expr.has(sp.I, sp.zoo, sp.oo, sp.nan):
        raise FormulaProblem("the formula is not a finite real expression (it has a "
                             "division by zero, an infinity or an imaginary part)")


def _mentions_variable(node: ast.AST, variables: Mapping[str, object]) -> bool:
    return any((isinstance(n, ast.Name) and n.id in variables)
               or (isinstance(n, ast.Attribute) and dotted_name(n) in variables)
               for n in ast.walk(node))


def parse_at(where: Any, text: object, variables: Mapping[str, object]) -> ast.expr:
    """:func:`parse_tree`, reporting problems as a located :class:`FormulaError`."""
    from .errors import FormulaError

    try:
        return parse_tree(text, variables)
    except FormulaProblem as problem:
        raise where.error(f"{problem.message} (formula column {problem.col})",
                          FormulaError) from None


def _constant_value(node: ast.AST) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _constant_value(node.operand)
        return -inner if inner is not None else None
    return None


def _number(value: int | float) -> sp.Expr:
    return sp.Integer(value) if isinstance(value, int) else sp.Float(repr(value))


_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
          "**": operator.pow}


def _walk(tree: ast.expr, name: Callable[[str], Any], number: Callable[[int | float], Any],
          compare: Callable[[type, Any, Any], Any], call: Callable[[str, list[Any]], Any],
          reduce: Callable[[str, Any, tuple[int, ...] | None, int], Any]) -> Any:
    """Interpret a checked tree; the callbacks say what names, numbers, comparisons,
    calls and reductions mean (sympy objects for the engine, torch tensors for the
    oracle)."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return number(node.value)
        if isinstance(node, ast.Name):
            return name(node.id)
        if isinstance(node, ast.Attribute):
            dotted = dotted_name(node)
            assert dotted is not None
            return name(dotted)
        if isinstance(node, ast.UnaryOp):
            inner = ev(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp):
            return _APPLY[_BINARY[type(node.op)]](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare):
            return compare(type(node.ops[0]), ev(node.left), ev(node.comparators[0]))
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            if is_reduction(node):
                return reduce(node.func.id, ev(node.args[0]), reduction_axes(node),
                              node.col_offset + 1)
            return call(node.func.id, [ev(a) for a in node.args])
        raise AssertionError(type(node))  # pragma: no cover - parse_tree rejects these

    return ev(tree)


def to_sympy(tree: ast.expr, variables: Mapping[str, sp.Expr],
             reduce: Reducer = _no_reducer) -> sp.Expr:
    """Build the sympy expression of a checked tree (no evaluation of text); ``reduce``
    builds each reduction (a formula without one needs none). A reducer may raise
    :class:`FormulaProblem` (an axis out of range)."""
    return _walk(
        tree,
        name=lambda n: variables[n] if n in variables else CONSTANTS[n],
        number=_number,
        compare=lambda op, a, b: _COMPARE[op](a, b),
        call=lambda f, args: FUNCTIONS[f].build(*args),
        reduce=reduce)


def to_sympy_at(where: Any, tree: ast.expr, variables: Mapping[str, sp.Expr],
                reduce: Reducer = _no_reducer) -> sp.Expr:
    """:func:`to_sympy`, reporting a reduction's problem as a located error."""
    from .errors import FormulaError

    try:
        return to_sympy(tree, variables, reduce)
    except FormulaProblem as problem:
        raise where.error(f"{problem.message} (formula column {problem.col})",
                          FormulaError) from None


def parse(text: object, variables: Mapping[str, sp.Expr]) -> sp.Expr:
    return to_sympy(parse_tree(text, variables), variables)


def broadcast_back(value: Any, *inputs: Any) -> Any:
    """A formula's torch value at its inputs' shape, as the modules compute it: a
    reduction over an axis (``x - mean(x, axis=-1)``, ``sum(x, axis=-1)``) broadcasts
    back."""
    import torch

    return value.expand(torch.broadcast_shapes(value.shape, *(i.shape for i in inputs)))


def torch_eval(tree: ast.expr, variables: Mapping[str, Any], rank: int | None = None) -> Any:
    """Evaluate a checked tree with torch ops, for the autograd oracle. ``rank``: the
    formula's rank, which reduction axes count in (default: the variables' largest)."""
    import math

    import torch

    if rank is None:
        rank = max((v.ndim for k, v in variables.items()
                    if isinstance(v, torch.Tensor) and "." not in k), default=0)

    def reduce(kind: str, arg: Any, axes: tuple[int, ...] | None, col: int) -> Any:
        # torch's own reductions with keepdim, over the axes the argument spans
        if axes is None:  # every axis, to a scalar
            return {"sum": torch.sum, "mean": torch.mean, "max": torch.amax,
                    "logsumexp": lambda a: torch.logsumexp(a.reshape(-1), 0)}[kind](arg)
        dims = [b - rank + arg.ndim for b in normalise_axes(axes, rank, col)]
        dims = [d for d in dims if d >= 0 and arg.shape[d] != 1]
        if not dims:
            return arg
        if kind == "sum":
            return arg.sum(dim=dims, keepdim=True)
        if kind == "mean":
            return arg.mean(dim=dims, keepdim=True)
        if kind == "max":
            return arg.amax(dim=dims, keepdim=True)
        return torch.logsumexp(arg, dim=dims, keepdim=True)

    # A number among a call's arguments becomes a tensor of the formula's floating dtype
    # (of its first floating variable): shaped like a floating argument where the call
    # has one, else like any tensor argument. A where()'s condition is boolean, and a
    # number shaped after it in its dtype would be True.
    floats = [v for v in variables.values()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.get_default_dtype()

    def call(f: str, args: list[Any]) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        like = next((a for a in tensors if a.is_floating_point()), None)
        if like is None and tensors:
            like = tensors[0]
        args = [a if isinstance(a, torch.Tensor) or like is None
                else torch.full_like(like, a, dtype=dtype) for a in args]
        return FUNCTIONS[f].torch(torch, *args)

    return _walk(
        tree,
        name=lambda n: variables[n] if n in variables else {"pi": math.pi, "e": math.e}[n],
        number=float,
        compare=lambda op, a, b: {ast.Gt: operator.gt, ast.Lt: operator.lt,
                                  ast.GtE: operator.ge, ast.LtE: operator.le}[op](a, b),
        call=call, reduce=reduce)
