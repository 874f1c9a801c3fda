"""Core layer types: dense, standalone activation, and elementwise add (residuals)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp

from .. import naming
from ..errors import ShapeError
from ..graph import Graph, Node, sum_index
from ..spec import ActivationSpec, LayerSpec, Where
from .base import (
    ACTIVATIONS,
    Layer,
    Option,
    Param,
    refuse_trainable_bias_without_bias,
    register_layer,
    trainable,
)
from .lora import (
    LORA_OPTION,
    LORA_PARAMS,
    adapter_reference,
    add_adapter,
    explicit_trainable,
    lora_config,
    shared_param,
    validate_lora,
)


def apply_activation(graph: Graph, act: ActivationSpec | None, pre: Node, out_name: str,
                     layer: str, where: Where) -> Node:
    """Add the node ``out = act(pre)``; with no activation, return ``pre`` itself."""
    if act is None or act.type == "identity":
        return pre
    if act.type == "formula":
        from ..formula import parse_tree, to_sympy_at  # most specs have no formula
        from .reductions import IndexReducer

        reducer = IndexReducer(graph, layer, where, pre.indices(), pre.shape)
        formula = to_sympy_at(act.where or where, parse_tree(act.formula, {"x": None}),
                              {"x": pre.element()}, reducer)
        return graph.op(out_name, pre.shape, formula, layer=layer, where=where, kind="map",
                        label="formula")
    formula = ACTIVATIONS[act.type].formula(pre.element(), dict(act.params))
    return graph.op(out_name, pre.shape, formula, layer=layer, where=where, kind="map",
                    label=f"{act.type}")


def activation_reference(act: ActivationSpec | None, x: Any) -> Any:
    if act is None:
        return x
    if act.type == "formula":
        from ..formula import broadcast_back, parse_tree, torch_eval

        out = torch_eval(parse_tree(act.formula, {"x": None}), {"x": x})
        return broadcast_back(out, x)  # the activation keeps x's shape
    return ACTIVATIONS[act.type].reference(x, dict(act.params))


def feature_size(node: Node, where: Where) -> int:
    last = node.shape[-1]
    if not last.is_Integer:
        raise where.error(f"the last axis of {node.name!r} is the symbol {last}; a layer with "
                          "weights needs a fixed feature size", ShapeError)
    return int(last)


@register_layer
class Dense(Layer):
    """z = x W^T + b over the last axis, then an optional activation (torch.nn.Linear)."""

    key = "dense"
    doc = "fully connected layer: z = x W^T + b, h = activation(z)"
    options = {
        "units": Option("units", doc="output features"),
        "activation": Option("activation", None, "activation applied to z (default: none)"),
        "bias": Option("bool", True, "learn an additive bias"),
        "weight": Option("param", None, "use another layer's parameter as the weight "
                         "(e.g. `wte.weight`, of the same out x in shape; default: own)"),
        "lora": LORA_OPTION,
    }
    params = {
        "weight": Param("out x in, as torch.nn.Linear", "uniform_fan_in"),
        "bias": Param("one per output", "uniform_fan_in"),
        **LORA_PARAMS,
    }
    test_cases = ({"units": 3}, {"units": 2, "bias": False}, {"units": 3, "trainable": False},
                  {"units": 3, "trainable": {"weight": False}},
                  {"units": 3, "_input": ["N", 2, 3]}, {"units": 2, "_input": ["N", 2, 2, 3]},
                  {"units": 3, "lora": {"rank": 2, "alpha": 4}},
                  {"units": 2, "lora": {"rank": 1, "alpha": 3}, "bias": False,
                   "_input": ["N", 2, 3]},
                  {"units": 3, "lora": {"rank": 2, "alpha": 2}, "trainable": {"bias": True}},
                  {"units": 3, "weight": "h.weight"})

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        refuse_trainable_bias_without_bias(options, wheres)
        value = options.get("trainable")
        validate_lora(options, wheres)
        if options["lora"] is None and isinstance(value, tuple):
            for role in LORA_PARAMS:
                if role in dict(value):
                    raise wheres["trainable"].error(f"trainable names {role!r} but the layer "
                                                    "has no lora adapter")
        if options["lora"] is not None and options["weight"] is not None:
            raise wheres["lora"].error("lora on a layer whose weight is another layer's "
                                       "parameter is not supported: put the adapter on the "
                                       "layer that declares the weight")

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        fan_in = feature_size(x, spec.option_where.get("input", spec.where))
        units = int(spec.options["units"])  # type: ignore[arg-type]
        shape = (sp.Integer(units), sp.Integer(fan_in))
        lora = lora_config(spec.options)
        if spec.options["weight"] is not None:
            weight = shared_param(graph, spec, "weight", "weight", shape,
                                  explicit_trainable(spec, "weight"))
        else:
            weight = cls.param(graph, spec, "weight", shape, fan_in)
        idx = tuple(sp.Symbol(f"i{k}", integer=True) for k in range(x.rank))
        s = sum_index(0)
        body: sp.Expr = sp.Sum(x.element((*idx[:-1], s)) * weight.element((idx[-1], s)),
                               (s, 0, fan_in - 1))
        if spec.options["bias"]:
            bias = cls.param(graph, spec, "bias", (sp.Integer(units),), fan_in)
            body = body + bias.element((idx[-1],))
        if lora is not None:
            # LoRA fine-tuning: the base weight and bias are frozen unless the layer's
            # trainable option names them.
            for node, role in ((weight, "weight"), (bias if spec.options["bias"] else None,
                                                    "bias")):
                if node is not None:
                    node.trainable = trainable(spec, role, False)
            body = add_adapter(graph, spec, spec.dotted, lora, x, weight, body, {
                role: trainable(spec, role, decl.trainable)
                for role, decl in LORA_PARAMS.items()})
        act: ActivationSpec | None = spec.options["activation"]  # type: ignore[assignment]
        has_act = act is not None and act.type != "identity"
        z_name = naming.preactivation(spec.name) if has_act else spec.name
        z = graph.op(z_name, (*x.shape[:-1], sp.Integer(units)), body, layer=spec.name,
                     where=spec.where, kind="contraction", label="dense")
        return apply_activation(graph, act, z, spec.name, spec.name, spec.where)

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        shared = spec.options["weight"]
        weight = params[str(shared) if shared is not None else spec.param_name("weight")]
        bias = params.get(spec.param_name("bias")) if spec.options["bias"] else None
        z = torch.nn.functional.linear(inputs[0], weight, bias)
        lora = lora_config(spec.options)
        if lora is not None:
            z = z + adapter_reference(inputs[0], params, spec.dotted, lora)
        return activation_reference(spec.options["activation"], z)  # type: ignore[arg-type]


@register_layer
class ActivationLayer(Layer):
    """h = activation(x), elementwise."""

    key = "activation"
    doc = "standalone elementwise activation"
    options = {"activation": Option("activation", doc="the activation to apply")}
    test_cases = ({"activation": "tanh"}, {"activation": "sigmoid", "_input": ["N", 2, 2, 3]})

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        act: ActivationSpec = spec.options["activation"]  # type: ignore[assignment]
        if act.type == "identity":
            return graph.op(spec.name, x.shape, x.element(), layer=spec.name, where=spec.where,
                            label="identity")
        return apply_activation(graph, act, x, spec.name, spec.name, spec.where)

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        return activation_reference(spec.options["activation"], inputs[0])  # type: ignore[arg-type]


@register_layer
class Add(Layer):
    """h = a + b + ..., all inputs of one shape (a residual connection)."""

    key = "add"
    doc = "elementwise sum of two or more tensors of the same shape"
    arity = (2, None)
    test_cases = ({}, {"_branches": {"b0": 3, "b1": 3, "b2": 3}}, {"_input": ["N", 4, 3]})

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        first = inputs[0]
        for other in inputs[1:]:
            if other.shape != first.shape:
                raise spec.option_where.get("input", spec.where).error(
                    f"cannot add {first.name!r} of shape {_fmt(first.shape)} and "
                    f"{other.name!r} of shape {_fmt(other.shape)}", ShapeError)
        body = sp.Add(*(n.element() for n in inputs))
        return graph.op(spec.name, first.shape, body, layer=spec.name, where=spec.where,
                        label="add")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        out = inputs[0]
        for other in inputs[1:]:
            out = out + other
        return out


def _fmt(shape: tuple[sp.Expr, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
