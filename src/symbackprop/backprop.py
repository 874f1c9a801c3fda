"""The chain rule over the DAG: a reverse topological walk that accumulates adjoints.

For every op node on a path from a trainable parameter to the loss, in reverse order,
the adjoint dL/d(node) is the sum of the contributions its consumers sent it; the node
then sends ``vjp(node, operand)`` to each operand that needs a gradient. Frozen
parameters, inputs and targets never get an adjoint, so no code is emitted for them,
unless the caller asks for every float leaf (``derive(graph, leaves=True)``; integer
tensors, ids and class labels, never get one): the torch
``autograd.Function`` and numpy's ``loss_and_grad(..., wrt=...)`` differentiate with
respect to inputs, targets and frozen parameters when their caller asks at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy as sp

from . import naming
from .derive import stable
from .derive.calculus import (
    MAX_SIMPLIFY_NODES,
    KnownForms,
    simplify_local,
    too_large_to_simplify,
    vjp,
)
from .derive.fusion import Fused, fuse
from .derive.identities import drop_deviation_sums, means
from .graph import Graph, Node, target_index


@dataclass
class Contribution:
    """What one consumer sends back to an operand: raw sympy result and simplified form."""

    consumer: str
    raw: sp.Expr
    simplified: sp.Expr


@dataclass
class Adjoint:
    """d_<node>[k0, k1, ...] = expr, the summed contributions."""

    node: str
    var: str
    expr: sp.Expr
    contributions: list[Contribution] = field(default_factory=list)


@dataclass
class Derivation:
    graph: Graph
    fused: Fused
    computed: list[str]           # forward tensors, in evaluation order
    forward: dict[str, sp.Expr]   # their bodies, reading earlier tensors where possible
    adjoints: list[Adjoint]       # in evaluation order (loss first)
    grads: dict[str, str]         # trainable parameter name -> adjoint variable
    seed: sp.Symbol
    rewrites: list[stable.Fired] = field(default_factory=list)
    # With ``leaves=True``: every leaf tensor (input, target, any parameter) -> the
    # adjoint variable holding dL/d(leaf); otherwise empty.
    leaf_grads: dict[str, str] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        return self.fused.nodes.get(name) or self.graph.nodes[name]


def derive(graph: Graph, *, leaves: bool = False, reuse: Derivation | None = None
           ) -> Derivation:
    """The derivation of ``graph``'s loss; ``leaves``: also the adjoint of every input,
    target and frozen parameter (``Derivation.leaf_grads``). ``reuse``: an earlier
    derivation of the same graph whose contributions are taken as they are (a consumer's
    contribution to an operand depends on nothing else), so only new ones are derived."""
    known_contributions = {(c.consumer, a.node): c for a in (reuse.adjoints if reuse else ())
                           for c in a.contributions}
    rewrites: list[stable.Fired] = []

    def prepare(name: str, body: sp.Expr) -> sp.Expr:
        return stable.apply(body, f"forward {name}", rewrites)

    # Stable forms first, per op and again after fusion, so the derivative is taken of
    # what will be computed.
    fused = fuse(graph, prepare)
    order = list(fused.nodes)
    for name, node in fused.nodes.items():
        node.body = prepare(name, node.body)  # type: ignore[arg-type]
        fused.inlined[name] = node.body  # type: ignore[assignment]

    # Forward: every remaining op, plus the prediction even when fused into the loss
    # (forward() returns it, and the loss and backward pass reuse it).
    computed = [n for n in graph.nodes if n in fused.nodes or n == graph.prediction]
    known = KnownForms()
    forward: dict[str, sp.Expr] = {}
    for name in computed:
        node = fused.nodes.get(name) or replace(graph.nodes[name],
                                                body=fused.inlined[name])
        forward[name] = (reuse.forward[name] if reuse is not None else
                         known.substitute(node.body))  # type: ignore[arg-type]
        known.add(node)

    needs: dict[str, bool] = {}
    for name, node in graph.nodes.items():
        if node.role == "param":
            needs[name] = node.trainable or leaves
        elif node.role != "op":
            # ids and dropout masks get no gradient
            needs[name] = leaves and node.dtype == "float" and node.role != "mask"
    for name in order:
        # a tensor marked no_gradient (the maximum and ties of a max reduction) is a
        # constant to the chain rule: nothing is sent to it or through it; nor is an
        # integer tensor
        needs[name] = (fused.nodes[name].dtype == "float"
                       and any(needs.get(o, False) for o in fused.nodes[name].operands)
                       and not fused.nodes[name].meta.get("no_gradient"))

    seed = sp.Symbol(naming.adjoint(graph.loss), real=True)
    mean_table = means(graph)
    pending: dict[str, list[Contribution]] = {}
    adjoints: list[Adjoint] = []
    grads: dict[str, str] = {}
    # A parameter's gradient is emitted as soon as every op that reads it has been
    # visited, so the arrays it needs die early in the generated code.
    wanted = [n for n in graph.nodes.values() if n.role != "op" and needs[n.name]]
    readers = {p.name: sum(p.name in fused.nodes[n].operands for n in order) for p in wanted}
    emitted: dict[str, Adjoint] = {}

    def emit_param(param: Node) -> None:
        contributions = pending.pop(param.name, [])
        expr = sp.Add(*(c.simplified for c in contributions)) if contributions else None
        if expr is None:  # a parameter the loss does not depend on: its gradient is zero
            expr = sp.Integer(0)
        adjoint = Adjoint(param.name, naming.adjoint(param.name), expr, contributions)
        adjoints.append(adjoint)
        emitted[param.name] = adjoint

    for name in reversed(order):
        node = fused.nodes[name]
        if not needs[name]:
            continue
        if name == graph.loss:
            adjoint = Adjoint(name, seed.name, seed)
        else:
            contributions = pending.pop(name, [])
            if not contributions:
                continue
            adjoint = Adjoint(name, naming.adjoint(name),
                              sp.Add(*(c.simplified for c in contributions)), contributions)
        adjoints.append(adjoint)
        for operand in node.operands:
            if not needs.get(operand, False):
                continue
            if (name, operand) in known_contributions:
                pending.setdefault(operand, []).append(known_contributions[name, operand])
                continue
            target = graph.nodes.get(operand) or fused.nodes[operand]
            raw = vjp(node, target, adjoint.var)
            if raw == 0:
                continue
            where = f"backward {adjoint.var} -> {naming.adjoint(operand)}"
            if too_large_to_simplify(raw):
                rewrites.append(stable.Fired(
                    where, "not simplified", f"over {MAX_SIMPLIFY_NODES} nodes: the derivative "
                    "is used as derived (exact); sympy's simplification would take too long"))
            simplified = stable.apply(simplify_local(raw), where, rewrites)
            simplified = drop_deviation_sums(known.substitute(simplified), mean_table)
            if simplified == 0:
                continue
            pending.setdefault(operand, []).append(Contribution(name, raw, simplified))
        for operand in node.operands:
            if operand in readers:
                readers[operand] -= 1
                if readers[operand] == 0:
                    emit_param(graph.nodes[operand])
    for leaf in wanted:
        if leaf.name not in emitted:
            emit_param(leaf)
        if leaf.trainable:
            assert leaf.param is not None
            grads[leaf.param] = naming.adjoint(leaf.name)
    leaf_grads = {leaf.name: naming.adjoint(leaf.name) for leaf in wanted} if leaves else {}
    return Derivation(graph, fused, computed, forward, adjoints, grads, seed, rewrites,
                      leaf_grads)


def target_indices(node: Node) -> tuple[sp.Symbol, ...]:
    return tuple(target_index(k) for k in range(node.rank))
