"""Convolutions and poolings (torch layouts NCL / NCHW), as affine indices.

A convolution reads its input at ``stride * i + a - padding`` along each spatial axis,
``i`` the output position and ``a`` the kernel tap, and treats a read outside the input
as zero (the padding)::

    z[n, o, i, j] = sum_{c, a, b} W[o, c, a, b] x[n, c, s i + a - p, s j + b - p] + bias[o]

Nothing is unfolded before the derivation sees it (no im2col). The chain rule then
gives, with no rule written for convolutions:

* dL/dW[o, c, a, b] = sum_{n, i, j} g[n, o, i, j] x[n, c, s i + a - p, s j + b - p]: a
  correlation of the input with the output's adjoint g;
* dL/dx[n, c, h, w] = sum_{o, i, j, a, b} g[n, o, i, j] W[o, c, a, b]
  [s i + a - p = h] [s j + b - p = w]: every tap's product added back where it was read,
  a full convolution of g with the flipped kernel. The deltas stay in the derivative
  (no one index solves them); lowering makes the sum a window-add
  (:class:`~symbackprop.ir.nodes.WindowAdd`).

Pooling windows are the same reads without weights. ``avgpool2d`` is their mean;
``maxpool2d`` is the max reduction of :mod:`.reductions` over the window with torch's
rule for ties: the maximum, the position of each window's first maximum (row-major, as
``torch.nn.MaxPool2d`` returns it), the one-hot ties ``e`` at that position, and the value
``sum(x e)``, so its gradient goes to that one arg-max, as in torch.

Output sizes follow torch: ``floor((L + 2p - k) / s) + 1`` (pooling: p = 0, stride
defaults to the kernel, floor mode). The spatial sizes must be numbers; every size that
does not fit is a spec error at the option's file:line:col.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import sympy as sp

from ..errors import ShapeError
from ..graph import Graph, Node, out_index, sum_index
from ..spec import LayerSpec, Where
from .base import (
    Layer,
    Note,
    Option,
    Param,
    refuse_trainable_bias_without_bias,
    register_layer,
)
from .reductions import computed_as_maximum, max_over


def _per_axis(value: object, dims: int) -> tuple[int, ...]:
    if isinstance(value, tuple):
        return tuple(int(v) for v in value)
    return (int(value),) * dims  # type: ignore[call-overload]


def _fmt(shape: tuple[sp.Expr, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _yaml(value: object) -> str:
    """An option's value as the spec wrote it: 2, or [1, 0]."""
    return _fmt(value) if isinstance(value, tuple) else str(value)  # type: ignore[arg-type]


_AXES = {1: ("length",), 2: ("height", "width")}


class _Windowed(Layer):
    """What convolutions and poolings share: the options' checks and the output sizes."""

    dims: ClassVar[int] = 2
    stride_is_kernel: ClassVar[bool] = False  # the stride when none is given

    @classmethod
    def _check_sizes(cls, options: Mapping[str, object], wheres: Mapping[str, Where]) -> None:
        for key, least in (("kernel", 1), ("stride", 1), ("padding", 0)):
            value = options.get(key)
            if key not in options or value is None:
                continue
            if isinstance(value, tuple) and len(value) != cls.dims:
                raise wheres[key].error(f"{key} has {cls.dims} entr"
                                        f"{'y' if cls.dims == 1 else 'ies'} for "
                                        f"{cls.key}, got {len(value)}")
            if any(v < least for v in _per_axis(value, cls.dims)):
                raise wheres[key].error(f"{key} must be at least {least}, got {_yaml(value)}")

    @classmethod
    def geometry(cls, spec: LayerSpec, x: Node
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(kernel, stride, padding, output size) per spatial axis; a spec error where
        the input does not fit."""
        where = spec.option_where.get("input", spec.where)
        rank = cls.dims + 2
        if x.rank != rank:
            layout = "N, C, L" if cls.dims == 1 else "N, C, H, W"
            raise where.error(f"{cls.key} takes a rank-{rank} input [{layout}], got "
                              f"{x.name!r} {_fmt(x.shape)}", ShapeError)
        spatial = x.shape[2:]
        if not all(n.is_Integer for n in (x.shape[1], *spatial)):
            raise where.error(f"{cls.key} needs numbers for the channels and spatial sizes "
                              f"of {x.name!r} {_fmt(x.shape)}", ShapeError)
        kernel = _per_axis(spec.options["kernel"], cls.dims)
        stride_option = spec.options.get("stride")
        if stride_option is None:  # a pooling's default: the kernel; a convolution's: 1
            stride = kernel if cls.stride_is_kernel else (1,) * cls.dims
        else:
            stride = _per_axis(stride_option, cls.dims)
        padding = _per_axis(spec.options.get("padding") or 0, cls.dims)
        out: list[int] = []
        for axis, n, k, s, p in zip(_AXES[cls.dims], spatial, kernel, stride, padding,
                                    strict=True):
            if p > k - 1:
                # every output of a larger padding would read zeros only at the border
                raise spec.option_where.get("padding", spec.where).error(
                    f"padding {p} is more than the kernel {k} minus 1 (the {axis})",
                    ShapeError)
            if int(n) + 2 * p < k:
                raise spec.option_where.get("kernel", spec.where).error(
                    f"kernel {k} is larger than the {axis} {n} of the input {x.name!r} "
                    f"{_fmt(x.shape)}" + (f" padded by {p} on each side" if p else ""),
                    ShapeError)
            out.append((int(n) + 2 * p - k) // s + 1)
        return kernel, stride, padding, tuple(out)

    @staticmethod
    def read(x: Node, n: sp.Expr, c: sp.Expr, positions: tuple[sp.Symbol, ...],
             taps: tuple[sp.Symbol, ...], stride: tuple[int, ...],
             padding: tuple[int, ...]) -> sp.Expr:
        """``x[n, c, s i + a - p, ...]``: the input under the window at the positions."""
        return x.element((n, c, *(s * i + a - p for i, a, s, p in
                                   zip(positions, taps, stride, padding, strict=True))))


class _Conv(_Windowed):
    params = {
        "weight": Param("out x in x kernel, as torch.nn.Conv", "uniform_fan_in"),
        "bias": Param("one per output channel", "uniform_fan_in"),
    }

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        cls._check_sizes(options, wheres)
        refuse_trainable_bias_without_bias(options, wheres)

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        kernel, stride, padding, size = cls.geometry(spec, x)
        channels = int(x.shape[1])
        units = int(spec.options["channels"])  # type: ignore[arg-type]
        fan_in = channels * int(sp.Mul(*kernel))
        weight = cls.param(graph, spec, "weight",
                           (sp.Integer(units), sp.Integer(channels),
                            *(sp.Integer(k) for k in kernel)), fan_in)
        idx = tuple(out_index(k) for k in range(x.rank))
        c = sum_index(0)
        taps = tuple(sum_index(1 + d) for d in range(cls.dims))
        body: sp.Expr = sp.Sum(
            weight.element((idx[1], c, *taps))
            * cls.read(x, idx[0], c, idx[2:], taps, stride, padding),
            (c, 0, channels - 1), *((a, 0, k - 1) for a, k in zip(taps, kernel, strict=True)))
        if spec.options["bias"]:
            bias = cls.param(graph, spec, "bias", (sp.Integer(units),), fan_in)
            body = body + bias.element((idx[1],))
        label = (f"{cls.key} {units} x {channels} x {' x '.join(map(str, kernel))}, stride "
                 f"{', '.join(map(str, stride))}, padding {', '.join(map(str, padding))}")
        return graph.op(spec.name, (x.shape[0], sp.Integer(units),
                                    *(sp.Integer(n) for n in size)),
                        body, layer=spec.name, where=spec.where, kind="contraction",
                        label=label)

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        weight = params[spec.param_name("weight")]
        bias = params[spec.param_name("bias")] if spec.options["bias"] else None
        conv = (torch.nn.functional.conv1d if cls.dims == 1
                else torch.nn.functional.conv2d)
        return conv(inputs[0], weight, bias,
                    stride=_per_axis(spec.options["stride"] or 1, cls.dims),
                    padding=_per_axis(spec.options["padding"] or 0, cls.dims))

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        if cls.dims == 1:
            read = r"x_{n,c,\,s i + a - p}"
            gw = (r"\frac{\partial L}{\partial W_{o,c,a}}",
                  r"= \sum_{n,i} \delta_{n,o,i}\, x_{n,c,\,s i + a - p}")
            gx = (r"\frac{\partial L}{\partial x_{n,c,h}}",
                  r"= \sum_{o} \sum_{a} W_{o,c,a}\, \delta_{n,o,\,(h + p - a)/s}")
        else:
            read = r"x_{n,c,\,s i + a - p,\,s j + b - p}"
            gw = (r"\frac{\partial L}{\partial W_{o,c,a,b}}",
                  r"= \sum_{n,i,j} \delta_{n,o,i,j}\, x_{n,c,\,s i + a - p,\,s j + b - p}")
            gx = (r"\frac{\partial L}{\partial x_{n,c,h,w}}",
                  r"= \sum_{o} \sum_{a,b} W_{o,c,a,b}\, "
                  r"\delta_{n,o,\,(h + p - a)/s,\,(w + p - b)/s}")
        return ((
            "Convolution, collected (indices from 0 here, as in the code: s the stride, p "
            "the padding). The layer reads ", read,
            " (zero outside the input: the padding). The weight's gradient is a "
            "correlation of the input with the output's adjoint ", r"\delta",
            "; the input's gradient adds each tap's product back where it was read, a "
            "full convolution of ", r"\delta", " with the flipped kernel, over the taps ",
            "a", " for which ", r"(h + p - a)/s", " is a whole number and an output "
            "position:"), (gw, gx))


_CONV_OPTIONS = {
    "channels": Option("units", doc="output channels"),
    "kernel": Option("size", doc="kernel size: one number, or one per spatial axis"),
    "stride": Option("size", 1, "step between windows (default 1)"),
    "padding": Option("size", 0, "zeros added on both sides of each spatial axis "
                      "(default 0, at most kernel - 1)"),
    "bias": Option("bool", True, "learn an additive bias per output channel"),
}


@register_layer
class Conv1d(_Conv):
    """torch.nn.Conv1d on [N, C, L]: weight out x in x k."""

    key = "conv1d"
    doc = ("1-D convolution on [N, C, L] (torch.nn.Conv1d): z[n,o,i] = sum_{c,a} "
           "W[o,c,a] x[n,c,s*i+a-p] + b[o]")
    dims = 1
    options = _CONV_OPTIONS
    test_cases = (
        {"channels": 2, "kernel": 2, "_input": ["N", 2, 3], "_target": ["N", 2]},
        {"channels": 3, "kernel": 3, "stride": 2, "padding": 1, "_input": ["N", 2, 3],
         "_target": ["N", 3]},
        {"channels": 2, "kernel": 1, "bias": False, "_input": ["N", 3, 3],
         "_target": ["N", 2]},
    )


@register_layer
class Conv2d(_Conv):
    """torch.nn.Conv2d on [N, C, H, W]: weight out x in x kh x kw."""

    key = "conv2d"
    doc = ("2-D convolution on [N, C, H, W] (torch.nn.Conv2d): z[n,o,i,j] = "
           "sum_{c,a,b} W[o,c,a,b] x[n,c,s*i+a-p,s*j+b-p] + b[o]")
    dims = 2
    options = _CONV_OPTIONS
    test_cases = (
        {"channels": 2, "kernel": 2, "_input": ["N", 2, 3, 3], "_target": ["N", 2, 2]},
        {"channels": 2, "kernel": 3, "padding": 1, "_input": ["N", 1, 4, 3],
         "_target": ["N", 2, 4]},
        {"channels": 3, "kernel": [3, 2], "stride": [2, 1], "padding": [1, 0],
         "_input": ["N", 2, 5, 3], "_target": ["N", 3, 3]},
        {"channels": 2, "kernel": 2, "stride": 2, "bias": False, "_input": ["N", 2, 4, 3],
         "_target": ["N", 2, 2]},
        {"channels": 2, "kernel": 3, "stride": 2, "padding": 1, "trainable": {"bias": False},
         "_input": ["N", 2, 5, 3], "_target": ["N", 2, 3]},
        {"channels": 2, "kernel": 3, "padding": 2, "_input": ["N", 1, 3, 3],
         "_target": ["N", 2, 5]},
    )


class _Pool(_Windowed):
    stride_is_kernel = True
    options = {
        "kernel": Option("size", doc="window size: one number, or one per spatial axis"),
        "stride": Option("size", None, "step between windows (default: the kernel)"),
    }

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        cls._check_sizes(options, wheres)

    @classmethod
    def windows(cls, spec: LayerSpec, x: Node
                ) -> tuple[sp.Expr, tuple[tuple[sp.Symbol, sp.Integer, sp.Integer], ...],
                           tuple[sp.Expr, ...], tuple[int, ...]]:
        """(the windowed read, the taps' limits, the output shape, the kernel)."""
        kernel, stride, padding, size = cls.geometry(spec, x)
        idx = tuple(out_index(k) for k in range(x.rank))
        taps = tuple(sum_index(d) for d in range(cls.dims))
        read = cls.read(x, idx[0], idx[1], idx[2:], taps, stride, padding)
        limits = tuple((a, sp.Integer(0), sp.Integer(k - 1))
                       for a, k in zip(taps, kernel, strict=True))
        return read, limits, (*x.shape[:2], *(sp.Integer(n) for n in size)), kernel

    @classmethod
    def _torch_args(cls, spec: LayerSpec) -> dict[str, Any]:
        kernel = _per_axis(spec.options["kernel"], cls.dims)
        stride = spec.options["stride"]
        return {"kernel_size": kernel,
                "stride": kernel if stride is None else _per_axis(stride, cls.dims)}


@register_layer
class MaxPool2d(_Pool):
    """torch.nn.MaxPool2d (floor mode, no padding) on [N, C, H, W]."""

    key = "maxpool2d"
    doc = ("2-D max pooling on [N, C, H, W] (torch.nn.MaxPool2d, floor mode): the maximum "
           "of each window; the gradient goes to its arg-max")
    test_cases = (
        {"kernel": 2, "_input": ["N", 2, 4, 3], "_target": ["N", 2, 2]},
        {"kernel": 2, "_input": ["N", 1, 5, 3], "_target": ["N", 1, 2]},
        {"kernel": [3, 2], "stride": [2, 1], "_input": ["N", 2, 5, 3], "_target": ["N", 2, 2]},
    )

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        read, limits, shape, kernel = cls.windows(spec, x)
        label = f"max over each {' x '.join(map(str, kernel))} window"
        # the flat position h * W + w of the element each tap reads
        first_at = sp.Integer(0)
        for index, size in zip(read.indices[2:], x.shape[2:], strict=True):
            first_at = first_at * size + index
        # the ties as [N, C, i, a, j, b]: each window's taps beside its position
        body = max_over(graph, spec.name, spec.where, 1, read, list(limits), shape, label,
                        after=tuple(range(2, 2 + cls.dims)), first_at=first_at)
        node = graph.op(spec.name, shape, body, layer=spec.name, where=spec.where,
                        kind="reduction", label=label)
        computed_as_maximum(node, spec.name, 1)
        return node

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        return torch.nn.functional.max_pool2d(inputs[0], **cls._torch_args(spec))

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        return ((
            "Max pooling, collected (indices from 0 here, as in the code). With ",
            r"q_{n,c,i,j}", " the position (row-major, ", r"h W + w", ") of each window's "
            "first maximum, as torch picks it, and ",
            r"e_{n,c,i,a,j,b} = [q_{n,c,i,j} = (s i + a) W + s j + b]",
            " its one-hot (no gradient flows through either), the layer's value is ",
            r"\sum_{a,b} x\, e", ", so the adjoint ", r"\delta",
            " is routed to that one arg-max of each window and added where windows "
            "overlap:"),
            ((r"\frac{\partial L}{\partial x_{n,c,h,w}}",
              r"= \sum_{i,j\,:\; q_{n,c,i,j} = h W + w} \delta_{n,c,i,j}"),))


@register_layer
class AvgPool2d(_Pool):
    """torch.nn.AvgPool2d (floor mode, no padding) on [N, C, H, W]."""

    key = "avgpool2d"
    doc = ("2-D average pooling on [N, C, H, W] (torch.nn.AvgPool2d, floor mode): the mean "
           "of each window")
    test_cases = (
        {"kernel": 2, "_input": ["N", 2, 4, 3], "_target": ["N", 2, 2]},
        {"kernel": [2, 3], "stride": 1, "_input": ["N", 1, 5, 4], "_target": ["N", 1, 4]},
        {"kernel": 2, "stride": [2, 1], "_input": ["N", 2, 5, 3], "_target": ["N", 2, 2]},
    )

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        read, limits, shape, kernel = cls.windows(spec, x)
        area = int(sp.Mul(*kernel))
        return graph.op(spec.name, shape, sp.Sum(read, *limits) / area, layer=spec.name,
                        where=spec.where, kind="reduction",
                        label=f"mean over each {' x '.join(map(str, kernel))} window")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        return torch.nn.functional.avg_pool2d(inputs[0], **cls._torch_args(spec))

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        return ((
            "Average pooling, collected (indices from 0 here, as in the code). Each "
            "window's mean spreads its adjoint evenly "
            "over the window's ", r"k_{h} k_{w}", " entries, added where windows overlap:"),
            ((r"\frac{\partial L}{\partial x_{n,c,h,w}}",
              r"= \frac{1}{k_{h} k_{w}} \sum_{i,j\,:\; 0 \le h - s i < k_{h},\; "
              r"0 \le w - s j < k_{w}} \delta_{n,c,i,j}"),))
