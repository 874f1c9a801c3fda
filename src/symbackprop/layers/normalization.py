"""Normalisation and softmax layers: ``layernorm``, ``rmsnorm`` and ``softmax``.

Each is a composition of index-notation ops, so sympy derives every backward step
through the chain rule and nothing here states a derivative:

* layer norm over the last axis (C features), as ``torch.nn.functional.layer_norm``:
  ``mean[r] = (1/C) sum_c x[r,c]``, ``var[r] = (1/C) sum_c (x[r,c] - mean[r])^2``
  (biased), ``rstd = 1/sqrt(var + eps)``, ``normalised = (x - mean) * rstd``,
  ``out = normalised * weight + bias``. The variance reads ``x - mean`` itself, so its
  derivative with respect to the mean is a sum of deviations, which the chain rule drops
  (:mod:`~symbackprop.derive.identities`): the adjoints of mean and variance are then the
  terms of the compact ``dx = rstd (g' - mean(g') - normalised mean(g' normalised))``
  with ``g' = g * weight``;
* RMS norm, as ``torch.nn.functional.rms_norm``: ``ms[r] = (1/C) sum_c x[r,c]^2``,
  ``out = x / sqrt(ms + eps) * weight``;
* softmax over any ``axis``: ``lse = log sum exp(z)`` along the axis (a log-sum-exp
  reduction, printed max-shifted) and ``y = exp(z - lse)``, which never overflows
  (z - lse <= 0). Its backward is ``y (g - sum(y g))``: the adjoint of ``lse`` is one
  sum per row, so no Jacobian is ever formed. ``causal: true`` first replaces the logits
  of future keys (s > t on the last two axes) by -inf, so those get probability 0 and
  gradient 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp

from .. import naming
from ..errors import ShapeError
from ..graph import Graph, Kind, Node, out_index, sum_index
from ..spec import LayerSpec, Where
from .base import (
    Layer,
    Note,
    Option,
    Param,
    refuse_trainable_bias_without_bias,
    register_layer,
)
from .core import feature_size


def _positive_eps(options: Mapping[str, object], wheres: Mapping[str, Where]) -> None:
    eps = options["eps"]
    if not isinstance(eps, float) or not eps > 0:
        raise wheres["eps"].error(f"eps must be a positive number, got {eps!r}")


def _rows(x: Node) -> tuple[tuple[sp.Symbol, ...], sp.Symbol, sp.Symbol]:
    """The output indices of ``x`` split as (row indices, last index), and a sum index."""
    idx = x.indices()
    return idx[:-1], idx[-1], sum_index(0)


def _row_op(graph: Graph, spec: LayerSpec, part: str, x: Node, body: sp.Expr,
            label: str) -> Node:
    """A per-row tensor (every axis of ``x`` but the last)."""
    kind: Kind = "reduction" if body.has(sp.Sum) else "map"
    return graph.op(naming.layer_part(spec.name, part), x.shape[:-1], body, layer=spec.name,
                    where=spec.where, kind=kind, label=label)


@register_layer
class LayerNorm(Layer):
    """Layer normalisation over the last axis (torch.nn.LayerNorm)."""

    key = "layernorm"
    doc = ("layer normalisation over the last axis: (x - mean) / sqrt(var + eps) * weight "
           "+ bias, biased variance (torch.nn.functional.layer_norm)")
    options = {
        "eps": Option("float", 1e-5, "added to the variance (> 0)"),
        "bias": Option("bool", True, "learn an additive bias"),
    }
    params = {
        "weight": Param("one per feature, as torch.nn.LayerNorm", "ones"),
        "bias": Param("one per feature", "zeros"),
    }
    test_cases = (
        {},
        {"bias": False, "eps": 1e-3},
        {"_input": ["N", 2, 3]},
        {"_input": ["N", 2, 2, 3], "trainable": {"weight": False}},
    )

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        _positive_eps(options, wheres)
        refuse_trainable_bias_without_bias(options, wheres)

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        size = feature_size(x, spec.option_where.get("input", spec.where))
        rows, c, s = _rows(x)
        count = sp.Integer(size)
        eps = sp.Float(spec.options["eps"])  # type: ignore[arg-type]
        mean = _row_op(graph, spec, "mean", x,
                       sp.Sum(x.element((*rows, s)), (s, 0, size - 1)) / count, "mean")
        # var reads x and mean (no centred tensor of its own): d var / d mean is then the
        # sum of deviations, which the chain rule drops (it is zero), so dx comes out in
        # the compact form
        centred = x.element() - mean.element(rows)
        var = _row_op(graph, spec, "var", x,
                      sp.Sum(centred.xreplace({c: s}) ** 2, (s, 0, size - 1)) / count,
                      "variance")
        rstd = _row_op(graph, spec, "rstd", x, 1 / sp.sqrt(var.element(rows) + eps),
                       "reciprocal standard deviation")
        weight = cls.param(graph, spec, "weight", (count,))
        body = centred * rstd.element(rows)
        normalised = graph.op(naming.layer_part(spec.name, "normalised"), x.shape, body,
                              layer=spec.name, where=spec.where, label="normalised")
        out = normalised.element() * weight.element((c,))
        bias = ""
        if spec.options["bias"]:
            bias_node = cls.param(graph, spec, "bias", (count,))
            out = out + bias_node.element((c,))
            bias = bias_node.name
        node = graph.op(spec.name, x.shape, out, layer=spec.name, where=spec.where,
                        label="layernorm affine")
        # what these nodes compute, for the layer-norm pass (ir/passes/layer_norm.py),
        # which checks the statements against it before it calls one kernel
        node.meta["layer_norm"] = (x.name, mean.name, var.name, weight.name, bias,
                                   float(spec.options["eps"]))  # type: ignore[arg-type]
        return node

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        return ((
            "Layer norm, collected. With ", r"\hat{\mathbf{x}} = (\mathbf{x} - \mu)/\sigma",
            " (the normalised tensor), ", r"\sigma = \sqrt{\operatorname{var} + \epsilon}",
            " and ", r"\hat{\mathbf{g}} = \mathbf{g} \odot \mathbf{w}",
            " (the adjoint of the layer's output times its weight), the Jacobian of one row "
            "is ", r"\partial \hat{x}_{i} / \partial x_{j} = \frac{1}{\sigma}\left(\delta_{ij}"
                   r" - \frac{1}{C} - \frac{1}{C}\hat{x}_{i} \hat{x}_{j}\right)",
            ". The variance's derivative with respect to the mean is a sum of deviations, ",
            r"\sum_{j} (x_{j} - \mu) = 0", ", which symbackprop drops (an exact identity), so the "
            "contributions above through the mean, the variance and ", r"1/\sigma",
            " are the three terms of the compact form, means over the ", "C", " features:"),
            ((r"\frac{\partial L}{\partial x_{j}}",
              r"= \frac{1}{\sigma}\left(\hat{g}_{j} - \frac{1}{C}\sum_{i=1}^{C}"
              r" \hat{g}_{i} - \hat{x}_{j}\,\frac{1}{C}\sum_{i=1}^{C} \hat{g}_{i}"
              r" \hat{x}_{i}\right)"),
             (r"\frac{\partial L}{\partial \mathbf{x}}",
              r"= \frac{1}{\sigma}\left(\hat{\mathbf{g}} - \operatorname{mean}"
              r"(\hat{\mathbf{g}}) - \hat{\mathbf{x}} \odot \operatorname{mean}"
              r"(\hat{\mathbf{g}} \odot \hat{\mathbf{x}})\right)")))

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        x = inputs[0]
        weight = params[spec.param_name("weight")]
        bias = params[spec.param_name("bias")] if spec.options["bias"] else None
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias,
                                              float(spec.options["eps"]))  # type: ignore[arg-type]


@register_layer
class RMSNorm(Layer):
    """Root-mean-square normalisation over the last axis (torch.nn.RMSNorm)."""

    key = "rmsnorm"
    doc = ("RMS normalisation over the last axis: x / sqrt(mean(x^2) + eps) * weight "
           "(torch.nn.functional.rms_norm)")
    options = {"eps": Option("float", 1e-6, "added to the mean square (> 0)")}
    params = {"weight": Param("one per feature, as torch.nn.RMSNorm", "ones")}
    test_cases = ({}, {"eps": 1e-2, "_input": ["N", 2, 3]}, {"_input": ["N", 2, 2, 3]})

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        _positive_eps(options, wheres)

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        size = feature_size(x, spec.option_where.get("input", spec.where))
        rows, c, s = _rows(x)
        count = sp.Integer(size)
        eps = sp.Float(spec.options["eps"])  # type: ignore[arg-type]
        ms = _row_op(graph, spec, "ms", x,
                     sp.Sum(x.element((*rows, s)) ** 2, (s, 0, size - 1)) / count,
                     "mean square")
        rrms = _row_op(graph, spec, "rrms", x, 1 / sp.sqrt(ms.element(rows) + eps),
                       "reciprocal root mean square")
        weight = cls.param(graph, spec, "weight", (count,))
        normalised = graph.op(naming.layer_part(spec.name, "normalised"), x.shape,
                              x.element() * rrms.element(rows), layer=spec.name,
                              where=spec.where, label="normalised")
        return graph.op(spec.name, x.shape, normalised.element() * weight.element((c,)),
                        layer=spec.name, where=spec.where, label="rmsnorm scale")

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        return ((
            "RMS norm, collected. With ", r"r = \sqrt{\operatorname{mean}(\mathbf{x}^{2})"
            r" + \epsilon}", ", ", r"\hat{\mathbf{x}} = \mathbf{x}/r", " and ",
            r"\hat{\mathbf{g}} = \mathbf{g} \odot \mathbf{w}",
            ", the contributions above through the mean square sum to:"),
            ((r"\frac{\partial L}{\partial \mathbf{x}}",
              r"= \frac{1}{r}\left(\hat{\mathbf{g}} - \hat{\mathbf{x}} \odot "
              r"\operatorname{mean}(\hat{\mathbf{g}} \odot \hat{\mathbf{x}})\right)"),))

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        x = inputs[0]
        weight = params[spec.param_name("weight")]
        return torch.nn.functional.rms_norm(x, x.shape[-1:], weight,
                                            float(spec.options["eps"]))  # type: ignore[arg-type]


@register_layer
class Softmax(Layer):
    """softmax(z) along one axis, optionally causal over the last two axes."""

    key = "softmax"
    doc = ("softmax along an axis, exp(z - logsumexp(z)) (never overflows); causal: true "
           "masks key s > query t over the last two axes")
    options = {
        "axis": Option("int", -1, "the axis to normalise over (negative counts from the end)"),
        "causal": Option("bool", False, "query t (axis -2) sees only keys s <= t (axis -1); "
                                        "the last two axes must have the same size"),
    }
    test_cases = (
        {},
        {"_input": ["N", 2, 3], "axis": 1},
        {"_input": ["N", 3, 3], "causal": True},
        {"_input": ["N", 2, 3, 3], "causal": True},
        {"_input": ["N", 2, 2, 3], "axis": -3},
    )

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (z,) = inputs
        axis = int(spec.options["axis"])  # type: ignore[arg-type]
        if not -z.rank <= axis < z.rank:
            raise spec.option_where["axis"].error(
                f"axis {axis} is out of range for {z.name!r} of rank {z.rank} (allowed: "
                f"{-z.rank} to {z.rank - 1})", ShapeError)
        if spec.options["causal"] and axis % z.rank < z.rank - 2:
            # the mask hides every key s > t of the last two axes: along any other axis
            # some rows would be masked everywhere, a softmax of nothing (NaN)
            raise spec.option_where["axis"].error(
                f"a causal softmax normalises over the keys or the queries (axis -1 or -2), "
                f"got axis {axis} of {z.name!r} (rank {z.rank})", ShapeError)
        return softmax(graph, spec.name, spec.name, z, axis % z.rank,
                       bool(spec.options["causal"]), spec.where, spec.option_where["causal"])

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        # text and inline math alternate: the sentence ends on text either way
        causal = (("; with causal: true a masked logit is minus infinity, so its ", "y_{j} = 0",
                   " and its gradient 0:") if spec.options["causal"] else (":",))
        return ((
            "Softmax, collected. Along the softmax axis the Jacobian is ",
            r"\partial y_{i} / \partial z_{j} = y_{i} (\delta_{ij} - y_{j})",
            ", a matrix per row that is never formed: the contributions above through ",
            r"\mathrm{lse}", " and through ", r"y = e^{z - \mathrm{lse}}",
            " are this Jacobian contracted with the adjoint ", r"\mathbf{g}",
            ", which collapses to one sum per row" + causal[0], *causal[1:]),
            ((r"\frac{\partial L}{\partial z_{j}}",
              r"= \sum_{i} g_{i}\, y_{i} (\delta_{ij} - y_{j})"),
             ("", r"= y_{j}\left(g_{j} - \sum_{i} y_{i} g_{i}\right)"),
             (r"\frac{\partial L}{\partial \mathbf{z}}",
              r"= \mathbf{y} \odot \left(\mathbf{g} - \sum_{i} y_{i} g_{i}"
              r"\right)"),))

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:

        return softmax_reference(inputs[0], int(spec.options["axis"]),  # type: ignore[arg-type]
                                 bool(spec.options["causal"]))


def softmax_reference(z: Any, axis: int, causal: bool) -> Any:
    """torch.softmax along ``axis``, the last two axes first masked causally (key s > query
    t set to -inf, as nanoGPT's masked_fill): the oracle of softmax and attention."""
    import torch

    if causal:
        size = z.shape[-1]
        keep = torch.ones(size, size, dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~keep, float("-inf"))
    return torch.softmax(z, dim=axis)


def softmax(graph: Graph, name: str, layer: str, z: Node, axis: int, causal: bool,
            where: Where, causal_where: Where) -> Node:
    """Add ``name = exp(z - lse)`` along ``axis`` (and ``name_lse``, ``name_masked``).

    lse = log sum exp(z) along the axis, computed max-shifted by the lowering, so no
    logit overflows; with ``causal`` the logits of key s > query t over the last two
    axes are minus infinity first (an index predicate, no mask array). The attention
    layer builds its probabilities with this too."""
    idx = z.indices()
    logits = z
    if causal:
        if z.rank < 2:
            raise causal_where.error(f"causal softmax needs at least two axes; {z.name!r} "
                                     f"has {z.rank}", ShapeError)
        if z.shape[-1] != z.shape[-2]:
            raise causal_where.error(
                f"causal softmax needs the last two axes of {z.name!r} to be equal "
                f"(queries x keys), got {z.shape[-2]} and {z.shape[-1]}", ShapeError)
        t, s = idx[-2], idx[-1]
        masked = sp.Piecewise((z.element(), s <= t), (-sp.oo, True))
        logits = graph.op(naming.layer_part(name, "masked"), z.shape, masked,
                          layer=layer, where=causal_where, label="causal mask")
    j = sum_index(0)
    rows = idx[:axis] + idx[axis + 1:]
    # lse's own output indices are i0, i1, ... over the axes that remain
    kept = tuple(out_index(k) for k in range(z.rank - 1))
    along = (*kept[:axis], j, *kept[axis:])
    lse = graph.op(naming.layer_part(name, "lse"), z.shape[:axis] + z.shape[axis + 1:],
                   sp.log(sp.Sum(sp.exp(logits.element(along)), (j, 0, z.shape[axis] - 1))),
                   layer=layer, where=where, kind="reduction", label="logsumexp")
    return graph.op(name, z.shape, sp.exp(logits.element() - lse.element(rows)),
                    layer=layer, where=where, label="softmax")
