"""Multi-head self-attention, named as nanoGPT names it, built from index-notation ops.

For x of shape [..., T, C], H heads of D = C / H features:

    q, k, v = split(x c_attnᵀ + c_attn_b)          each [..., H, T, D]
    a[h, t, s] = (1/√D) Σ_d q[h, t, d] k[h, s, d]   (scores; causal: s ≤ t only)
    p = softmax_s(a)
    y[h, t, d] = Σ_s p[h, t, s] v[h, s, d]
    out[t, o] = Σ_h Σ_d y[h, t, d] c_proj[o, h D + d] + c_proj_b[o]

The split of ``c_attn.weight`` (3C × C) into query, key and value heads is a reshape of
the weight to [3, H, D, C] (a digit split of its rows, lowered to a view) read at a fixed
first index; the merge of the heads is the output projection read as [C, H, D]. So no
head is ever copied out of a larger array, and every gradient — through the softmax,
through q kᵀ and the weighted sum, into both weights — is derived by the chain rule like
any other op's. The probabilities are the softmax layer's (max-shifted, causal by index
predicate), so logits ×1000 stay finite.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp

from .. import naming
from ..errors import ShapeError
from ..graph import Graph, Node, out_index, sum_index
from ..spec import LayerSpec, Where
from .base import Layer, Note, Option, Param, register_layer, trainable
from .core import feature_size
from .lora import (
    LORA_KEYS,
    LORA_PARAMS,
    adapter_down,
    adapter_params,
    lora_config,
    validate_lora,
)
from .normalization import softmax, softmax_reference

PROJECTIONS = ("c_attn", "c_proj")


@register_layer
class Attention(Layer):
    """Multi-head self-attention (nanoGPT's CausalSelfAttention) over the last two axes."""

    key = "attention"
    doc = ("multi-head self-attention over [..., T, C]: softmax(q k^T / sqrt(D)) v per head, "
           "projected (nanoGPT's CausalSelfAttention)")
    options = {
        "heads": Option("units", doc="number of heads H; C must be a multiple of H"),
        "causal": Option("bool", False, "query t attends only to keys s ≤ t"),
        "bias": Option("bool", True, "learn the biases of both projections"),
        "lora": Option("mapping", None, "low-rank adapters {rank: r, alpha: a, targets: "
                       "[c_attn, c_proj]} on the projections (default targets: both); the "
                       "adapted projections' weights and biases freeze unless `trainable` "
                       "says otherwise (default: none)", choices=(*LORA_KEYS, "targets")),
    }
    params = {
        "c_attn.weight": Param("3C x C: the query, key and value projections stacked",
                               "uniform_fan_in"),
        "c_attn.bias": Param("3C", "uniform_fan_in"),
        "c_proj.weight": Param("C x C: the output projection", "uniform_fan_in"),
        "c_proj.bias": Param("C", "uniform_fan_in"),
        **{f"{p}.{role}": decl for p in PROJECTIONS for role, decl in LORA_PARAMS.items()},
    }
    test_cases = (
        {"heads": 2, "_input": ["N", 3, 4], "_branches": {"b0": 4}},
        {"heads": 2, "causal": True, "_input": ["N", 4, 4], "_branches": {"b0": 4}},
        {"heads": 1, "bias": False, "causal": True, "_input": ["N", 3, 2],
         "_branches": {"b0": 2}},
        {"heads": 3, "causal": True, "_input": [5, 4], "_branches": {"b0": 6}},
        {"heads": 2, "causal": True, "_input": ["N", 2, 3, 2], "_branches": {"b0": 4}},
        {"heads": 2, "causal": True, "_input": ["N", 3, 4], "_branches": {"b0": 4},
         "lora": {"rank": 2, "alpha": 4}},
        {"heads": 2, "_input": ["N", 3, 4], "_branches": {"b0": 4},
         "lora": {"rank": 1, "alpha": 2, "targets": ["c_proj"]},
         "trainable": {"c_proj.bias": True}},
    )

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        validate_lora(options, wheres)
        targets = _targets(options, wheres)
        value = options.get("trainable")
        if isinstance(value, tuple):
            for name in dict(value):
                part, role = name.split(".")
                if role in LORA_PARAMS and part not in targets:
                    raise wheres["trainable"].error(f"trainable names {name!r} but {part} has "
                                                    "no lora adapter")
                if role == "bias" and not options["bias"]:
                    raise wheres["trainable"].error(f"trainable names {name!r} but the layer "
                                                    "has bias: false")

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        where = spec.option_where["input"]
        if x.rank < 2:
            raise where.error(f"attention reads [..., T, C]; {x.name!r} has rank {x.rank}",
                              ShapeError)
        width = feature_size(x, where)
        heads = int(spec.options["heads"])  # type: ignore[arg-type]
        if width % heads:
            raise spec.option_where["heads"].error(
                f"{width} features of {x.name!r} do not split into {heads} heads",
                ShapeError)
        dim = width // heads
        C, H, D = sp.Integer(width), sp.Integer(heads), sp.Integer(dim)
        lead, T = x.shape[:-2], x.shape[-2]
        nl = len(lead)
        bias = bool(spec.options["bias"])
        part = lambda what: naming.layer_part(spec.name, what)  # noqa: E731
        op = lambda name, shape, body, **kw: graph.op(  # noqa: E731
            part(name), shape, body, layer=spec.name, where=spec.where, **kw)

        # the stacked projection, viewed per part and head: w[p, h, d, c] = W[pC + hD + d, c]
        w_attn = cls.param(graph, spec, "c_attn.weight", (3 * C, C), width)
        w_split = op("w", (sp.Integer(3), H, D, C),
                     w_attn.element((C * out_index(0) + D * out_index(1) + out_index(2),
                                     out_index(3))), label="reshape")
        w_split.meta["standalone"] = True
        b_split = b_attn = None
        if bias:
            b_attn = cls.param(graph, spec, "c_attn.bias", (3 * C,), width)
            b_split = op("b", (sp.Integer(3), H, D),
                         b_attn.element((C * out_index(0) + D * out_index(1) + out_index(2),)),
                         label="reshape")
            b_split.meta["standalone"] = True

        lora = lora_config(spec.options)
        targets = _targets(spec.options, spec.option_where) if lora is not None else ()
        lead_idx = tuple(out_index(k) for k in range(nl))
        adapter_attn = None
        if "c_attn" in targets:
            assert lora is not None
            _freeze(spec, w_attn, b_attn, "c_attn")
            # u = (alpha/r) x Aᵀ [..., T, r], then B [3C, r] viewed per part and head
            adapter_attn = _adapter(graph, spec, lora, "c_attn", w_attn, x)
            a_b = adapter_attn[1]
            b_heads = op("c_attn_lora_B_heads", (sp.Integer(3), H, D, sp.Integer(lora.rank)),
                         a_b.element((C * out_index(0) + D * out_index(1) + out_index(2),
                                      out_index(3))), label="reshape")
            b_heads.meta["standalone"] = True
            adapter_attn = (adapter_attn[0], b_heads)

        # q, k, v[..., h, t, d] = sum_c x[..., t, c] w[p, h, d, c] + b[p, h, d]
        h, t, d = out_index(nl), out_index(nl + 1), out_index(nl + 2)
        c = sum_index(0)
        heads_shape = (*lead, H, T, D)
        qkv = []
        for p, name in enumerate(("q", "k", "v")):
            body: sp.Expr = sp.Sum(x.element((*lead_idx, t, c))
                                   * w_split.element((sp.Integer(p), h, d, c)), (c, 0, C - 1))
            if b_split is not None:
                body = body + b_split.element((sp.Integer(p), h, d))
            if adapter_attn is not None:  # + (u Bᵀ) for this part's rows of B
                u, b_heads = adapter_attn
                j = sum_index(1)
                body = body + sp.Sum(u.element((*lead_idx, t, j))
                                     * b_heads.element((sp.Integer(p), h, d, j)),
                                     (j, 0, u.shape[-1] - 1))
            qkv.append(op(name, heads_shape, body, kind="contraction", label=f"{name} heads"))
        q, k, v = qkv

        # scores a[..., h, t, s] = sum_d q[..., h, t, d] k[..., h, s, d] / sqrt(D)
        s = out_index(nl + 2)
        e = sum_index(0)
        scores = op("scores", (*lead, H, T, T),
                    sp.Sum(q.element((*lead_idx, h, t, e)) * k.element((*lead_idx, h, s, e)),
                           (e, 0, D - 1)) / sp.sqrt(D), kind="contraction",
                    label="attention scores")
        probs = softmax(graph, part("p"), spec.name, scores, nl + 2,
                        bool(spec.options["causal"]), spec.where, spec.option_where["causal"])

        # y[..., h, t, d] = sum_s p[..., h, t, s] v[..., h, s, d]
        r = sum_index(0)
        y = op("y", heads_shape,
               sp.Sum(probs.element((*lead_idx, h, t, r)) * v.element((*lead_idx, h, r, d)),
                      (r, 0, T - 1)), kind="contraction", label="weighted values")

        # out[..., t, o] = sum_{h, d} y[..., h, t, d] P[o, h, d] + b[o], P = c_proj as [C, H, D]
        w_proj = cls.param(graph, spec, "c_proj.weight", (C, C), width)
        p_split = op("wp", (C, H, D), w_proj.element((out_index(0),
                                                      D * out_index(1) + out_index(2))),
                     label="reshape")
        p_split.meta["standalone"] = True
        t_out, o = out_index(nl), out_index(nl + 1)
        hh, dd = sum_index(0), sum_index(1)
        body = sp.Sum(y.element((*lead_idx, hh, t_out, dd)) * p_split.element((o, hh, dd)),
                      (hh, 0, H - 1), (dd, 0, D - 1))
        b_proj = cls.param(graph, spec, "c_proj.bias", (C,), width) if bias else None
        if b_proj is not None:
            body = body + b_proj.element((o,))
        if "c_proj" in targets:
            assert lora is not None
            _freeze(spec, w_proj, b_proj, "c_proj")
            # u = (alpha/r) sum_{h,d} y[..., h, t, d] A[r, hD + d], then + u Bᵀ
            a_p, b_p = adapter_params(graph, spec, f"{spec.dotted}.c_proj", lora, w_proj,
                                      _adapter_trainable(spec, "c_proj"))
            a_heads = op("c_proj_lora_A_heads", (sp.Integer(lora.rank), H, D),
                         a_p.element((out_index(0), D * out_index(1) + out_index(2))),
                         label="reshape")
            a_heads.meta["standalone"] = True
            j = sum_index(2)
            u = graph.op(naming.lora_down(f"{spec.dotted}.c_proj"),
                         (*lead, T, sp.Integer(lora.rank)),
                         lora.scale * sp.Sum(y.element((*lead_idx, hh, t_out, dd))
                                             * a_heads.element((o, hh, dd)),
                                             (hh, 0, H - 1), (dd, 0, D - 1)),
                         layer=spec.name, where=spec.option_where["lora"], kind="contraction",
                         label="lora_down")
            body = body + sp.Sum(u.element((*lead_idx, t_out, j)) * b_p.element((o, j)),
                                 (j, 0, lora.rank - 1))
        return graph.op(spec.name, x.shape, body, layer=spec.name, where=spec.where,
                        kind="contraction", label="attention output")

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        return ((
            "Attention, collected. With ", r"\mathbf{g} = \partial L / \partial \mathbf{y}",
            " for the heads' output, the chain rule through the weighted sum and through ",
            r"\mathbf{q}\mathbf{k}^{\top}", " gives, per head (the softmax step is the "
            "softmax layer's; ", r"\mathbf{G}", " is the gradient of the scores):"),
            ((r"\frac{\partial L}{\partial \mathbf{P}}", r"= \mathbf{g}\,\mathbf{v}^{\top}"),
             (r"\frac{\partial L}{\partial \mathbf{v}}", r"= \mathbf{P}^{\top}\mathbf{g}"),
             (r"\mathbf{G}", r"= \mathbf{P} \odot \left(\frac{\partial L}{\partial \mathbf{P}}"
                             r" - \mathrm{rowsum}\left(\mathbf{P} \odot \frac{\partial L}"
                             r"{\partial \mathbf{P}}\right)\right)"),
             (r"\frac{\partial L}{\partial \mathbf{q}}",
              r"= \tfrac{1}{\sqrt{D}}\, \mathbf{G}\,\mathbf{k}"),
             (r"\frac{\partial L}{\partial \mathbf{k}}",
              r"= \tfrac{1}{\sqrt{D}}\, \mathbf{G}^{\top}\mathbf{q}"),))

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        import torch

        x = inputs[0]
        heads = int(spec.options["heads"])  # type: ignore[arg-type]
        width = x.shape[-1]
        get = lambda role: params.get(spec.param_name(role))  # noqa: E731
        lora = lora_config(spec.options)
        targets = _targets(spec.options, None) if lora is not None else ()

        def linear(a: Any, part: str) -> Any:  # peft's LoRA: base + (a Aᵀ Bᵀ) alpha / r
            out = torch.nn.functional.linear(a, get(f"{part}.weight"), get(f"{part}.bias"))
            if part in targets:
                assert lora is not None
                out = out + (a @ get(f"{part}.lora_A").T @ get(f"{part}.lora_B").T) * (
                    lora.alpha / lora.rank)
            return out

        qkv = linear(x, "c_attn")
        q, k, v = qkv.split(width, dim=-1)
        split = lambda a: a.unflatten(-1, (heads, width // heads)).transpose(-3, -2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = (q @ k.transpose(-2, -1)) / (width // heads) ** 0.5
        y = softmax_reference(att, -1, bool(spec.options["causal"])) @ v
        y = y.transpose(-3, -2).flatten(-2)
        return linear(y, "c_proj")


def _targets(options: Mapping[str, object], wheres: Mapping[str, Where] | None
             ) -> tuple[str, ...]:
    """The projections an attention layer's adapters sit on (checked when wheres given)."""
    value = options.get("lora")
    if value is None:
        return ()
    given = dict(value)  # type: ignore[call-overload]
    listed = given.get("targets", PROJECTIONS)
    if wheres is not None:
        names = listed if isinstance(listed, tuple) else (listed,)
        bad = [n for n in names if n not in PROJECTIONS]
        if bad or len(set(names)) != len(names):
            raise wheres["lora.targets"].error(
                f"lora.targets lists the projections to adapt, each once, from "
                f"{', '.join(PROJECTIONS)}; got {list(names)!r}")
    return tuple(listed) if isinstance(listed, tuple) else (str(listed),)


def _adapter_trainable(spec: LayerSpec, part: str) -> dict[str, bool]:
    return {role: trainable(spec, f"{part}.{role}", decl.trainable)
            for role, decl in LORA_PARAMS.items()}


def _freeze(spec: LayerSpec, weight: Node, bias: Node | None, part: str) -> None:
    """LoRA fine-tuning: an adapted projection's weight and bias are frozen unless the
    layer's trainable option names them."""
    for node, role in ((weight, "weight"), (bias, "bias")):
        if node is not None:
            node.trainable = trainable(spec, f"{part}.{role}", False)


def _adapter(graph: Graph, spec: LayerSpec, lora: Any, part: str, weight: Node, x: Node
             ) -> tuple[Node, Node]:
    """``<part>.lora_A``/``lora_B`` for ``weight`` and the narrow node u = (alpha/r) x Aᵀ
    over x's last axis: (u, B)."""
    prefix = f"{spec.dotted}.{part}"
    a, b = adapter_params(graph, spec, prefix, lora, weight, _adapter_trainable(spec, part))
    return adapter_down(graph, spec, prefix, lora, x, a), b
