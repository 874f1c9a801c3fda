"""Shape layers: reshape, transpose and einsum (splitting and merging attention heads).

* ``reshape`` regroups the axes row-major (C order, as ``torch.reshape``). In index
  notation it is an affine index map: splitting 32 into 4 x 8 reads
  ``x[i0, i1, 8*i2 + i3]``, merging reads ``x[i0, i1, floor(i2/8), Mod(i2, 8)]``
  (:mod:`symbackprop.derive.radix`). The chain rule's deltas over those indices collapse
  to the reshape back, and lowering prints both as reshape views.
* ``transpose`` permutes every axis: ``out[i0, i1, i2] = x[i0, i2, i1]``.
* ``einsum`` contracts two or more activations by a subscript equation, times an optional
  scale; each operand's gradient is again a contraction (``dL/dq = einsum(g, k)``) whose
  order :mod:`symbackprop.ir.contract` chooses.

Every option that does not fit the input shapes is a spec error at its file:line:col.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import sympy as sp

from ..derive import radix
from ..errors import ShapeError
from ..graph import Graph, Node, out_index, sum_index
from ..spec import LayerSpec, Where
from .base import Layer, Option, register_layer

MAX_RANK = 16

# The size of each dimension symbol in the batch the torch reference runs on (set by
# check.reference_loss): a reshape to [N, T, 4, 8] needs N and T as numbers.
DIMS: ContextVar[Mapping[str, int] | None] = ContextVar("DIMS", default=None)


def _fmt(shape: tuple[sp.Expr, ...] | tuple[object, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# -- reshape --------------------------------------------------------------------------------


def _strides(shape: tuple[sp.Expr, ...]) -> list[sp.Expr]:
    """Row-major place values: the product of the extents after each axis."""
    out: list[sp.Expr] = []
    place: sp.Expr = sp.Integer(1)
    for extent in reversed(shape):
        out.append(place)
        place = place * extent
    return out[::-1]


def regroup(src: tuple[sp.Expr, ...], dst: tuple[sp.Expr, ...]) -> list[sp.Expr] | None:
    """The index of each ``src`` axis read by ``out[i0, i1, ...]`` when ``out`` (shaped
    ``dst``) is ``src`` reshaped row-major; None when the two shapes' place values do not
    form one divisibility chain (a reshape that is no regrouping of axes, such as
    [6, 4] -> [4, 6])."""
    total = sp.Mul(*src)
    chain = radix.chain({*_strides(src), *_strides(dst), sp.sympify(total)})
    if chain is None:
        return None
    rank = {v: n for n, v in enumerate(chain)}
    out: list[sp.Expr] = []
    for a, extent in zip(_strides(src), src, strict=True):
        b = sp.cancel(a * extent)
        index: sp.Expr = sp.Integer(0)
        for j, (c, size) in enumerate(zip(_strides(dst), dst, strict=True)):
            d = sp.cancel(c * size)
            lo = a if rank[a] >= rank[c] else c
            hi = b if rank[b] <= rank[d] else d
            if rank[lo] >= rank[hi]:
                continue
            digit: sp.Expr = out_index(j)
            if lo != c:
                digit = sp.floor(digit / sp.cancel(lo / c))
            if hi != d:
                digit = sp.Mod(digit, sp.cancel(hi / lo))
            index = index + sp.cancel(lo / a) * digit
        out.append(index)
    return out


@register_layer
class Reshape(Layer):
    """out = x regrouped row-major into ``shape`` (torch.reshape)."""

    key = "reshape"
    doc = "row-major reshape (torch.reshape), e.g. [N, T, 32] -> [N, T, 4, 8]"
    options = {
        "shape": Option("list", doc="the new shape: positive integers, dimension symbols "
                        "of the inputs (N, T) and at most one -1 (the rest of the "
                        "elements)"),
    }
    test_cases = (
        {"shape": ["N", 3, 2], "_input": ["N", 3], "_branches": {"b0": 6}, "_target": ["N", 3]},
        {"shape": ["N", -1], "_input": ["N", 2, 3], "_target": ["N"]},
        {"shape": ["N", 2, 6], "_input": ["N", 4, 3], "_branches": {"b0": 3},
         "_target": ["N", 2]},
        {"shape": ["N", 1, 3], "_target": ["N", 1]},
    )

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        shape = options["shape"]
        where = wheres["shape"]
        assert isinstance(shape, tuple)
        if len(shape) > MAX_RANK:
            raise where.error(f"a shape has at most {MAX_RANK} axes")
        for entry in shape:
            if isinstance(entry, bool) or not isinstance(entry, int | str):
                raise where.error(f"a reshape entry is a positive integer, a dimension "
                                  f"symbol or -1, not {entry!r}")
            if isinstance(entry, int) and entry != -1 and not 1 <= entry <= 1 << 24:
                raise where.error(f"reshape entry {entry} is out of range (positive, or -1)")
        if sum(entry == -1 for entry in shape) > 1:
            raise where.error("at most one reshape entry may be -1")

    @classmethod
    def target_shape(cls, graph: Graph, spec: LayerSpec, x: Node) -> tuple[sp.Expr, ...]:
        where = spec.option_where["shape"]
        entries: list[sp.Expr | None] = []
        for entry in spec.options["shape"]:  # type: ignore[union-attr]
            if entry == -1:
                entries.append(None)
            elif isinstance(entry, int):
                entries.append(sp.Integer(entry))
            else:
                # the generated forward() reads each size off an input (targets are
                # not passed to it)
                known = [d for d, sym in graph.dims.items() if any(
                    sym in n.shape for n in graph.nodes.values() if n.role == "input")]
                if entry not in known:
                    raise where.error(f"reshape entry {entry!r} is not a dimension of the "
                                      f"network's inputs ({', '.join(known) or 'none'})",
                                      ShapeError)
                entries.append(graph.dims[entry])
        total = sp.Mul(*x.shape)
        known = sp.Mul(*(e for e in entries if e is not None))
        if None in entries:
            rest = sp.cancel(total / known)
            if not radix.divides(sp.Integer(1), rest):
                raise where.error(f"cannot reshape {x.name!r} {_fmt(x.shape)} "
                                  f"({total} elements) to {_fmt(spec.options['shape'])}: "
                                  f"{total} is not a multiple of {known}", ShapeError)
            entries = [rest if e is None else e for e in entries]
        elif sp.cancel(total - known) != 0:
            raise where.error(f"cannot reshape {x.name!r} {_fmt(x.shape)} ({total} elements) "
                              f"to {_fmt(spec.options['shape'])} ({known} elements)",
                              ShapeError)
        return tuple(entries)  # type: ignore[arg-type]

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        shape = cls.target_shape(graph, spec, x)
        indices = regroup(x.shape, shape)
        if indices is None:
            raise spec.option_where["shape"].error(
                f"cannot reshape {x.name!r} {_fmt(x.shape)} to {_fmt(shape)}: only reshapes "
                "that split or merge neighbouring axes are supported", ShapeError)
        node = graph.op(spec.name, shape, x.element(tuple(indices)), layer=spec.name,
                        where=spec.where, label="reshape")
        node.meta["standalone"] = True
        return node

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        sizes = DIMS.get() or {}
        shape = [sizes[e] if isinstance(e, str) else e
                 for e in spec.options["shape"]]  # type: ignore[union-attr]
        return inputs[0].reshape(shape)


# -- transpose ------------------------------------------------------------------------------


@register_layer
class Transpose(Layer):
    """out = x with its axes permuted (torch.permute)."""

    key = "transpose"
    doc = "permute every axis (torch.permute), e.g. axes [0, 2, 1, 3]"
    options = {"axes": Option("list", doc="a permutation of 0 .. rank-1: output axis j is "
                              "input axis axes[j]")}
    test_cases = ({"axes": [0, 2, 1], "_input": ["N", 3, 3]},
                  {"axes": [1, 0], "_input": [3, 3]},
                  {"axes": [2, 0, 1, 3], "_input": [3, "N", 3, 3], "_target": [3, 3, "N"]})

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        axes = options["axes"]
        assert isinstance(axes, tuple)
        if any(isinstance(a, bool) or not isinstance(a, int) for a in axes) \
                or sorted(axes) != list(range(len(axes))):  # type: ignore[type-var]
            raise wheres["axes"].error(f"axes must be a permutation of 0 .. {len(axes) - 1}, "
                                       f"got {list(axes)}")

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        axes: tuple[int, ...] = spec.options["axes"]  # type: ignore[assignment]
        if len(axes) != x.rank:
            raise spec.option_where["axes"].error(
                f"axes {list(axes)} must permute all {x.rank} axes of {x.name!r} "
                f"{_fmt(x.shape)}", ShapeError)
        index: list[sp.Expr] = [sp.Integer(0)] * x.rank
        for j, a in enumerate(axes):
            index[a] = out_index(j)
        return graph.op(spec.name, tuple(x.shape[a] for a in axes), x.element(tuple(index)),
                        layer=spec.name, where=spec.where, label="transpose")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        return inputs[0].permute(*spec.options["axes"])  # type: ignore[misc]


# -- einsum ---------------------------------------------------------------------------------


def parse_equation(equation: str, operands: int, where: Where) -> tuple[list[str], str]:
    """``"nhtd,nhsd->nhts"`` -> (["nhtd", "nhsd"], "nhts"), strictly checked."""
    if "..." in equation:
        raise where.error("einsum: '...' (broadcast dimensions) is not supported; name "
                          "every axis")
    if equation.count("->") != 1:
        raise where.error("einsum: the equation needs exactly one '->' before the output "
                          "subscript, as 'ij,jk->ik'")
    left, out = equation.split("->")
    subs = left.split(",")
    for sub in (*subs, out):
        bad = [c for c in sub if not ("a" <= c <= "z" or "A" <= c <= "Z")]
        if bad:
            raise where.error(f"einsum: subscripts are ASCII letters only, got {bad[0]!r} "
                              f"in {equation!r}")
    if len(subs) != operands:
        raise where.error(f"einsum: the equation has {len(subs)} input subscript(s) for "
                          f"{operands} input(s)")
    for sub in subs:
        if not sub:
            raise where.error("einsum: an empty input subscript (a 0-d input) is not "
                              "supported")
        repeated = sorted({c for c in sub if sub.count(c) > 1})
        if repeated:
            raise where.error(f"einsum: letter {repeated[0]!r} repeats in the input "
                              f"subscript {sub!r} (a diagonal is not supported)")
    if not out:
        raise where.error("einsum: an empty output subscript (a 0-d result) is not "
                          "supported; keep at least one axis")
    repeated = sorted({c for c in out if out.count(c) > 1})
    if repeated:
        raise where.error(f"einsum: letter {repeated[0]!r} repeats in the output {out!r}")
    missing = [c for c in out if c not in left]
    if missing:
        raise where.error(f"einsum: output letter {missing[0]!r} appears in no input")
    return subs, out


@register_layer
class Einsum(Layer):
    """out = scale * einsum(equation, a, b, ...) (torch.einsum)."""

    key = "einsum"
    doc = "contraction of two or more tensors by an equation (torch.einsum), times scale"
    arity = (2, None)
    options = {
        "equation": Option("text", doc="subscripts such as 'nhtd,nhsd->nhts': one "
                           "letter per axis of each input, explicit output after '->'"),
        "scale": Option("float", 1.0, "constant factor applied to the result"),
    }
    test_cases = (
        {"equation": "ntc,nsc->nts", "scale": 0.5, "_input": ["N", 2, 3]},
        {"equation": "ni,nj->nij", "_branches": {"b0": 3, "b1": 2}, "_target": ["N", 3]},
        {"equation": "ni,nj,nk->nk", "_branches": {"b0": 2, "b1": 3, "b2": 4}},
        {"equation": "ntc,ntc->nt", "_input": ["N", 2, 3], "_target": ["N"]},
    )

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        parse_equation(str(options["equation"]), len(inputs), wheres["equation"])

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        where = spec.option_where["equation"]
        subs, out = parse_equation(str(spec.options["equation"]), len(inputs), where)
        extent: dict[str, sp.Expr] = {}
        for sub, node in zip(subs, inputs, strict=True):
            if len(sub) != node.rank:
                raise where.error(f"einsum: subscript {sub!r} has {len(sub)} letters but "
                                  f"{node.name!r} {_fmt(node.shape)} has {node.rank} axes",
                                  ShapeError)
            for letter, size in zip(sub, node.shape, strict=True):
                if extent.setdefault(letter, size) != size:
                    raise where.error(f"einsum: letter {letter!r} is {extent[letter]} in one "
                                      f"input and {size} in {node.name!r}", ShapeError)
        index: dict[str, sp.Symbol] = {c: out_index(n) for n, c in enumerate(out)}
        summed = [c for c in dict.fromkeys("".join(subs)) if c not in index]
        index.update({c: sum_index(n) for n, c in enumerate(summed)})
        product = sp.Mul(*(node.element(tuple(index[c] for c in sub))
                           for sub, node in zip(subs, inputs, strict=True)))
        body: sp.Expr = product
        if summed:
            body = sp.Sum(product, *((index[c], 0, extent[c] - 1) for c in summed))
        scale = float(spec.options["scale"])  # type: ignore[arg-type]
        if scale != 1.0:
            body = sp.Float(scale) * body
        return graph.op(spec.name, tuple(extent[c] for c in out), body, layer=spec.name,
                        where=spec.where, kind="contraction" if summed else "map",
                        label="einsum")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        out = torch.einsum(str(spec.options["equation"]), *inputs)
        return out * float(spec.options["scale"])  # type: ignore[arg-type]
