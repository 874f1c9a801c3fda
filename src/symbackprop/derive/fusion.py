"""Elementwise fusion: substitute single-use elementwise ops into their consumer.

Fusing before differentiating lets sympy simplify across layer boundaries: the loss
``mean(bce(sigmoid(z), t))`` becomes one expression whose derivative in z cancels to
``sigmoid(z) - t``. A producer is fused when it is elementwise (no ``Sum``), has exactly
one consumer, and that consumer is not a contraction (a dense layer's input stays a
tensor, so its backward pass reads as the delta recursion delta1 = (delta2 W2) * f'(z1)),
and the fused body stays within a size budget (:func:`within_budget`). A producer with
branches (a relu) is not fused where its consumer reads it inside a sum: sympy's
piecewise_fold would lift the branch condition out of the sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy as sp

from ..graph import Graph, Node, ref_name


@dataclass
class Fused:
    """The gradient DAG after fusion.

    ``nodes``: the op nodes that remain, in topological order, with fused bodies;
    ``absorbed``: for each remaining node, the names of the ops fused into it;
    ``raw``: for each remaining node, its body before fusion (for the derivation text);
    ``inlined``: for every op, its body with its own producers inlined, including ops that
    were then fused away (the prediction is computed even when fused into the loss).
    """

    nodes: dict[str, Node]
    absorbed: dict[str, list[str]]
    raw: dict[str, sp.Expr]
    inlined: dict[str, sp.Expr]


# A fused body stays small enough that differentiating and simplifying it has a bounded
# cost: chains of activations (tanh(tanh(...))) or formulas that repeat their input
# (sin(p)*cos(p) + p, chained) would otherwise grow without bound, and the derivative
# of a nested chain grows with the square of its depth. Past the budget the producer is
# kept as a tensor, and its derivative reads its output (tanh' = 1 - y^2): linear cost.
MAX_FUSED_NODES = 64
MAX_FUSED_DEPTH = 3


def within_budget(body: sp.Expr) -> bool:
    """At most MAX_FUSED_NODES tree nodes and MAX_FUSED_DEPTH nested functions."""
    count = 0
    stack: list[tuple[sp.Expr, int]] = [(body, 0)]
    while stack:
        expr, depth = stack.pop()
        count += 1
        if count > MAX_FUSED_NODES:
            return False
        if isinstance(expr, sp.Indexed):
            continue
        if isinstance(expr, sp.Function):
            depth += 1
            if depth > MAX_FUSED_DEPTH:
                return False
        stack.extend((arg, depth) for arg in expr.args)
    return True


# A chain of elementwise layers fuses into one expression at most this many ops long:
# the cross-layer simplifications fusion is for (sigmoid + bce -> y - t) need two or
# three, and cancel/factor of a fused derivative grows exponentially with the chain.
# (The node budget above also bounds the nesting depth, so sympy's recursive algorithms
# never meet a deep fused tree: 200 chained layers stay within Python's stack.)
MAX_FUSED_OPS = 3


def inline(body: sp.Expr, producer: Node) -> sp.Expr:
    """Replace every reference to ``producer`` in ``body`` by producer's own body."""
    assert producer.body is not None
    if producer.rank == 0:
        return body.xreplace({sp.Symbol(producer.name, real=True): producer.body})

    def is_ref(e: sp.Expr) -> bool:
        return isinstance(e, sp.Indexed) and ref_name(e) == producer.name

    def expand(e: sp.Indexed) -> sp.Expr:
        return producer.body.xreplace(dict(zip(producer.indices(), e.indices, strict=True)))

    return body.replace(is_ref, expand)


def _read_in_a_sum(body: sp.Expr, name: str) -> bool:
    """Whether ``body`` reads tensor ``name`` inside a sum."""
    return any(ref_name(r) == name for total in body.atoms(sp.Sum)
               for r in total.atoms(sp.Indexed))


def fuse(graph: Graph, prepare: Callable[[str, sp.Expr], sp.Expr] | None = None) -> Fused:
    """Fuse single-use elementwise producers; ``prepare`` rewrites each body first."""
    consumers = graph.consumers()
    inlined: dict[str, sp.Expr] = {}
    nodes: dict[str, Node] = {}
    absorbed: dict[str, list[str]] = {}
    raw: dict[str, sp.Expr] = {}
    merged: dict[str, str] = {}  # fused producer -> the node it now lives in
    for node in graph.nodes.values():
        if node.role != "op":
            continue
        current = replace(node)
        if prepare is not None:
            current.body = prepare(node.name, node.body)  # type: ignore[arg-type]
        raw[node.name] = node.body  # type: ignore[assignment]
        absorbed[node.name] = []
        for operand in node.operands:
            if operand in merged and merged[operand] == node.name:
                if (nodes[operand].body.has(sp.Piecewise)  # type: ignore[union-attr]
                        and _read_in_a_sum(current.body, operand)):  # type: ignore[arg-type]
                    # sympy's piecewise_fold would lift the branch condition (a relu's
                    # mask on x[r]) out of the sum over r, leaving r outside its sum:
                    # the producer stays a tensor of its own
                    continue
                candidate = inline(current.body, nodes[operand])  # type: ignore[arg-type]
                if not within_budget(candidate):
                    continue  # the producer stays a tensor of its own
                current.body = candidate
                absorbed[node.name] += [*absorbed.pop(operand), operand]
                del nodes[operand]
        current.operands = tuple(sorted(
            {n for n in (ref_name(a) for a in current.body.atoms(sp.Indexed, sp.Symbol))  # type: ignore[union-attr]
             if n is not None and n in graph.nodes},
            key=list(graph.nodes).index))
        nodes[node.name] = current
        inlined[node.name] = current.body  # type: ignore[assignment]
        users = consumers[node.name]
        # A reshape (meta "standalone") is a view of its own: fused into or with its
        # neighbours its affine indices would nest (floor of a digit sum) and lose the
        # one-view form lowering prints.
        # An integer op (positions 0..T-1) is read as an index: inlined, its body would
        # stand where only an array of ids may.
        if (node.kind == "map" and len(users) == 1 and node.name != graph.loss
                and node.dtype == "float"
                and graph.nodes[users[0]].kind != "contraction"
                and not node.meta.get("standalone")
                and not graph.nodes[users[0]].meta.get("standalone")
                and len(absorbed[node.name]) < MAX_FUSED_OPS):
            merged[node.name] = users[0]
    return Fused(nodes, absorbed, raw, inlined)
