"""ModelSpec -> Graph: resolve layer inputs, order the DAG, let each layer expand itself.

Layers may name inputs declared later in the list (a DAG need not be written in
order); this module orders them topologically and reports cycles and unknown names at
the layer that mentions them.
"""

from __future__ import annotations

import sympy as sp

from . import naming
from .errors import GraphError, ShapeError
from .graph import Graph, Node, sum_index
from .layers import LAYERS, LOSSES
from .spec import LayerSpec, LossSpec, ModelSpec, WeightDecaySpec


def layer_order(spec: ModelSpec) -> list[LayerSpec]:
    """Layers in an order where every input comes first; raise on cycles or unknowns."""
    declared = {d.name for d in (*spec.inputs, *spec.targets)}
    by_name = {layer.name: layer for layer in spec.layers}
    targets = {d.name for d in spec.targets}
    for layer in spec.layers:
        for i, name in enumerate(layer.inputs):
            where = layer.option_where["input"]
            if name in targets:
                raise where.error(f"{name!r} is a target; layers read inputs or other layers",
                                  GraphError)
            if name not in declared and name not in by_name:
                raise where.error(f"unknown input {name!r} (not an input or a layer name)",
                                  GraphError)
            if name == layer.name:
                raise where.error(f"layer {layer.name!r} reads itself", GraphError)
            del i
    # Depth-first, with an explicit stack: a chain of 512 layers must not depend on
    # Python's recursion limit.
    order: list[LayerSpec] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    for root in spec.layers:
        if state.get(root.name) == 2:
            continue
        path: list[str] = [root.name]
        state[root.name] = 1
        stack: list[tuple[LayerSpec, int]] = [(root, 0)]
        while stack:
            layer, next_input = stack[-1]
            names = [n for n in layer.inputs if n in by_name]
            if next_input == len(names):
                stack.pop()
                path.pop()
                state[layer.name] = 2
                order.append(layer)
                continue
            stack[-1] = (layer, next_input + 1)
            child = by_name[names[next_input]]
            mark = state.get(child.name, 0)
            if mark == 2:
                continue
            if mark == 1:
                cycle = " -> ".join([*path[path.index(child.name):], child.name])
                raise child.option_where["input"].error(f"the layers form a cycle: {cycle}",
                                                        GraphError)
            state[child.name] = 1
            path.append(child.name)
            stack.append((child, 0))
    return order


def build_graph(spec: ModelSpec) -> Graph:
    """Expand every layer and the loss into index-notation ops."""
    graph = Graph(spec.name)
    for decl in spec.inputs:
        graph.add(Node(decl.name, tuple(graph.dim(d) for d in decl.shape), "input", decl.name,
                       decl.where, dtype=decl.dtype))  # type: ignore[arg-type]
    for decl in spec.targets:
        graph.add(Node(decl.name, tuple(graph.dim(d) for d in decl.shape), "target",
                       decl.name, decl.where, dtype=decl.dtype))  # type: ignore[arg-type]
    for bound in spec.dims:
        graph.bound_dim(graph.dim(bound.name), bound.max, "its declared max (dims)")
        graph.declared_max[bound.name] = bound.max
    for layer in layer_order(spec):
        inputs = [graph.nodes[graph.layer_outputs.get(n, n)] for n in layer.inputs]
        ids = next((n for n in inputs if n.dtype != "float"), None)
        if ids is not None and not LAYERS[layer.type].takes_ids:
            raise layer.option_where["input"].error(
                f"layer type {layer.type!r} cannot read {ids.name!r}, an integer tensor "
                "(ids are read by embedding and position_embedding)", GraphError)
        out = LAYERS[layer.type].build(graph, layer, inputs)
        graph.layer_outputs[layer.name] = out.name

    losses = spec.losses or (spec.loss,)
    single = losses[0]
    if (len(losses) == 1 and spec.weight_decay is None and single.weight == 1
            and single.prediction):
        prediction, node = _loss_term(spec, graph, single)
        assert prediction is not None
    else:
        prediction, node = _composite(spec, graph, losses)
    graph.loss = node.name
    graph.prediction = prediction.name
    if not any(p.trainable for p in graph.params()):
        raise spec.where.error("no trainable parameters: nothing to differentiate", ShapeError)
    _check_identifiers(spec, graph)
    return graph


def _loss_term(spec: ModelSpec, graph: Graph, loss: LossSpec) -> tuple[Node | None, Node]:
    """Build one loss (a term of a composite loss or the whole loss): (prediction, node);
    a penalty term (a formula of parameters, no prediction) has no prediction."""
    if not loss.prediction:
        return None, LOSSES[loss.type].build(graph, loss, None, None)  # type: ignore[arg-type]
    if loss.prediction not in graph.layer_outputs:
        raise loss.option_where["prediction"].error(
            f"prediction {loss.prediction!r} is not a layer name", GraphError)
    prediction = graph.nodes[graph.layer_outputs[loss.prediction]]
    target = None
    if loss.target is not None:
        if loss.target not in {d.name for d in spec.targets}:
            raise loss.option_where["target"].error(
                f"target {loss.target!r} is not declared under 'targets'", GraphError)
        target = graph.nodes[loss.target]
        if target.dtype != "float" and not LOSSES[loss.type].takes_class_ids:
            raise loss.option_where["target"].error(
                f"loss {loss.type!r} cannot take {target.name!r}, an integer tensor (class "
                "ids are taken by softmax_cross_entropy)", GraphError)
    return prediction, LOSSES[loss.type].build(graph, loss, prediction, target)


def _composite(spec: ModelSpec, graph: Graph, losses: tuple[LossSpec, ...]
               ) -> tuple[Node, Node]:
    """L = sum_k w_k L_k (+ (l2 / 2) sum ||W||^2): each term is built as a loss of its own
    (named ``loss_<k>``, k from 1), the weight-decay penalty as ``weight_decay``, and ``loss`` is
    their weighted sum. The first term's prediction is what ``forward`` returns."""
    parts: list[sp.Expr] = []
    first: Node | None = None
    for k, loss in enumerate(losses):
        prediction, node = _loss_term(spec, graph, loss)
        first = first or prediction
        term = _rename(graph, node, naming.loss_term(k + 1))
        term.meta["symbol"] = ("L", str(k + 1))
        parts.append(_number(loss.weight) * term.element())
    if spec.weight_decay is not None:
        decay = _weight_decay(graph, spec.weight_decay)
        decay.meta["symbol"] = ("R", "")
        parts.append(decay.element())
    if first is None:
        raise (spec.losses[0].where if spec.losses else spec.where).error(
            "no loss term names a prediction (what forward() returns)", GraphError)
    where = spec.losses[0].where if spec.losses else spec.where
    node = graph.op("loss", (), sp.Add(*parts), layer="loss", where=where, kind="map",
                    label="weighted sum of losses")
    return first, node


def _number(value: float) -> sp.Expr:
    return sp.Integer(int(value)) if float(value).is_integer() else sp.Float(repr(value))


def _rename(graph: Graph, node: Node, name: str) -> Node:
    """A loss class names its op ``loss``; a term of a composite loss is renamed (no op
    reads it yet, and moving it to the end keeps the insertion order topological)."""
    del graph.nodes[node.name]
    node.name = name
    return graph.add(node)


def _weight_decay(graph: Graph, decay: WeightDecaySpec) -> Node:
    """(l2 / 2) * sum of squares of the covered parameters, as one reduction."""
    params = {p.param: p for p in graph.params() if p.param is not None}
    if decay.params is None:
        covered = [p for p in params.values() if p.trainable and p.rank >= 2
                   and p.param is not None and p.param.rsplit(".", 1)[-1] == "weight"]
        if not covered:
            raise decay.where.error("weight_decay covers no parameter: the network has no "
                                    "trainable weight matrix (name them under 'params')",
                                    GraphError)
    else:
        covered = []
        for name in decay.params:
            if name not in params:
                raise decay.param_where[name].error(
                    f"unknown parameter {name!r} (parameters: "
                    f"{', '.join(sorted(params))})", GraphError)
            covered.append(params[name])
    terms = []
    for p in covered:
        sums = tuple(sum_index(k) for k in range(p.rank))
        terms.append(sp.Sum(p.element(sums) ** 2,
                            *((s, 0, n - 1) for s, n in zip(sums, p.shape, strict=True))))
    body = _number(decay.l2) / 2 * sp.Add(*terms)
    return graph.op(naming.WEIGHT_DECAY, (), body, layer="loss", where=decay.where,
                    kind="reduction", label="weight decay")


def _check_identifiers(spec: ModelSpec, graph: Graph) -> None:
    """No two tensors, shape symbols or generated names may share an identifier."""
    owners: dict[str, str] = {}
    for sym in graph.dims:
        naming.claim(owners, sym, f"shape symbol {sym}")
    for node in graph.nodes.values():
        for ident in (node.name, naming.adjoint(node.name)):
            clash = naming.claim(owners, ident, node.name)
            if clash:
                raise node.where.error(f"the generated name {ident!r} of {node.name!r} "
                                       f"collides with {clash}", GraphError)
