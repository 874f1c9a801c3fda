"""Embedding lookups: ``embedding`` (rows of a table picked by integer ids) and
``position_embedding`` (rows 0..T-1 of a table, one per position, shared by the batch).

Both read their table through an integer array, ``E[ids[n, t], d]``: the lowering turns
that into a gather forward (``E[ids]``), and sympy's derivative of it,
``dL/dE[k, d] = sum_{n,t} g[n, t, d] delta(ids[n, t], k)``, into a scatter-add backward
(rows added at their ids, repeated ids summed). A position embedding gathers at the
integer positions ``0..T-1`` (an integer op of the graph), so its gradient is the same
scatter-add of the batch-summed adjoint.

Ids must be an ``int64`` input (a spec error otherwise); the generated modules check at
run time that every id lies in ``[0, num)`` and that ``T`` does not exceed ``max_len``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp

from .. import naming
from ..errors import ShapeError
from ..graph import Graph, Node, out_index
from ..spec import LayerSpec, Where
from .base import Layer, Option, Param, register_layer

# GPT-2's initialisation of its token and position tables (torch.nn.Embedding's own
# default is N(0, 1)); ``init_std`` sets another.
DEFAULT_STD = 0.02


def _ids(spec: LayerSpec, node: Node) -> Node:
    """The layer's input, which must be an integer tensor of ids."""
    if node.dtype != "int64":
        raise spec.option_where.get("input", spec.where).error(
            f"{spec.type} {spec.name!r} reads {node.name!r}, a float tensor; its input must "
            f"be integer ids (declare it as {{shape: [...], dtype: int64}} under inputs)",
            ShapeError)
    return node


def _check_std(options: Mapping[str, object], wheres: Mapping[str, Where]) -> None:
    if float(options["init_std"]) <= 0:  # type: ignore[arg-type]
        raise wheres["init_std"].error("init_std must be positive")


def _table(cls: type[Layer], graph: Graph, spec: LayerSpec, rows: int, dim: int) -> Node:
    table = cls.param(graph, spec, "weight", (sp.Integer(rows), sp.Integer(dim)))
    table.init = ("normal", float(spec.options["init_std"]))  # type: ignore[arg-type]
    return table


@register_layer
class Embedding(Layer):
    """out[..., d] = weight[ids[...], d] (torch.nn.Embedding)."""

    key = "embedding"
    doc = ("rows of a num x dim table picked by integer ids: out[..., d] = weight[ids[...], d] "
           "(torch.nn.Embedding)")
    options = {
        "num": Option("units", doc="number of rows (the vocabulary size); ids lie in [0, num)"),
        "dim": Option("units", doc="width of each row"),
        "init_std": Option("float", DEFAULT_STD, "weight initialised from N(0, init_std^2)"),
    }
    params = {"weight": Param("num x dim, as torch.nn.Embedding", "normal", DEFAULT_STD)}
    takes_ids = True
    test_cases = (
        {"num": 5, "dim": 3, "_ids": ["N", 4]},
        {"num": 7, "dim": 2, "init_std": 0.5, "_ids": ["N"]},
        {"num": 4, "dim": 3, "_ids": ["N", 2, 3]},
    )

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        _check_std(options, wheres)

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        ids = _ids(spec, inputs[0])
        num, dim = int(spec.options["num"]), int(spec.options["dim"])  # type: ignore[arg-type]
        table = _table(cls, graph, spec, num, dim)
        graph.bound_ids(ids, num, f"the embedding {spec.name!r} has num = {num}")
        idx = tuple(out_index(k) for k in range(ids.rank + 1))
        body = table.element((ids.element(idx[:-1]), idx[-1]))
        return graph.op(spec.name, (*ids.shape, sp.Integer(dim)), body, layer=spec.name,
                        where=spec.where, label="embedding")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        weight = params[spec.param_name("weight")]
        return torch.nn.functional.embedding(inputs[0], weight)


@register_layer
class PositionEmbedding(Layer):
    """out[..., t, d] = weight[t, d] for t < T, the same rows for every batch entry."""

    key = "position_embedding"
    doc = ("rows 0..T-1 of a max_len x dim table, one per position of the ids' last axis "
           "(length T), broadcast over the other axes: out[..., t, d] = weight[t, d]")
    options = {
        "max_len": Option("units", doc="number of rows: the longest sequence (T <= max_len)"),
        "dim": Option("units", doc="width of each row"),
        "init_std": Option("float", DEFAULT_STD, "weight initialised from N(0, init_std^2)"),
    }
    params = {"weight": Param("max_len x dim", "normal", DEFAULT_STD)}
    takes_ids = True
    test_cases = (
        {"max_len": 6, "dim": 3, "_ids": ["N", "T"], "_dims": {"T": 4}},
        {"max_len": 5, "dim": 2, "_ids": ["N", 3]},
    )

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        _check_std(options, wheres)

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        ids = _ids(spec, inputs[0])
        max_len, dim = int(spec.options["max_len"]), int(spec.options["dim"])  # type: ignore[arg-type]
        length = ids.shape[-1]
        where = spec.option_where["max_len"]
        if length.is_Integer and int(length) > max_len:
            raise where.error(f"{ids.name!r} has {length} positions, more than max_len = "
                              f"{max_len}", ShapeError)
        if length.is_Symbol:
            declared = graph.declared_max.get(length.name)
            if declared is not None and declared > max_len:
                raise where.error(f"{length} may be up to {declared} (dims), more than "
                                  f"max_len = {max_len}", ShapeError)
            graph.bound_dim(length, max_len, f"max_len = {max_len} of the position "
                                             f"embedding {spec.name!r}")
        table = _table(cls, graph, spec, max_len, dim)
        # positions[t] = t: integer ids 0..T-1, read like an embedding's ids
        t = out_index(0)
        positions = graph.op(naming.positions(spec.name), (length,), t, layer=spec.name,
                             where=spec.where, label="positions")
        positions.dtype = "int64"
        idx = tuple(out_index(k) for k in range(ids.rank + 1))
        body = table.element((positions.element((idx[-2],)), idx[-1]))
        return graph.op(spec.name, (*ids.shape, sp.Integer(dim)), body, layer=spec.name,
                        where=spec.where, label="position_embedding")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        ids = inputs[0]
        weight = params[spec.param_name("weight")]
        table = torch.nn.functional.embedding(torch.arange(ids.shape[-1]), weight)
        return table.expand(*ids.shape, weight.shape[1])
