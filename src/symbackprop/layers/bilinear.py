"""The bilinear layer: a contraction of three arrays (torch.nn.Bilinear).

z[..., k] = sum_{a,b} x1[..., a] W[k, a, b] x2[..., b] + b[k]. Its forward pass and each of
its gradients are three-operand contractions (dL/dW[k,a,b] = sum_n g[n,k] x1[n,a]
x2[n,b]), so the order in which the pairs are multiplied is chosen by cost
(:mod:`symbackprop.ir.contract`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp

from ..errors import ShapeError
from ..graph import Graph, Node, out_index, sum_index
from ..spec import LayerSpec
from .base import Layer, Option, Param, register_layer
from .core import feature_size


@register_layer
class Bilinear(Layer):
    """z = x1ᵀ W x2 + b per output unit, over the last axes of two inputs."""

    key = "bilinear"
    doc = "bilinear form of two inputs: z_k = x1 W_k x2 + b_k (torch.nn.Bilinear)"
    arity = (2, 2)
    options = {
        "units": Option("units", doc="output features"),
        "bias": Option("bool", True, "learn an additive bias"),
    }
    # torch.nn.Bilinear: both drawn from U(-1/sqrt(in1), 1/sqrt(in1))
    params = {
        "weight": Param("out x in1 x in2, as torch.nn.Bilinear", "uniform_fan_in"),
        "bias": Param("one per output", "uniform_fan_in"),
    }
    test_cases = (
        {"units": 3, "_branches": {"b0": 3, "b1": 2}},
        {"units": 2, "bias": False, "_branches": {"b0": 2, "b1": 4}},
        {"units": 2, "_input": ["N", 2, 3], "_branches": {"b0": 2, "b1": 3}},
    )

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        x1, x2 = inputs
        where = spec.option_where.get("input", spec.where)
        if x1.shape[:-1] != x2.shape[:-1]:
            raise where.error(f"bilinear inputs {x1.name!r} and {x2.name!r} must agree on "
                              "every axis but the last", ShapeError)
        in1, in2 = feature_size(x1, where), feature_size(x2, where)
        units = int(spec.options["units"])  # type: ignore[arg-type]
        weight = cls.param(graph, spec, "weight", (sp.Integer(units), sp.Integer(in1),
                                                   sp.Integer(in2)), in1)
        idx = tuple(out_index(k) for k in range(x1.rank))
        a, b = sum_index(0), sum_index(1)
        body: sp.Expr = sp.Sum(x1.element((*idx[:-1], a)) * weight.element((idx[-1], a, b))
                               * x2.element((*idx[:-1], b)), (a, 0, in1 - 1), (b, 0, in2 - 1))
        if spec.options["bias"]:
            bias = cls.param(graph, spec, "bias", (sp.Integer(units),), in1)
            body = body + bias.element((idx[-1],))
        return graph.op(spec.name, (*x1.shape[:-1], sp.Integer(units)), body, layer=spec.name,
                        where=spec.where, kind="contraction", label="bilinear")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        weight = params[spec.param_name("weight")]
        bias = params.get(spec.param_name("bias")) if spec.options["bias"] else None
        return torch.nn.functional.bilinear(inputs[0], inputs[1], weight, bias)
