"""Built-in losses. Each is a mean over the batch, written in index notation.

Elementwise losses (mse, bce, bce_with_logits) average over every element, as torch's
default ``reduction='mean'`` does. Softmax cross-entropy sums over the last (class)
axis and averages over the rest: L = mean_r sum_c t[r,c] (lse[r] - z[r,c]) with
lse[r] = log sum_c exp(z[r,c]), exactly torch's ``cross_entropy`` with probability
targets; for one-hot or probability rows its gradient is softmax(z) - t. With int64
class targets it is L = sum_r [t[r] != ignore] (lse[r] - z[r, t[r]]) / #{r : t[r] != ignore},
torch's ``cross_entropy`` with ``ignore_index``; every row ignored gives 0/0 = NaN, as torch.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

import sympy as sp

from .. import naming
from ..derive.functions import ClampedLog, Softplus
from ..errors import FormulaError, ShapeError
from ..graph import Graph, Node, sum_index
from ..spec import LossSpec, Where
from .base import Loss, Option, register_loss


def _same_shape(spec: LossSpec, prediction: Node, target: Node) -> None:
    if prediction.shape != target.shape:
        fmt = lambda s: "[" + ", ".join(map(str, s)) + "]"  # noqa: E731
        raise spec.option_where["target"].error(
            f"target {target.name!r} has shape {fmt(target.shape)} but prediction "
            f"{prediction.name!r} has shape {fmt(prediction.shape)}", ShapeError)


def _elementwise_mean(graph: Graph, spec: LossSpec, prediction: Node, target: Node,
                      formula: Any, label: str) -> Node:
    """loss = (1 / numel) * sum over every element of formula(y, t)."""
    _same_shape(spec, prediction, target)
    sums = tuple(sum_index(k) for k in range(prediction.rank))
    y, t = prediction.element(sums), target.element(sums)
    count = sp.Mul(*prediction.shape)
    body = sp.Sum(formula(y, t), *((s, 0, n - 1) for s, n in zip(sums, prediction.shape,
                                                                  strict=True))) / count
    return graph.op("loss", (), body, layer="loss", where=spec.where, kind="reduction",
                    label=label)


@register_loss
class MeanSquaredError(Loss):
    key = "mse"
    doc = "mean over all elements of (y - t)^2"

    @classmethod
    def build(cls, graph: Graph, spec: LossSpec, prediction: Node, target: Node | None) -> Node:
        assert target is not None
        return _elementwise_mean(graph, spec, prediction, target, lambda y, t: (y - t) ** 2,
                                 "mse")

    @classmethod
    def reference(cls, spec: LossSpec, prediction: Any, target: Any) -> Any:
        import torch

        return torch.nn.functional.mse_loss(prediction, target)


@register_loss
class BinaryCrossEntropy(Loss):
    key = "bce"
    doc = ("mean over all elements of -(t log y + (1 - t) log(1 - y)); y are probabilities; "
           "each log is clamped at -100 as in torch")
    target_kind = "probability"
    wants_probability = True

    @classmethod
    def build(cls, graph: Graph, spec: LossSpec, prediction: Node, target: Node | None) -> Node:
        assert target is not None
        return _elementwise_mean(
            graph, spec, prediction, target,
            lambda y, t: -(t * ClampedLog(y) + (1 - t) * ClampedLog(1 - y)), "bce")

    @classmethod
    def reference(cls, spec: LossSpec, prediction: Any, target: Any) -> Any:
        import torch

        return torch.nn.functional.binary_cross_entropy(prediction, target)


@register_loss
class BinaryCrossEntropyWithLogits(Loss):
    key = "bce_with_logits"
    doc = "bce of sigmoid(z), computed stably as softplus(z) - t z"
    target_kind = "probability"

    @classmethod
    def build(cls, graph: Graph, spec: LossSpec, prediction: Node, target: Node | None) -> Node:
        assert target is not None
        return _elementwise_mean(graph, spec, prediction, target,
                                 lambda z, t: Softplus(z) - t * z, "bce_with_logits")

    @classmethod
    def reference(cls, spec: LossSpec, prediction: Any, target: Any) -> Any:
        import torch

        return torch.nn.functional.binary_cross_entropy_with_logits(prediction, target)


@register_loss
class SoftmaxCrossEntropy(Loss):
    key = "softmax_cross_entropy"
    doc = ("mean over rows of sum_c t_c (logsumexp(z) - z_c); t one-hot or probabilities, "
           "or int64 class ids (mean of logsumexp(z) - z_t over the rows not ignored)")
    target_kind = "distribution"
    takes_class_ids = True
    options = {"ignore_index": Option(
        "integer", None, "with int64 class targets: rows whose target is this value count "
        "neither in the sum nor in the mean (default -100, as torch)")}
    test_cases = ({}, {"_int_targets": True}, {"_int_targets": True, "ignore_index": 1})

    @classmethod
    def build(cls, graph: Graph, spec: LossSpec, prediction: Node, target: Node | None) -> Node:
        assert target is not None
        rank = prediction.rank
        ignore = spec.options.get("ignore_index")
        if target.dtype == "int64":
            lse = _logsumexp(graph, spec, prediction)
            return cls._class_targets(graph, spec, prediction, target, lse,
                                      -100 if ignore is None else int(ignore))  # type: ignore[arg-type]
        if ignore is not None:
            raise spec.option_where["ignore_index"].error(
                f"ignore_index applies to integer class targets; {target.name!r} is a float "
                "tensor of probabilities (declare it with dtype: int64 for class ids)")
        _same_shape(spec, prediction, target)
        lse = _logsumexp(graph, spec, prediction)
        sums = tuple(sum_index(k) for k in range(rank))
        rows = sp.Mul(*prediction.shape[:-1])
        per = target.element(sums) * (lse.element(sums[:-1]) - prediction.element(sums))
        body = sp.Sum(per, *((s, 0, n - 1) for s, n in zip(sums, prediction.shape,
                                                           strict=True))) / rows
        return graph.op("loss", (), body, layer="loss", where=spec.where, kind="reduction",
                        label="softmax_cross_entropy")

    @classmethod
    def _class_targets(cls, graph: Graph, spec: LossSpec, prediction: Node, target: Node,
                       lse: Node, ignore: int) -> Node:
        """L = sum over counted rows r of (lse[r] - z[r, t[r]]) / (number of counted rows),
        a row counted when t[r] != ignore: F.cross_entropy with class ids. The picked
        logit is sum_c [c = t[r]] z[r, c], so sympy's derivative is softmax(z) - onehot(t)
        on the counted rows, divided by their number."""
        rows_shape = prediction.shape[:-1]
        if prediction.rank < 2 or target.shape != rows_shape:
            fmt = lambda s: "[" + ", ".join(map(str, s)) + "]"  # noqa: E731
            raise spec.option_where["target"].error(
                f"integer class target {target.name!r} has shape {fmt(target.shape)}; it "
                f"needs the shape of prediction {prediction.name!r} {fmt(prediction.shape)} "
                "without its last (class) axis", ShapeError)
        classes = prediction.shape[-1]
        if not classes.is_Integer:
            raise spec.option_where["prediction"].error(
                f"the class axis of {prediction.name!r} is the symbol {classes}; it needs a "
                "fixed number of classes", ShapeError)
        graph.bound_ids(target, int(classes), f"softmax_cross_entropy over {classes} "
                        f"classes, ignore_index {ignore}", ignore)
        rank = prediction.rank
        idx = tuple(sp.Symbol(f"i{k}", integer=True) for k in range(rank - 1))
        c = sum_index(rank - 1)
        picked_body = sp.Sum(sp.Piecewise((prediction.element((*idx, c)),
                                           sp.Eq(c, target.element(idx))), (0, True)),
                             (c, 0, classes - 1))
        picked = graph.op(naming.loss_part(prediction.name, "picked", graph.nodes), rows_shape,
                          picked_body, layer="loss", where=spec.where, kind="reduction",
                          label="the target class's logit")
        sums = tuple(sum_index(k) for k in range(rank - 1))
        limits = tuple((s, 0, n - 1) for s, n in zip(sums, rows_shape, strict=True))
        counted = sp.Ne(target.element(sums), ignore)
        count = graph.op(naming.loss_part(prediction.name, "count", graph.nodes), (),
                         sp.Sum(sp.Piecewise((1, counted), (0, True)), *limits), layer="loss",
                         where=spec.where, kind="reduction", label="rows counted")
        per = sp.Piecewise((lse.element(sums) - picked.element(sums), counted), (0, True))
        body = sp.Sum(per, *limits) / count.element(())
        return graph.op("loss", (), body, layer="loss", where=spec.where, kind="reduction",
                        label="softmax_cross_entropy")

    @classmethod
    def reference(cls, spec: LossSpec, prediction: Any, target: Any) -> Any:
        import torch

        flat = prediction.reshape(-1, prediction.shape[-1])
        if not target.dtype.is_floating_point:
            ignore = spec.options.get("ignore_index")
            return torch.nn.functional.cross_entropy(
                flat, target.reshape(-1), ignore_index=-100 if ignore is None else ignore)
        return torch.nn.functional.cross_entropy(flat, target.reshape(flat.shape))


def _logsumexp(graph: Graph, spec: LossSpec, prediction: Node) -> Node:
    """lse[r] = log sum_c exp(z[r, c]) over the class axis."""
    rank = prediction.rank
    idx = tuple(sp.Symbol(f"i{k}", integer=True) for k in range(rank - 1))
    c = sum_index(rank - 1)
    body = sp.log(sp.Sum(sp.exp(prediction.element((*idx, c))),
                         (c, 0, prediction.shape[-1] - 1)))
    return graph.op(naming.loss_part(prediction.name, "lse", graph.nodes),
                    prediction.shape[:-1], body, layer="loss", where=spec.where,
                    kind="reduction", label="logsumexp")


@register_loss
class FormulaLoss(Loss):
    """``loss: {formula: "...", prediction: ..., target: ...}``: mean over all elements.

    The formula is elementwise in ``y`` (the prediction) and, if it uses it, ``t`` (the
    target); sympy differentiates it like a built-in. It may also read the network's
    parameters by their dotted names inside a reduction over all their axes
    (``0.01*sum(abs(fc1.weight))``): a penalty. A term of a composite loss that names
    no prediction is such a penalty alone.
    """

    key = "formula"
    doc = ("mean over all elements of a custom formula in y (prediction) and t (target); "
           "parameters by dotted name inside a whole reduction, as sum(abs(fc1.weight))")
    options = {"formula": Option("formula", doc="elementwise loss in y and t")}
    needs_target = False
    test_cases = ({"formula": "log(cosh(y - t))"}, {"formula": "softplus(-y*t) + y**2/8"})

    @classmethod
    def validate(cls, options: Mapping[str, object], wheres: Mapping[str, Where]) -> None:
        from ..formula import AnyParameter, parse_at  # on first use: most specs have none

        parse_at(wheres["formula"], options["formula"], AnyParameter(y=None, t=None))

    @classmethod
    def build(cls, graph: Graph, spec: LossSpec, prediction: Node | None,
              target: Node | None) -> Node:
        from ..formula import parse_at, to_sympy_at
        from .reductions import IndexReducer

        where = spec.option_where["formula"]
        params = {p.param: p for p in graph.params() if p.param is not None}
        names: dict[str, None] = dict.fromkeys(params)
        if prediction is not None:
            names.update(y=None, t=None)
        tree = parse_at(where, spec.options["formula"], names)
        uses_t = any(isinstance(n, ast.Name) and n.id == "t" for n in ast.walk(tree))
        if uses_t and target is None:
            raise where.error("the formula uses t but the loss names no 'target'")
        if target is not None and prediction is not None:
            _same_shape(spec, prediction, target)
        shape = prediction.shape if prediction is not None else ()
        sums = tuple(sum_index(k) for k in range(len(shape)))
        variables: dict[str, sp.Expr] = {}
        own: dict[sp.Symbol, sp.Expr] = {}
        for name, param in params.items():
            # a parameter is read at its own axes, which only a whole reduction sums out
            indices = tuple(graph.reduction_index() for _ in range(param.rank))
            own.update(zip(indices, param.shape, strict=True))
            variables[name] = param.element(indices)
        if prediction is not None:
            variables["y"] = prediction.element(sums)
        if target is not None:
            variables["t"] = target.element(sums)
        reducer = IndexReducer(graph, "loss", spec.where, sums, shape, own)
        value = to_sympy_at(where, tree, variables, reducer)
        if value.free_symbols & set(own):
            raise where.error("a parameter in a loss formula is read inside a reduction over "
                              "all its axes, as sum(abs(fc1.weight))", FormulaError)
        if not sums:
            return graph.op("loss", (), value, layer="loss", where=spec.where,
                            kind="reduction", label="penalty")
        body = sp.Sum(value, *((s, 0, n - 1) for s, n in zip(sums, shape, strict=True)))
        return graph.op("loss", (), body / sp.Mul(*shape), layer="loss",
                        where=spec.where, kind="reduction", label="formula")

    @classmethod
    def reference(cls, spec: LossSpec, prediction: Any, target: Any,
                  params: Mapping[str, Any] | None = None) -> Any:
        from ..formula import AnyParameter, parse_tree, torch_eval

        tree = parse_tree(spec.options["formula"], AnyParameter(y=None, t=None))
        values = dict(params or {})
        if prediction is not None:
            values["y"] = prediction
        if target is not None:
            values["t"] = target
        value = torch_eval(tree, values)
        return value.mean() if prediction is not None else value
