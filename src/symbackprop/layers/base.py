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

from .. import naming
from ..graph import Graph, Node
from ..spec import LayerSpec, LossSpec, Where

REQUIRED = object()

# A derivation note: (sentence parts, text and inline LaTeX alternately; display rows)
Note = tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]


@dataclass(frozen=True)
class Option:
    """One YAML key of a layer or loss: its kind, default and meaning.

    ``choices`` are the names a ``trainable`` option's mapping may use (the layer's
    parameters).
    """

    kind: str
    default: object = REQUIRED
    doc: str = ""
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


INITS = ("uniform_fan_in", "zeros", "ones", "normal")


@dataclass(frozen=True)
class Param:
    """One parameter a layer owns: how it starts and whether it trains by default.

    ``init`` is one of :data:`INITS`: ``uniform_fan_in`` draws from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch.nn.Linear does; ``normal`` draws from
    N(0, std^2). The generated modules' ``init_params`` draw these from one
    backend-independent generator, so numpy and torch start from the same numbers.
    """

    doc: str
    init: str = "uniform_fan_in"
    std: float = 1.0
    trainable: bool = True

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; known: {', '.join(INITS)}")

    def initial(self, fan_in: int | None) -> tuple[str, float]:
        """The graph node's ``init``: (kind, scale), scale the bound or the std."""
        if self.init == "uniform_fan_in":
            if fan_in is None:
                raise ValueError("uniform_fan_in needs the layer's fan_in")
            return ("uniform", 1.0 / fan_in**0.5)
        if self.init == "normal":
            return ("normal", float(self.std))
        return (self.init, 0.0)


def refuse_trainable_bias_without_bias(options: Mapping[str, object],
                                       wheres: Mapping[str, Where]) -> None:
    """A ``trainable`` mapping may not name ``bias`` on a layer with ``bias: false``."""
    value = options.get("trainable")
    if not options["bias"] and isinstance(value, tuple) and "bias" in dict(value):
        raise wheres["trainable"].error("trainable names 'bias' but the layer has "
                                        "bias: false")


def trainable(spec: LayerSpec, role: str, default: bool) -> bool:
    """Whether ``role`` trains: the layer's ``trainable`` option (a bool for every
    parameter, or {name: bool} for some), else the parameter's declared default."""
    value = spec.options.get("trainable")
    if isinstance(value, bool):
        return value
    if isinstance(value, tuple):
        return dict(value).get(role, default)
    return default


class Layer:
    """Base class of a registered layer type.

    A layer that owns parameters declares them in ``params`` (name -> :class:`Param`)
    and creates each with :meth:`param`; registering it adds the ``trainable`` option.
    """

    key: ClassVar[str]
    doc: ClassVar[str]
    options: ClassVar[Mapping[str, Option]] = {}
    params: ClassVar[Mapping[str, Param]] = {}
    arity: ClassVar[tuple[int, int | None]] = (1, 1)
    # Whether the layer reads int64 inputs (as ids); every other layer refuses them.
    takes_ids: ClassVar[bool] = False
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

    @classmethod
    def derivation_note(cls, spec: LayerSpec) -> Note:
        """What the derivation prints after this layer's backward steps: (sentence parts,
        alternately text and inline LaTeX, starting with text; display rows, as
        :class:`~symbackprop.latex.document.Display` takes them). Empty: no note."""
        return (), ()

    @classmethod
    def param(cls, graph: Graph, spec: LayerSpec, role: str, shape: tuple[sp.Expr, ...],
              fan_in: int | None = None) -> Node:
        """Add the parameter ``role`` (declared in ``params``) of this layer to the graph."""
        decl = cls.params[role]
        dotted = spec.param_name(role)
        return graph.add(Node(naming.param_var(dotted), shape, "param", spec.name, spec.where,
                              param=dotted, trainable=trainable(spec, role, decl.trainable),
                              init=decl.initial(fan_in)))


LAYERS: dict[str, type[Layer]] = {}


def register_layer(cls: type[Layer]) -> type[Layer]:
    if cls.params and "trainable" not in cls.options:
        names = ", ".join(cls.params)
        cls.options = {**cls.options, "trainable": Option(
            "trainable", None, f"true or false for every parameter, or a mapping "
            f"{{name: true/false}} over {names} (default: each parameter's own default)",
            choices=tuple(cls.params))}
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
    # Whether the target may be int64 class ids; every other loss refuses them.
    takes_class_ids: ClassVar[bool] = False
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
