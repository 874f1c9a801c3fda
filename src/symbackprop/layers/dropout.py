"""``type: dropout``: y = x ⊙ m with a random mask m drawn once per step (torch.nn.Dropout).

The mask is a leaf of the graph (role ``mask``, named ``<layer>_mask``), so the
derivation shows it: y = x ⊙ m and dL/dx = dL/dy ⊙ m, the same m for the forward and
the backward pass. Its entries are 0 (dropped, with probability p) or 1/(1 - p) (kept),
as torch scales them. The generated modules draw it, never the caller:

- numpy: ``numpy.random.default_rng(seed).random(shape) >= p`` for each dropout layer in
  layer order, one generator per call;
- torch: ``torch.rand(shape, generator=...) >= p`` on the parameters' device, with a
  ``torch.Generator`` seeded by ``seed`` (or torch's global generator when no seed is
  given, which the ``Model`` in training mode uses, as ``torch.nn.Dropout`` does).

The functions take ``training`` (default: true when ``seed`` is given) and ``seed``;
``Model`` follows ``model.train()`` / ``model.eval()``. In evaluation mode the mask is the
scalar 1 and dropout the identity; with p = 0 the layer is the identity and draws nothing.
The two backends draw different masks for one seed; within a backend a seed always gives
the same mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import naming
from ..errors import GraphError
from ..graph import Graph, Node
from ..spec import LayerSpec, Where
from .base import Layer, Option, register_layer


@register_layer
class Dropout(Layer):
    """y = x ⊙ m, m drawn per step: 0 with probability p, else 1/(1 - p)."""

    key = "dropout"
    doc = ("dropout: zero each entry with probability p and scale the rest by 1/(1-p), one "
           "mask per step for forward and backward (torch.nn.Dropout)")
    options = {"p": Option("float", 0.5, "probability of zeroing an entry, 0 <= p < 1")}
    # The registry's oracle runs in evaluation mode (the mask is 1); tests/test_dropout.py
    # checks training mode against finite differences and torch with the drawn mask.
    test_cases = ({"p": 0.5}, {"p": 0.0}, {"p": 0.25, "_input": ["N", 2, 3]})

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        p = float(options["p"])  # type: ignore[arg-type]
        if not 0.0 <= p < 1.0:
            raise wheres["p"].error(f"p is the probability of dropping an entry: expected "
                                    f"0 <= p < 1, got {p!r}")

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        (x,) = inputs
        clash = graph.nodes.get(naming.DROPOUT_KEYWORD)
        if clash is not None:
            raise clash.where.error(
                f"{clash.name!r} is the keyword the generated functions take for dropout "
                f"(layer {spec.name!r}): rename this {clash.role}", GraphError)
        p = float(spec.options["p"])  # type: ignore[arg-type]
        if p == 0.0:
            return graph.op(spec.name, x.shape, x.element(), layer=spec.name,
                            where=spec.where, label="identity")
        mask = graph.add(Node(naming.dropout_mask(spec.name), x.shape, "mask", spec.name,
                              spec.option_where["p"], meta={"p": p}))
        return graph.op(spec.name, x.shape, x.element() * mask.element(), layer=spec.name,
                        where=spec.where, label="dropout")

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        # Evaluation mode: the identity. (Training mode is checked against torch with the
        # generated module's own mask, which only it can draw.)
        return inputs[0]
