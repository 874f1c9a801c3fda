"""``type: elementwise``: a custom formula over one or more inputs, numpy broadcasting.

``{name: g, type: elementwise, input: [a, b], formula: "a*sigmoid(b)"}`` computes
g = a * sigmoid(b) element by element. Shapes broadcast as in numpy (right-aligned; a
size-1 axis stretches). In index notation a stretched axis is the constant index 0, so
``g[i0, i1] = a[i0, 0] * sigmoid(b[i0, i1])`` and sympy's derivative sums the stretched
axis back (dL/da[k, 0] = sum_j ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp

from ..errors import ShapeError
from ..graph import Graph, Node, out_index
from ..spec import LayerSpec, Where
from .base import Layer, Option, register_layer


def broadcast(shapes: list[tuple[sp.Expr, ...]]) -> tuple[sp.Expr, ...] | None:
    """numpy's broadcast of symbolic shapes, or None when they do not broadcast."""
    rank = max(len(s) for s in shapes)
    out: list[sp.Expr] = []
    for axis in range(rank):
        dims = {s[len(s) - rank + axis] for s in shapes if len(s) - rank + axis >= 0}
        dims.discard(sp.Integer(1))
        if len(dims) > 1:
            return None
        out.append(dims.pop() if dims else sp.Integer(1))
    return tuple(out)


@register_layer
class Elementwise(Layer):
    key = "elementwise"
    doc = "custom elementwise formula over the inputs (named by their names)"
    arity = (1, None)
    options = {"formula": Option("formula", doc="the formula, e.g. a*sigmoid(b)")}
    # "_branches": the test harness feeds these dense branches (name: width) as inputs;
    # width 1 against width 3 exercises broadcasting.
    test_cases = (
        {"formula": "h*tanh(softplus(h))"},
        {"_branches": {"b0": 3, "b1": 3}, "formula": "b0*sigmoid(b1) + softplus(b0 - b1)**2"},
        {"_branches": {"b0": 3, "b1": 1}, "formula": "where(b1 > 0, b0*b1, exp(b1) - b0)"},
    )

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        if len(set(inputs)) != len(inputs):
            raise wheres["input"].error("an elementwise layer names each input once")
        from ..formula import parse_at  # on first use: most specs have no formula

        parse_at(wheres["formula"], options["formula"], dict.fromkeys(inputs))

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        shape = broadcast([n.shape for n in inputs])
        if shape is None:
            shapes = ", ".join(f"{n.name} {list(map(str, n.shape))}" for n in inputs)
            raise spec.option_where["input"].error(f"shapes do not broadcast: {shapes}",
                                                   ShapeError)
        rank = len(shape)
        variables: dict[str, sp.Expr] = {}
        for name, node in zip(spec.input_names, inputs, strict=True):
            offset = rank - node.rank
            idx = tuple(sp.Integer(0) if node.shape[a] == 1 and shape[offset + a] != 1
                        else out_index(offset + a) for a in range(node.rank))
            variables[name] = node.element(idx)
        from ..formula import parse_tree, to_sympy_at
        from .reductions import IndexReducer

        tree = parse_tree(spec.options["formula"], variables)
        reducer = IndexReducer(graph, spec.name, spec.where,
                               tuple(out_index(a) for a in range(rank)), shape)
        body = to_sympy_at(spec.option_where["formula"], tree, variables, reducer)
        return graph.op(spec.name, shape, body, layer=spec.name, where=spec.where,
                        kind="map", label="elementwise")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        from ..formula import broadcast_back, parse_tree, torch_eval

        tree = parse_tree(spec.options["formula"], dict.fromkeys(spec.input_names))
        out = torch_eval(tree, dict(zip(spec.input_names, inputs, strict=True)))
        return broadcast_back(out, *inputs)  # the layer's shape is its inputs'
