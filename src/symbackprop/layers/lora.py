"""Low-rank adapters (LoRA) and shared parameters, for any layer with a linear map.

A layer with a weight W (out x in) that takes ``lora: {rank: r, alpha: a}`` gains two
parameters, ``<prefix>.lora_A`` (r x in, kaiming-uniform as peft draws it:
U(-1/sqrt(in), 1/sqrt(in))) and ``<prefix>.lora_B`` (out x r, zeros), and its output gains
``(a / r) * (x A^T) B^T``, computed as peft does through the narrow node
``u = (a / r) x A^T`` (N x r, named ``<prefix>_lora_xA``) and then ``u B^T``, added to
the base map ``z0 = x W^T + b`` (its own node, ``<prefix>_base``, so each product takes
its addend in one fused op: torch ``addmm``, numpy's in-place add). Every
product of the step and of its gradients is N x r wide at most (N*r*in + N*r*out
multiply-adds), never B A (out x in) and never an N x out x in x r product. The
layer's own weight and bias are frozen by default (what LoRA fine-tuning means),
unless its ``trainable`` option says otherwise; a frozen parameter gets no gradient
code. ``prefix`` is the layer's name for ``dense`` and, for a composite layer, the
projection's dotted name (``attn.c_attn``), so one adapter helper serves every
projection.

A layer may also take another layer's parameter instead of declaring its own
(``weight: wte.weight``): the graph then holds one parameter node read by both layers,
so backprop sums the two contributions into one gradient, and the parameter appears once
in ``PARAM_SHAPES`` and the state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sympy as sp

from .. import naming
from ..errors import GraphError, ShapeError
from ..graph import Graph, Node, sum_index
from ..spec import LayerSpec, Where
from .base import Option, Param

LORA_KEYS = ("rank", "alpha")
LORA_OPTION = Option(
    "mapping", None, "low-rank adapter {rank: r, alpha: a}: adds lora_A (r x in) and "
    "lora_B (out x r) and (a/r) x A^T B^T to the output, freezing the base weight and "
    "bias unless `trainable` says otherwise (default: none)", choices=LORA_KEYS)
LORA_PARAMS = {
    "lora_A": Param("rank x in, kaiming-uniform as peft (U(+-1/sqrt(in)))", "uniform_fan_in"),
    "lora_B": Param("out x rank, zeros (the adapter starts as the identity change)", "zeros"),
}
MAX_RANK = 1 << 16


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float

    @property
    def scale(self) -> sp.Expr:
        """alpha / rank, exact: a rational when alpha is a whole number."""
        alpha = sp.Integer(int(self.alpha)) if float(self.alpha).is_integer() else sp.Float(
            self.alpha, 17)
        return alpha / sp.Integer(self.rank)


def lora_config(options: Mapping[str, object], key: str = "lora") -> LoraConfig | None:
    """The validated adapter of a layer's options, or None without one."""
    value = options.get(key)
    if value is None:
        return None
    given = dict(value)  # type: ignore[call-overload]
    return LoraConfig(int(given["rank"]), float(given["alpha"]))


def validate_lora(options: Mapping[str, object], wheres: Mapping[str, Where],
                  key: str = "lora") -> None:
    """rank a positive integer, alpha a positive finite number (both required: the
    scale alpha / rank is the adapter's learning-rate knob, so it is never guessed)."""
    value = options.get(key)
    if value is None:
        return
    given = dict(value)  # type: ignore[call-overload]
    if "rank" not in given:
        raise wheres[key].error(f"{key} needs a 'rank' (a positive integer)")
    rank = given["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise wheres[f"{key}.rank"].error(f"{key}.rank: expected a positive integer, got "
                                          f"{rank!r}")
    if "alpha" not in given:
        raise wheres[key].error(f"{key} needs an 'alpha' (a positive number; the adapter "
                                "is scaled by alpha / rank)")
    alpha = given["alpha"]
    if (isinstance(alpha, bool) or not isinstance(alpha, int | float)
            or not 0 < alpha < float("inf")):
        raise wheres[f"{key}.alpha"].error(f"{key}.alpha: expected a positive number, "
                                           f"got {alpha!r}")


def adapter_params(graph: Graph, spec: LayerSpec, prefix: str, config: LoraConfig,
                   weight: Node, trainable: Mapping[str, bool]) -> tuple[Node, Node]:
    """Add ``<prefix>.lora_A`` (r x in) and ``<prefix>.lora_B`` (out x r) for ``weight``
    (out x in), and mark the weight with them for ``merge_lora``: (A, B)."""
    out_features, in_features = (int(d) for d in weight.shape)
    nodes = {}
    for role, shape in (("lora_A", (config.rank, in_features)),
                        ("lora_B", (out_features, config.rank))):
        decl = LORA_PARAMS[role]
        dotted = naming.param_name(prefix, role)
        nodes[role] = graph.add(Node(
            naming.param_var(dotted), tuple(sp.Integer(d) for d in shape), "param", spec.name,
            spec.where, param=dotted, trainable=trainable[role], init=decl.initial(in_features)))
    a, b = nodes["lora_A"], nodes["lora_B"]
    weight.meta["lora"] = (a.param, b.param, config.scale)
    return a, b


def add_adapter(graph: Graph, spec: LayerSpec, prefix: str, config: LoraConfig,
                x: Node, weight: Node, base: sp.Expr, trainable: Mapping[str, bool]
                ) -> sp.Expr:
    """Adapt the map ``base`` = x W^T (+ b), a body over output indices ``i0, i1, ...``:
    add ``<prefix>.lora_A``, ``<prefix>.lora_B``, the nodes ``<prefix>_base`` = base and
    ``u = scale * x A^T``, and return the adapted body ``<prefix>_base + u B^T``.

    The base map is a node of its own so that each of the two products takes its addend
    in one fused op (torch ``addmm``, numpy's in-place add). ``trainable``:
    {"lora_A": bool, "lora_B": bool}; freezing the base parameters is the caller's. The
    weight node is marked with the adapter (``meta["lora"]``) so the generated modules'
    ``merge_lora`` can fold it in."""
    out_features, in_features = (int(d) for d in weight.shape)
    a, b = adapter_params(graph, spec, prefix, config, weight, trainable)
    # The adapter's input projection is its own node, u = (alpha/r) x A^T (N x r): the
    # chain rule then sends d_u = d_z B to A and x as narrow products. (As one
    # three-operand term, the simplified d_x would factor to d_z (W + s B A), an
    # out x in product.) The scale sits on the narrowest array.
    idx = tuple(sp.Symbol(f"i{k}", integer=True) for k in range(x.rank))
    q = sum_index(1)
    base_node = graph.op(naming.lora_base(prefix), (*x.shape[:-1], sp.Integer(out_features)),
                         base, layer=spec.name, where=spec.where, kind="contraction",
                         label="lora_base")
    down = adapter_down(graph, spec, prefix, config, x, a)
    return base_node.element() + sp.Sum(down.element((*idx[:-1], q)) * b.element((idx[-1], q)),
                                        (q, 0, config.rank - 1))


def adapter_down(graph: Graph, spec: LayerSpec, prefix: str, config: LoraConfig, x: Node,
                 a: Node) -> Node:
    """The narrow node u = (alpha/r) x A^T over x's last axis, named ``<prefix>_lora_xA``."""
    idx = tuple(sp.Symbol(f"i{k}", integer=True) for k in range(x.rank))
    s = sum_index(0)
    return graph.op(naming.lora_down(prefix), (*x.shape[:-1], sp.Integer(config.rank)),
                    config.scale * sp.Sum(x.element((*idx[:-1], s)) * a.element((idx[-1], s)),
                                          (s, 0, int(x.shape[-1]) - 1)),
                    layer=spec.name, where=spec.option_where["lora"], kind="contraction",
                    label="lora_down")


def adapter_reference(x: Any, params: Mapping[str, Any], prefix: str,
                      config: LoraConfig) -> Any:
    """peft's LoRA forward term in torch: (x @ A.T @ B.T) * alpha / r."""
    a = params[naming.param_name(prefix, "lora_A")]
    b = params[naming.param_name(prefix, "lora_B")]
    return (x @ a.T @ b.T) * (config.alpha / config.rank)


def shared_param(graph: Graph, spec: LayerSpec, key: str, role: str,
                 shape: tuple[sp.Expr, ...], explicit: bool | None) -> Node:
    """The parameter named by option ``key`` (``weight: wte.weight``), declared by a layer
    computed earlier, to be read by ``spec`` as its ``role``. Its shape must equal
    ``shape``; ``explicit``: the layer's own ``trainable`` setting for ``role``, if any,
    which must agree with the parameter's (a shared parameter trains everywhere or
    nowhere)."""
    where = spec.option_where[key]
    wanted = str(spec.options[key])
    found = next((n for n in graph.params() if n.param == wanted), None)
    if found is None:
        known = [n.param for n in graph.params()]
        listed = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise where.error(f"unknown parameter {wanted!r}: no layer computed before "
                          f"{spec.name!r} declares it (declared so far: {listed or 'none'})",
                          GraphError)
    if found.shape != shape:
        raise where.error(
            f"{spec.name}.{role} would be {wanted!r} of shape {_fmt(found.shape)}, but "
            f"{spec.name!r} needs {role} of shape {_fmt(shape)} (a shared parameter is "
            "used as it is, not transposed)", ShapeError)
    if explicit is not None and explicit != found.trainable:
        state = "trainable" if found.trainable else "frozen"
        raise where.error(
            f"{spec.name!r} sets trainable {str(explicit).lower()} for {role}, but it shares "
            f"{wanted!r}, which is {state}: set trainable on the layer that declares it",
            GraphError)
    return found


def explicit_trainable(spec: LayerSpec, role: str) -> bool | None:
    """The layer's own ``trainable`` setting for ``role``, or None when it sets none."""
    value = spec.options.get("trainable")
    if isinstance(value, bool):
        return value
    if isinstance(value, tuple):
        return dict(value).get(role)
    return None


def _fmt(shape: tuple[sp.Expr, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
