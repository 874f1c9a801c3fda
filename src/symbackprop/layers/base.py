"""The registries: layer types, activations and losses, each one class or entry.

A registered layer type says which YAML options it takes (the schema ``spec`` checks),
how it expands into index-notation ops on the :class:`~symbackprop.graph.Graph`, and
how to compute it with plain ``torch.nn`` ops — the independent oracle that the check
command and the tests compare generated code against. Nothing else needs to change to
add a layer: the derivation, both backends, LaTeX and the parametrized tests follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import sympy as sp

from ..graph import Graph, Node
from ..spec import LayerSpec, LossSpec, Where

REQUIRED = object()


@dataclass(frozen=True)
class Option:
    """One YAML key of a layer or loss: its kind, default and meaning."""

    kind: str
    default: object = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class Layer:
    """Base class of a registered layer type."""

    key: ClassVar[str]
    doc: ClassVar[str]
    options: ClassVar[Mapping[str, Option]] = {}
    arity: ClassVar[tuple[int, int | None]] = (1, 1)
    # Small option sets the parametrized tests build one network from each.
    test_cases: ClassVar[tuple[Mapping[str, object], ...]] = ({},)

    @classmethod
    def validate(cls, inputs: tuple[str, ...], options: Mapping[str, object],
                 wheres: Mapping[str, Where]) -> None:
        """Checks beyond the option schema that need no graph (e.g. formula syntax)."""

    @classmethod
    def build(cls, graph: Graph, spec: LayerSpec, inputs: list[Node]) -> Node:
        raise NotImplementedError

    @classmethod
    def reference(cls, spec: LayerSpec, inputs: list[Any], params: Mapping[str, Any]) -> Any:
        """The same layer in plain torch ops (autograd differentiates it)."""
        raise NotImplementedError


LAYERS: dict[str, type[Layer]] = {}


def register_layer(cls: type[Layer]) -> type[Layer]:
    LAYERS[cls.key] = cls
    return cls


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: its sympy formula and its torch reference."""

    key: str
    doc: str
    formula: Callable[[sp.Expr, Mapping[str, float]], sp.Expr]
    reference: Callable[[Any, Mapping[str, float]], Any]
    params: Mapping[str, float] = field(default_factory=dict)
    kink: str = ""


ACTIVATIONS: dict[str, Activation] = {}


def register_activation(act: Activation) -> Activation:
    ACTIVATIONS[act.key] = act
    return act


class Loss:
    """Base class of a registered loss; every loss is a mean, so the result is 0-d."""

    key: ClassVar[str]
    doc: ClassVar[str]
    options: ClassVar[Mapping[str, Option]] = {}
    needs_target: ClassVar[bool] = True
    # How the check command and tests draw targets: "real", "probability" (in (0, 1)
    # elementwise) or "distribution" (rows that sum to one).
    target_kind: ClassVar[str] = "real"
    # Whether predictions must lie in (0, 1) (bce on probabilities).
    wants_probability: ClassVar[bool] = False
    # Option sets the parametrized tests build one network from each.
    test_cases: ClassVar[tuple[Mapping[str, object], ...]] = ({},)

    @classmethod
    def validate(cls, options: Mapping[str, object], wheres: Mapping[str, Where]) -> None:
        """Checks beyond the option schema (e.g. formula syntax)."""

    @classmethod
    def build(cls, graph: Graph, spec: LossSpec, prediction: Node,
              target: Node | None) -> Node:
        raise NotImplementedError

    @classmethod
    def reference(cls, spec: LossSpec, prediction: Any, target: Any) -> Any:
        raise NotImplementedError


LOSSES: dict[str, type[Loss]] = {}


def register_loss(cls: type[Loss]) -> type[Loss]:
    LOSSES[cls.key] = cls
    return cls
