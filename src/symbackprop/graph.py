"""The tensor DAG: nodes with symbolic shapes, each op defined in index notation.

Every op node carries a *body*: a sympy expression giving one element of its output,
``out[i0, i1, ...] = body``, over ``Indexed`` references to its operands. Output axes
use the index symbols ``i0, i1, ...``; contractions and reductions appear as sympy
``Sum`` objects over ``s0, s1, ...``. A dense layer is therefore
``z[i0, i1] = Sum(x[i0, s0] * W[i1, s0], (s0, 0, F - 1)) + b[i1]`` and a mean-squared
error is ``Sum((y[s0, s1] - t[s0, s1])**2, ...) / (N * C)``. Elementwise ops have no
``Sum``; broadcasting is an operand indexed by fewer output indices.

Tensors are float (the parameters' dtype) or ``int64`` (``Node.dtype``): integer
tensors are ids and class labels, read only as indices (``E[ids[i0, i1], i2]``) or in
comparisons, never differentiated and never cast. What their values may be (ids below
an embedding's ``num``) and how large a symbolic dimension may grow (``dims: {T: {max}}``,
a position table's ``max_len``) are recorded here (:meth:`Graph.bound_ids`,
:meth:`Graph.bound_dim`) for the generated modules' run-time checks.

This module owns node storage, shape bookkeeping and topological order; layers build
nodes through :class:`Graph`, and the derive/backprop/lower passes read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import sympy as sp
from sympy.concrete.expr_with_limits import ExprWithLimits

from .errors import GraphError
from .spec import Where

# A "mask" is a random leaf the generated module draws itself (dropout): never an
# argument of the user's, never differentiated.
Role = Literal["input", "target", "param", "op", "mask"]
DType = Literal["float", "int64"]
Kind = Literal["map", "contraction", "reduction"]


def out_index(k: int) -> sp.Symbol:
    return sp.Symbol(f"i{k}", integer=True)


def sum_index(k: int) -> sp.Symbol:
    return sp.Symbol(f"s{k}", integer=True)


def target_index(k: int) -> sp.Symbol:
    return sp.Symbol(f"k{k}", integer=True)


def dim_symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, integer=True, positive=True)


def ref(name: str, indices: tuple[sp.Expr, ...]) -> sp.Expr:
    """One element of tensor ``name``; a 0-d tensor is a plain symbol."""
    if not indices:
        return sp.Symbol(name, real=True)
    return sp.IndexedBase(name, real=True)[indices]


def ref_name(expr: sp.Expr) -> str | None:
    """The tensor a reference points at, or None when ``expr`` is no tensor reference."""
    if isinstance(expr, sp.Indexed):
        return str(expr.base.label)
    if isinstance(expr, sp.Symbol) and expr.is_real and not expr.is_integer:
        return expr.name
    return None


@dataclass(frozen=True)
class IdBound:
    """The values an integer tensor may hold: ``0 <= id < high``, or ``ignore`` (a class
    target's ignore_index); ``reason`` says who asks (for the run-time error)."""

    high: int
    reason: str
    ignore: int | None = None


@dataclass(frozen=True)
class DimLimit:
    """A symbolic dimension's largest allowed size and why (for the run-time error)."""

    max: int
    reason: str


class MaxOver(ExprWithLimits):
    """``MaxOver(f, (r, 0, n - 1))``: the maximum of ``f`` over ``r``, bound like a ``Sum``.

    It carries no derivative (zero, like a detached tensor): a ``max`` written in a
    formula is differentiated through the ties ``[f == MaxOver(f)]`` it is compared with
    (``layers/reductions.py``), never through this node. Lowered to a max reduction.
    """

    def _eval_derivative(self, symbol: sp.Basic) -> sp.Expr:
        return sp.Integer(0)


class ArgMaxOver(ExprWithLimits):
    """``ArgMaxOver(x[n, c, s*i + a, s*j + b], (a, 0, k - 1), (b, 0, k - 1))``: where the
    first maximum of each window lies (row-major over the window, as torch's max pooling
    picks it), as the flat row-major position ``h * W + w`` of the element in the array's
    last axes. An integer tensor: no derivative. Only whole windows over the trailing
    axes (a max pooling) are lowered, to the pooling's indices.
    """

    def _eval_derivative(self, symbol: sp.Basic) -> sp.Expr:
        return sp.Integer(0)


@dataclass
class Node:
    """One tensor of the network: an input, a target, a parameter, or an op's output."""

    name: str
    shape: tuple[sp.Expr, ...]
    role: Role
    layer: str
    where: Where
    body: sp.Expr | None = None
    operands: tuple[str, ...] = ()
    kind: Kind = "map"
    label: str = ""
    param: str | None = None
    trainable: bool = False
    init: tuple[str, float] = ("zeros", 0.0)
    meta: dict[str, object] = field(default_factory=dict)
    dtype: DType = "float"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def indices(self) -> tuple[sp.Symbol, ...]:
        return tuple(out_index(k) for k in range(self.rank))

    def element(self, indices: tuple[sp.Expr, ...] | None = None) -> sp.Expr:
        return ref(self.name, self.indices() if indices is None else indices)


class Graph:
    """Nodes in insertion order (which is a topological order: operands come first)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: dict[str, Node] = {}
        self.dims: dict[str, sp.Symbol] = {}
        self.loss: str = ""
        self.prediction: str = ""
        self.layer_outputs: dict[str, str] = {}
        # Run-time checks of integer tensors and bounded dimensions (tightest bound kept).
        self.id_bounds: dict[str, IdBound] = {}
        self.dim_limits: dict[str, DimLimit] = {}
        self.declared_max: dict[str, int] = {}  # dims: {T: {max: 64}} as the spec says
        self._reductions = 0

    def reduction_index(self) -> sp.Symbol:
        """A summation index that no other op of this graph uses (``r1``, ``r2``, ...),
        for a reduction written in a formula: nested or fused reductions never share
        a bound index."""
        self._reductions += 1
        return sp.Symbol(f"r{self._reductions}", integer=True)

    def dim(self, value: int | str) -> sp.Expr:
        if isinstance(value, int):
            return sp.Integer(value)
        sym = self.dims.setdefault(value, dim_symbol(value))
        return sym

    def bound_ids(self, node: Node, high: int, reason: str, ignore: int | None = None) -> None:
        """Integer tensor ``node`` must hold ids in [0, high) (or ``ignore``)."""
        known = self.id_bounds.get(node.name)
        if known is None or high < known.high:
            self.id_bounds[node.name] = IdBound(high, reason, ignore)

    def bound_dim(self, dim: sp.Expr, limit: int, reason: str) -> None:
        """Symbolic dimension ``dim`` may be at most ``limit`` at run time."""
        if not dim.is_Symbol:
            return
        known = self.dim_limits.get(dim.name)
        if known is None or limit < known.max:
            self.dim_limits[dim.name] = DimLimit(limit, reason)

    def add(self, node: Node) -> Node:
        if node.name in self.nodes:
            raise node.where.error(f"{node.name!r} names two tensors of the network", GraphError)
        for operand in node.operands:
            if operand not in self.nodes:  # pragma: no cover - layers resolve names first
                raise node.where.error(f"unknown tensor {operand!r}", GraphError)
        self.nodes[node.name] = node
        return node

    def op(self, name: str, shape: tuple[sp.Expr, ...], body: sp.Expr, *, layer: str,
           where: Where, kind: Kind = "map", label: str = "") -> Node:
        operands = sorted({n for n in (ref_name(a) for a in _refs(body)) if n is not None},
                          key=list(self.nodes).index)
        return self.add(Node(name, shape, "op", layer, where, body, tuple(operands), kind, label))

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in self.nodes}
        for node in self.nodes.values():
            for operand in node.operands:
                out[operand].append(node.name)
        return out

    def params(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == "param"]

    def extent(self, node: str, axis: int) -> sp.Expr:
        return self.nodes[node].shape[axis]


def _refs(expr: sp.Expr) -> list[sp.Expr]:
    found: list[sp.Expr] = list(expr.atoms(sp.Indexed))
    found += [s for s in expr.free_symbols if ref_name(s) is not None
              and not isinstance(s, sp.Indexed)]
    # Symbols inside Indexed (the IndexedBase label) are not free symbols of the expr,
    # but the index symbols are; ref_name filters those out via the is_real check.
    return found
