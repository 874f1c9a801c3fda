"""YAML text -> validated, frozen spec objects (no sympy here).

Owns the shape of a spec file: the top-level keys, tensor declarations, the layer list
and the loss. Layer- and loss-specific options are checked against the schemas that
the registries declare (``layers.LAYERS``, ``layers.ACTIVATIONS``, ``layers.LOSSES``), so a
new layer type adds its keys without touching this module. Every error names
``file:line:col`` and the key path.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import naming, yamlsafe
from .errors import SpecError

TOP_KEYS = ("name", "description", "inputs", "targets", "dims", "blocks", "layers", "loss",
            "weight_decay")
# The element types a tensor may declare: ``float`` (the parameters' floating dtype, the
# default) and ``int64`` (ids and class labels: never cast, never differentiated).
DTYPES = ("float", "int64")
MAX_LOSS_TERMS = 16
MAX_DIM = 1 << 24
MAX_LAYERS = 512  # after blocks are expanded
MAX_REPEAT = 64
MAX_BLOCK_DEPTH = 8  # blocks inside blocks
BLOCK_KEYS = ("inputs", "layers", "output")
LIST_SUBKEYS = ("targets",)  # keys of a nested option mapping whose value is a list
PARAM_REF = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){1,8}\Z")


@dataclass(frozen=True)
class Where:
    """A position in a spec file plus the key path, for error messages."""

    file: str
    line: int
    col: int
    path: str

    def error(self, message: str, cls: type[SpecError] = SpecError) -> SpecError:
        return cls(message, file=self.file, line=self.line, col=self.col, path=self.path)


@dataclass(frozen=True)
class TensorDecl:
    """An input or target: ``x: [N, 2]`` (float) or ``idx: {shape: [N, T], dtype: int64}``."""

    name: str
    shape: tuple[int | str, ...]
    where: Where
    dtype: str = "float"


@dataclass(frozen=True)
class DimBound:
    """``dims: {T: {max: 64}}``: a symbolic dimension's largest allowed size."""

    name: str
    max: int
    where: Where


@dataclass(frozen=True)
class ActivationSpec:
    """``activation: sigmoid`` or ``{type: leaky_relu, alpha: 0.1}`` or ``{formula: ...}``."""

    type: str
    params: tuple[tuple[str, float], ...] = ()
    formula: str | None = None
    where: Where | None = field(default=None, compare=False)

    def param(self, key: str) -> float:
        return dict(self.params)[key]


@dataclass(frozen=True)
class LayerSpec:
    """One layer. ``name`` is its identifier in generated code; ``qualname`` its dotted
    name inside blocks (``h.0.ln_1``, the prefix of its parameters' names), equal to
    ``name`` outside them."""

    name: str
    type: str
    inputs: tuple[str, ...]
    options: Mapping[str, object]
    where: Where
    option_where: Mapping[str, Where]
    qualname: str = ""
    # The inputs as the spec names them where it is written (a formula's variables: a
    # block's own layer or input, a block instance by its name); empty: ``inputs``.
    names: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.names or self.inputs

    @property
    def dotted(self) -> str:
        """The layer's dotted name, the prefix of its parameters' names: ``h.0.ln_1``."""
        return self.qualname or self.name

    def param_name(self, role: str) -> str:
        """The torch-style name of this layer's parameter ``role``: ``h.0.ln_1.weight``."""
        return naming.param_name(self.dotted, role)


@dataclass(frozen=True)
class BlockSpec:
    """``blocks: {name: {inputs: [x], layers: [...], output: name}}``: a group of layers
    defined once and used as a layer type, possibly ``repeat``-ed."""

    name: str
    inputs: tuple[str, ...]
    layers: tuple[dict, ...]
    output: str
    where: Where


@dataclass(frozen=True)
class LossSpec:
    type: str
    prediction: str
    target: str | None
    options: Mapping[str, object]
    where: Where
    option_where: Mapping[str, Where]
    weight: float = 1.0  # its factor in a composite loss (``loss:`` as a list of terms)


@dataclass(frozen=True)
class WeightDecaySpec:
    """``weight_decay: {l2: 1e-4, params: [...]}``: (l2 / 2) * sum of squares of ``params``
    (dotted parameter names; None: every trainable parameter of rank 2 or more)."""

    l2: float
    params: tuple[str, ...] | None
    where: Where
    param_where: Mapping[str, Where]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    inputs: tuple[TensorDecl, ...]
    targets: tuple[TensorDecl, ...]
    layers: tuple[LayerSpec, ...]
    loss: LossSpec
    file: str
    sha256: str
    where: Where
    dims: tuple[DimBound, ...] = ()
    # every term of the loss (one for a plain ``loss:`` mapping); ``loss`` is the first
    losses: tuple[LossSpec, ...] = ()
    weight_decay: WeightDecaySpec | None = None

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


class _Ctx:
    """Walks a parsed document, turning key paths into :class:`Where` positions."""

    def __init__(self, doc: yamlsafe.Document) -> None:
        self.doc = doc

    def where(self, path: tuple[str | int, ...], *, key: bool = False) -> Where:
        table = self.doc.key_marks if key else self.doc.marks
        probe = path
        while probe not in table and probe:
            probe = probe[:-1]
        line, col = table.get(probe, self.doc.marks.get((), (1, 1)))
        dotted = ""
        for part in path:
            dotted += f"[{part}]" if isinstance(part, int) else (f".{part}" if dotted else part)
        return Where(self.doc.file, line, col, dotted or "<top>")

    def fail(self, path: tuple[str | int, ...], message: str, *, key: bool = False) -> SpecError:
        return self.where(path, key=key).error(message)


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)


def _name(ctx: _Ctx, value: object, path: tuple[str | int, ...]) -> str:
    why = naming.check_user_name(value)
    if why:
        raise ctx.fail(path, why)
    return value  # type: ignore[return-value]


def _mapping(ctx: _Ctx, value: object, path: tuple[str | int, ...]) -> dict:
    if not isinstance(value, dict):
        raise ctx.fail(path, f"expected a mapping, got {_type_name(value)}")
    return value


def _shape(ctx: _Ctx, value: object, path: tuple[str | int, ...]) -> tuple[int | str, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.fail(path, "a shape is a non-empty list such as [N, 2]")
    dims: list[int | str] = []
    for i, dim in enumerate(value):
        if isinstance(dim, bool) or not isinstance(dim, int | str):
            raise ctx.fail((*path, i), f"a dimension is a positive integer or a symbol such as N, "
                                       f"not {_type_name(dim)}")
        if isinstance(dim, int):
            if not 1 <= dim <= MAX_DIM:
                raise ctx.fail((*path, i), f"dimension {dim} is out of range 1..{MAX_DIM}")
        else:
            _name(ctx, dim, (*path, i))
        dims.append(dim)
    return tuple(dims)


def _decls(ctx: _Ctx, value: object, key: str) -> tuple[TensorDecl, ...]:
    table = _mapping(ctx, value, (key,))
    out = []
    for name, decl in table.items():
        _name(ctx, name, (key, name))
        where = ctx.where((key, name), key=True)
        if not isinstance(decl, dict):  # the short form x: [N, 2] is a float tensor
            out.append(TensorDecl(name, _shape(ctx, decl, (key, name)), where))
            continue
        for item in decl:
            if item not in ("shape", "dtype"):
                raise ctx.fail((key, name, item), f"unknown key {item!r} (allowed: dtype, "
                                                  "shape)", key=True)
        if "shape" not in decl:
            raise ctx.fail((key, name), "a tensor mapping needs a 'shape' such as [N, T]")
        dtype = decl.get("dtype", "float")
        if dtype not in DTYPES:
            raise ctx.fail((key, name, "dtype"), f"unknown dtype {dtype!r} (allowed: "
                                                 f"{', '.join(DTYPES)})")
        out.append(TensorDecl(name, _shape(ctx, decl["shape"], (key, name, "shape")), where,
                              dtype))
    return tuple(out)


def _dims(ctx: _Ctx, value: object, decls: tuple[TensorDecl, ...]) -> tuple[DimBound, ...]:
    """``dims: {T: {max: 64}}``: bounds on symbolic dimensions the tensors use."""
    table = _mapping(ctx, value, ("dims",))
    used = {d for decl in decls for d in decl.shape if isinstance(d, str)}
    out = []
    for name, entry in table.items():
        _name(ctx, name, ("dims", name))
        if name not in used:
            raise ctx.fail(("dims", name), f"dims names {name!r}, which no input or target "
                                           "shape uses", key=True)
        entry = _mapping(ctx, entry, ("dims", name))
        for item in entry:
            if item != "max":
                raise ctx.fail(("dims", name, item), f"unknown key {item!r} (allowed: max)",
                               key=True)
        if "max" not in entry:
            raise ctx.fail(("dims", name), f"dims.{name} needs 'max' (its largest size)")
        bound = entry["max"]
        if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= MAX_DIM:
            raise ctx.fail(("dims", name, "max"), f"max is a positive integer up to {MAX_DIM}"
                                                  f", got {bound!r}")
        out.append(DimBound(name, bound, ctx.where(("dims", name, "max"))))
    return tuple(out)


def check_option(ctx_where: Where, kind: str, value: object) -> object:
    """Validate one option value of ``kind``; return it normalised."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ctx_where.error(f"expected true or false, got {_type_name(value)}")
        return value
    if kind == "units":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
            raise ctx_where.error(f"expected a positive integer, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_DIM:
            raise ctx_where.error(f"expected an integer, got {value!r}")
        return value
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 1 << 62:
            raise ctx_where.error(f"expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx_where.error(f"expected a number, got {_type_name(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ctx_where.error("expected a finite number")
        return float(value)
    if kind == "formula":
        if not isinstance(value, str):
            raise ctx_where.error(f"a formula is a string, got {_type_name(value)}")
        return value
    if kind == "list":  # the items are checked by the layer that takes the list
        if not isinstance(value, list) or not value:
            raise ctx_where.error(f"expected a non-empty list, got {_type_name(value)}")
        return tuple(value)
    if kind == "size":  # a window size, stride or padding: one number or one per axis
        if value is None:
            return None  # the option's default
        items = value if isinstance(value, list) else [value]
        if (not items or len(items) > 3
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_DIM
                       for v in items)):
            raise ctx_where.error(f"expected a non-negative integer, or a list of one per "
                                  f"spatial axis, got {value!r}")
        return tuple(items) if isinstance(value, list) else value
    if kind == "text":
        if not isinstance(value, str):
            raise ctx_where.error(f"expected a string, got {_type_name(value)}")
        return value
    if kind == "param":
        # Another layer's parameter, by its dotted name (``wte.weight``); looked up in
        # the graph, never pasted into code.
        if not isinstance(value, str) or not PARAM_REF.match(value):
            raise ctx_where.error(f"expected a parameter name such as 'fc1.weight', got "
                                  f"{value!r}")
        return value
    raise AssertionError(f"unknown option kind {kind}")  # pragma: no cover


def _activation(ctx: _Ctx, value: object, path: tuple[str | int, ...]) -> ActivationSpec:
    from .layers import ACTIVATIONS

    where = ctx.where(path)
    if isinstance(value, str):
        kind, given = value, {}
    elif isinstance(value, dict):
        given = dict(value)
        if "formula" in given:
            extra = sorted(set(given) - {"formula"})
            if extra:
                raise ctx.fail((*path, extra[0]), f"unknown key {extra[0]!r} beside 'formula'",
                               key=True)
            fwhere = ctx.where((*path, "formula"))
            formula = check_option(fwhere, "formula", given["formula"])
            from .formula import parse_at

            parse_at(fwhere, formula, {"x": None})
            return ActivationSpec("formula", (), formula, where)  # type: ignore[arg-type]
        if "type" not in given:
            raise ctx.fail(path, "an activation mapping needs 'type' (or 'formula')")
        kind = given.pop("type")
    else:
        raise ctx.fail(path, f"an activation is a name or a mapping, got {_type_name(value)}")
    if not isinstance(kind, str) or kind not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ctx.fail(path if isinstance(value, str) else (*path, "type"),
                       f"unknown activation {kind!r}; known: {known}")
    act = ACTIVATIONS[kind]
    params = []
    for key in given:
        if key not in act.params:
            allowed = ", ".join(sorted(act.params)) or "none"
            raise ctx.fail((*path, key), f"unknown parameter {key!r} for activation {kind!r} "
                                         f"(allowed: {allowed})", key=True)
    for key, default in sorted(act.params.items()):
        raw = given.get(key, default)
        params.append((key, check_option(ctx.where((*path, key)), "float", raw)))
    return ActivationSpec(kind, tuple(params), None, where)


def _trainable(ctx: _Ctx, value: object, path: tuple[str | int, ...],
               names: tuple[str, ...]) -> bool | tuple[tuple[str, bool], ...]:
    """``trainable: false`` (every parameter) or ``{weight: false, bias: true}``."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, dict):
        raise ctx.fail(path, f"trainable is true, false or a mapping {{parameter: true/false}}"
                             f", got {_type_name(value)}")
    pairs = []
    for key, flag in value.items():
        if key not in names:
            raise ctx.fail((*path, key), f"unknown parameter {key!r} in trainable (this layer "
                                         f"type has: {', '.join(names)})", key=True)
        if not isinstance(flag, bool):
            raise ctx.fail((*path, key), f"expected true or false, got {_type_name(flag)}")
        pairs.append((key, flag))
    return tuple(pairs)


def _submapping(ctx: _Ctx, value: object, path: tuple[str | int, ...],
                names: tuple[str, ...], key: str, wheres: dict[str, Where]
                ) -> tuple[tuple[str, object], ...] | None:
    """A nested option mapping (``lora: {rank: 4, alpha: 8}``) of scalars: its known
    keys and raw values, each key's position in ``wheres["<key>.<sub>"]``; the layer's
    ``validate`` checks the values. ``null`` means the option is off."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ctx.fail(path, f"{key} is a mapping {{{', '.join(names)}}}, got "
                             f"{_type_name(value)}")
    pairs = []
    for sub, item in value.items():
        if sub not in names:
            raise ctx.fail((*path, sub), f"unknown key {sub!r} in {key} (allowed: "
                                         f"{', '.join(names)})", key=True)
        if isinstance(item, list) and sub in LIST_SUBKEYS:  # an adapter's targets
            if not item or any(isinstance(v, dict | list) for v in item):
                raise ctx.fail((*path, sub), f"{key}.{sub} is a non-empty list of names")
            item = tuple(item)
        elif isinstance(item, dict | list):
            raise ctx.fail((*path, sub), f"{key}.{sub} is a single value, got "
                                         f"{_type_name(item)}")
        wheres[f"{key}.{sub}"] = ctx.where((*path, sub))
        pairs.append((sub, item))
    return tuple(pairs)


def _options(ctx: _Ctx, raw: dict, schema: Mapping, path: tuple[str | int, ...],
             skip: set[str]) -> tuple[dict[str, object], dict[str, Where]]:
    options: dict[str, object] = {}
    wheres: dict[str, Where] = {}
    for key in raw:
        if key in skip:
            continue
        if key not in schema:
            allowed = ", ".join(sorted({*schema, *skip}))
            raise ctx.fail((*path, key), f"unknown key {key!r} (allowed: {allowed})", key=True)
    for key, option in schema.items():
        wheres[key] = ctx.where((*path, key)) if key in raw else ctx.where(path)
        if key not in raw:
            if option.required:
                raise ctx.fail(path, f"missing required key {key!r}")
            options[key] = option.default
            continue
        value = raw[key]
        if option.kind == "trainable":
            options[key] = _trainable(ctx, value, (*path, key), option.choices)
        elif option.kind == "activation":
            options[key] = _activation(ctx, value, (*path, key)) if value is not None else None
        elif option.kind == "mapping":
            options[key] = _submapping(ctx, value, (*path, key), option.choices, key, wheres)
        else:
            options[key] = check_option(wheres[key], option.kind, value)
    return options, wheres


def parse(text: str | bytes, file: str = "<spec>") -> ModelSpec:
    """Parse and validate a spec; raise :class:`SpecError` on the first problem."""

    doc = yamlsafe.load(text, file)
    ctx = _Ctx(doc)
    raw = text.encode("utf-8") if isinstance(text, str) else text
    top = _mapping(ctx, doc.data, ())
    for key in top:
        if key not in TOP_KEYS:
            raise ctx.fail((key,), f"unknown top-level key {key!r} (allowed: "
                                   f"{', '.join(TOP_KEYS)})", key=True)
    for key in ("name", "inputs", "layers", "loss"):
        if key not in top:
            raise ctx.fail((), f"missing required top-level key {key!r}")
    name = _name(ctx, top["name"], ("name",))
    description = top.get("description", "")
    if not isinstance(description, str):
        raise ctx.fail(("description",), "description must be a string")
    inputs = _decls(ctx, top["inputs"], "inputs")
    if not inputs:
        raise ctx.fail(("inputs",), "declare at least one input")
    targets = _decls(ctx, top.get("targets", {}), "targets") if "targets" in top else ()

    dims = _dims(ctx, top["dims"], (*inputs, *targets)) if "dims" in top else ()

    seen: dict[str, Where] = {}
    for decl in (*inputs, *targets):
        if decl.name in seen:
            raise decl.where.error(f"name {decl.name!r} is declared twice")
        seen[decl.name] = decl.where

    layers_raw = top["layers"]
    if not isinstance(layers_raw, list) or not layers_raw:
        raise ctx.fail(("layers",), "layers is a non-empty list of mappings")
    if len(layers_raw) > MAX_LAYERS:
        raise ctx.fail(("layers",), f"more than {MAX_LAYERS} layers")
    blocks = _blocks(ctx, top.get("blocks", {})) if "blocks" in top else {}
    expander = _Expander(ctx, blocks, seen)
    previous = inputs[0].name if len(inputs) == 1 else None
    for i, entry in enumerate(layers_raw):
        previous = expander.layer(entry, ("layers", i), previous, scope=None)
    layers = expander.finish()

    if isinstance(top["loss"], list):
        terms_raw = top["loss"]
        if not terms_raw:
            raise ctx.fail(("loss",), "a composite loss is a non-empty list of loss terms")
        if len(terms_raw) > MAX_LOSS_TERMS:
            raise ctx.fail(("loss",), f"more than {MAX_LOSS_TERMS} loss terms")
        losses = tuple(_loss(ctx, raw_term, ("loss", i), previous, expander, composite=True)
                       for i, raw_term in enumerate(terms_raw))
    else:
        losses = (_loss(ctx, top["loss"], ("loss",), previous, expander, composite=False),)
    decay = _weight_decay(ctx, top["weight_decay"]) if "weight_decay" in top else None
    return ModelSpec(name, description, inputs, targets, tuple(layers), losses[0], file,
                     hashlib.sha256(raw).hexdigest(), ctx.where(()), dims=dims, losses=losses,
                     weight_decay=decay)


def _loss(ctx: _Ctx, value: object, path: tuple[str | int, ...], previous: str | None,
          expander: _Expander, *, composite: bool) -> LossSpec:
    """One loss (the whole ``loss:`` mapping, or one term of a composite list)."""
    from .layers import LOSSES

    loss_raw = _mapping(ctx, value, path)
    if "type" not in loss_raw and "formula" not in loss_raw:
        raise ctx.fail(path, "the loss needs a 'type' (or a 'formula')")
    ltype = loss_raw.get("type", "formula")
    if not isinstance(ltype, str) or ltype not in LOSSES:
        raise ctx.fail((*path, "type"), f"unknown loss {ltype!r}; known: "
                                        f"{', '.join(sorted(LOSSES))}")
    loss_cls = LOSSES[ltype]
    prediction = loss_raw.get("prediction", previous)
    if composite and "prediction" not in loss_raw:
        if ltype != "formula":
            raise ctx.fail(path, "each term of a composite loss names its 'prediction' "
                                 "(only a formula of parameters, a penalty, has none)")
        prediction = ""  # a penalty: a formula of the parameters alone
    if not isinstance(prediction, str):
        raise ctx.fail((*path, "prediction"), "prediction is a layer name")
    prediction = expander.outputs.get(prediction, prediction) if prediction else prediction
    target = loss_raw.get("target")
    if target is None and loss_cls.needs_target:
        raise ctx.fail(path, f"loss {ltype!r} needs a 'target'")
    if target is not None and not isinstance(target, str):
        raise ctx.fail((*path, "target"), "target is a name from 'targets'")
    weight = 1.0
    if "weight" in loss_raw:
        if not composite:
            raise ctx.fail((*path, "weight"), "'weight' belongs to a term of a composite "
                                              "loss (loss: a list of terms)", key=True)
        weight = float(check_option(ctx.where((*path, "weight")), "float",  # type: ignore[arg-type]
                                    _number_like(loss_raw["weight"])))
        if not 0 < weight <= 1e6:
            raise ctx.fail((*path, "weight"), f"a loss weight is a number in (0, 1e6], "
                                              f"not {weight!r}")
    loss_options, loss_wheres = _options(ctx, loss_raw, loss_cls.options, path,
                                         {"type", "prediction", "target", "weight"})
    loss_cls.validate(loss_options, loss_wheres)
    loss_wheres.setdefault("prediction", ctx.where((*path, "prediction")))
    loss_wheres.setdefault("target", ctx.where((*path, "target")))
    return LossSpec(ltype, prediction, target, loss_options, ctx.where(path), loss_wheres,
                    weight)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\Z")


def _number_like(value: object) -> object:
    """``1e-4`` as a number: YAML 1.1 (PyYAML) reads a float without a dot as a string,
    and a coefficient is most often written that way."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    return value


def _weight_decay(ctx: _Ctx, value: object) -> WeightDecaySpec:
    path: tuple[str | int, ...] = ("weight_decay",)
    raw = _mapping(ctx, value, path)
    for key in raw:
        if key not in ("l2", "params"):
            raise ctx.fail((*path, key), f"unknown key {key!r} in weight_decay (allowed: "
                                         "l2, params)", key=True)
    if "l2" not in raw:
        raise ctx.fail(path, "weight_decay needs 'l2' (the coefficient)")
    l2 = float(check_option(ctx.where((*path, "l2")), "float",  # type: ignore[arg-type]
                            _number_like(raw["l2"])))
    if not 0 <= l2 <= 1e6:
        raise ctx.fail((*path, "l2"), f"l2 is a number in [0, 1e6], not {l2!r}")
    params: tuple[str, ...] | None = None
    wheres: dict[str, Where] = {}
    if "params" in raw:
        listed = raw["params"]
        if not isinstance(listed, list) or not listed:
            raise ctx.fail((*path, "params"), "params is a non-empty list of parameter names "
                                              "such as fc1.weight")
        names = []
        for i, item in enumerate(listed):
            # only compared with the network's parameter names (an unknown one is refused
            # when the graph is built), never pasted into code
            if not isinstance(item, str) or not item or len(item) > 200 or not all(
                    part and (part.isascii() and (part.isidentifier() or part.isdigit()))
                    for part in item.split(".")):
                raise ctx.fail((*path, "params", i), f"not a parameter name: {item!r}")
            if item in wheres:
                raise ctx.fail((*path, "params", i), f"{item!r} is listed twice")
            wheres[item] = ctx.where((*path, "params", i))
            names.append(item)
        params = tuple(names)
    return WeightDecaySpec(l2, params, ctx.where(path), wheres)


def _blocks(ctx: _Ctx, value: object) -> dict[str, BlockSpec]:
    """The ``blocks`` section: each block's inputs, layer entries and output."""
    from .layers import LAYERS

    table = _mapping(ctx, value, ("blocks",))
    out: dict[str, BlockSpec] = {}
    for bname, body in table.items():
        path: tuple[str | int, ...] = ("blocks", bname)
        _name(ctx, bname, path)
        if bname in LAYERS:
            raise ctx.fail(path, f"block name {bname!r} is a built-in layer type", key=True)
        body = _mapping(ctx, body, path)
        for key in body:
            if key not in BLOCK_KEYS:
                raise ctx.fail((*path, key), f"unknown key {key!r} (allowed: "
                                             f"{', '.join(BLOCK_KEYS)})", key=True)
        raw_inputs = body.get("inputs")
        if not isinstance(raw_inputs, list) or not raw_inputs:
            raise ctx.fail((*path, "inputs"), "a block's inputs are a non-empty list of names")
        names = tuple(_name(ctx, n, (*path, "inputs", j)) for j, n in enumerate(raw_inputs))
        if len(set(names)) != len(names):
            raise ctx.fail((*path, "inputs"), "a block input is named twice")
        raw_layers = body.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise ctx.fail((*path, "layers"), "a block's layers are a non-empty list")
        entries = tuple(_mapping(ctx, e, (*path, "layers", j)) for j, e in enumerate(raw_layers))
        local = [e.get("name") for e in entries]
        for j, e in enumerate(entries):
            if e.get("name") in names:
                raise ctx.fail((*path, "layers", j, "name"), f"{e['name']!r} names both a "
                                                             "block input and a layer")
        output = body.get("output", local[-1])
        if not isinstance(output, str) or output not in local:
            raise ctx.fail((*path, "output") if "output" in body else (*path, "layers"),
                           f"a block's output is one of its layers' names, got {output!r}")
        out[bname] = BlockSpec(bname, names, entries, output, ctx.where(path, key=True))
    return out


class _Expander:
    """Turns layer entries into :class:`LayerSpec` objects, expanding block instances.

    A block instance ``{name: h, type: gpt_block, repeat: 2}`` becomes the block's layers
    once per repetition, named ``h.0.<layer>``, ``h.1.<layer>`` (their identifiers in
    generated code ``h_0_<layer>``); repetition r + 1 reads repetition r's output, and
    the instance name ``h`` stands for the last one's output. Inside a block a name is
    one of the block's inputs or layers, nothing outside. Blocks may use blocks, to a
    depth of :data:`MAX_BLOCK_DEPTH`; expansion is a loop over repetitions, with
    recursion only into that bounded depth.
    """

    def __init__(self, ctx: _Ctx, blocks: Mapping[str, BlockSpec],
                 seen: dict[str, Where]) -> None:
        self.ctx = ctx
        self.blocks = blocks
        self.seen = seen
        self.layers: list[LayerSpec] = []
        self.outputs: dict[str, str] = {}  # instance name -> identifier of its output
        self.names: dict[str, str] = {}  # an instance's output identifier -> its name
        self.qualnames: dict[str, str] = {}  # identifier -> dotted name

    def finish(self) -> list[LayerSpec]:
        if self.outputs:  # top-level layers may read a block instance by its name
            self.layers = [
                replace(layer, inputs=tuple(self.outputs.get(n, n) for n in layer.inputs),
                        names=layer.input_names)
                for layer in self.layers]
        return self.layers

    def layer(self, entry: object, path: tuple[str | int, ...], previous: str | None,
              scope: _Scope | None) -> str | None:
        """Parse one entry (a layer or a block instance); return its output identifier."""
        from .layers import LAYERS

        ctx = self.ctx
        entry = _mapping(ctx, entry, path)
        if "name" not in entry:
            raise ctx.fail(path, "a layer needs a 'name'")
        lname = _name(ctx, entry["name"], (*path, "name"))
        why = naming.check_layer_name(lname)
        if why:
            raise ctx.fail((*path, "name"), why)
        qualname = f"{scope.prefix}.{lname}" if scope else lname
        ident = naming.param_var(qualname)
        if ident in self.seen:
            what = f"name {lname!r}" if scope is None else f"the generated name {ident!r}"
            owner = self.qualnames.get(ident, ident)
            by = f" (by {owner}, inside a block)" if owner != ident else ""
            raise ctx.fail((*path, "name"), f"{what} is already used{by}")
        self.seen[ident] = ctx.where((*path, "name"))
        self.qualnames[ident] = qualname
        if "type" not in entry:
            raise ctx.fail(path, f"layer {lname!r} needs a 'type'")
        ltype = entry["type"]
        if isinstance(ltype, str) and ltype in self.blocks:
            return self._instance(entry, path, lname, qualname, previous, scope)
        if "repeat" in entry:
            raise ctx.fail((*path, "repeat"), "only a block can repeat (define it under "
                                              "'blocks')", key=True)
        if not isinstance(ltype, str) or ltype not in LAYERS:
            known = sorted({*LAYERS, *self.blocks})
            raise ctx.fail((*path, "type"), f"unknown layer type {ltype!r}; known: "
                                            f"{', '.join(known)}")
        cls = LAYERS[ltype]
        layer_inputs = self._inputs(entry, path, lname, previous, scope)
        names = self._written(entry, previous, scope)
        lo, hi = cls.arity
        if not lo <= len(layer_inputs) <= (hi if hi is not None else len(layer_inputs)):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            raise ctx.fail((*path, "input") if "input" in entry else path,
                           f"layer type {ltype!r} takes {want} input(s), got {len(layer_inputs)}")
        options, wheres = _options(ctx, entry, cls.options, path, {"name", "type", "input"})
        wheres["input"] = ctx.where((*path, "input")) if "input" in entry else ctx.where(path)
        cls.validate(names, options, wheres)
        where = ctx.where(path)
        if scope is not None:  # say which instance of the block a message is about
            where = replace(where, path=f"{where.path} (in {qualname})")
            wheres = {k: replace(w, path=f"{w.path} (in {qualname})")
                      for k, w in wheres.items()}
        self.layers.append(LayerSpec(ident, ltype, layer_inputs, options, where, wheres,
                                     qualname, names if names != layer_inputs else ()))
        if len(self.layers) > MAX_LAYERS:
            raise ctx.fail(path, f"more than {MAX_LAYERS} layers once blocks are expanded")
        return ident

    def _inputs(self, entry: dict, path: tuple[str | int, ...], lname: str,
                previous: str | None, scope: _Scope | None) -> tuple[str, ...]:
        ctx = self.ctx
        if "input" not in entry:
            if previous is None:
                where = "the block has" if scope else "the spec has"
                raise ctx.fail(path, f"layer {lname!r} must name its 'input' ({where} "
                                     "several inputs)")
            return (previous,)
        src = entry["input"]
        names = src if isinstance(src, list) else [src]
        if not names:
            raise ctx.fail((*path, "input"), "input list is empty")
        out = []
        for j, item in enumerate(names):
            sub = (*path, "input", j) if isinstance(src, list) else (*path, "input")
            if not isinstance(item, str):
                raise ctx.fail(sub, f"an input is a layer or input name, got {_type_name(item)}")
            out.append(item if scope is None else scope.resolve(ctx, sub, item))
        return tuple(out)

    def _written(self, entry: dict, previous: str | None,
                 scope: _Scope | None) -> tuple[str, ...]:
        """The layer's inputs as the spec names them there: as written under ``input``;
        else the name the previous layer, block input or block instance has in this
        scope."""
        if "input" in entry:
            src = entry["input"]
            return tuple(src) if isinstance(src, list) else (src,)
        if previous is None:
            return ()
        if scope is not None:
            for name, ident in scope.inputs.items():
                if ident == previous:
                    return (name,)
            for name in scope.local:
                if naming.param_var(f"{scope.prefix}.{name}") == previous:
                    return (name,)
        return (self.names.get(previous, previous),)

    def _instance(self, entry: dict, path: tuple[str | int, ...], lname: str, qualname: str,
                  previous: str | None, scope: _Scope | None) -> str:
        ctx = self.ctx
        block = self.blocks[entry["type"]]
        for key in entry:
            if key not in ("name", "type", "input", "repeat"):
                raise ctx.fail((*path, key), f"unknown key {key!r} for an instance of block "
                                             f"{block.name!r} (allowed: input, name, repeat, "
                                             "type)", key=True)
        depth = 1 + (scope.depth if scope else 0)
        if depth > MAX_BLOCK_DEPTH or (scope and block.name in scope.chain):
            why = ("uses itself" if scope and block.name in scope.chain
                   else f"nests blocks deeper than {MAX_BLOCK_DEPTH}")
            raise ctx.fail((*path, "type"), f"block {block.name!r} {why}")
        repeat = entry.get("repeat")
        if repeat is not None and (isinstance(repeat, bool) or not isinstance(repeat, int)
                                   or not 1 <= repeat <= MAX_REPEAT):
            raise ctx.fail((*path, "repeat"), f"repeat is an integer in 1..{MAX_REPEAT}, "
                                              f"got {repeat!r}")
        if repeat is not None and repeat > 1 and len(block.inputs) != 1:
            raise ctx.fail((*path, "repeat"), f"block {block.name!r} has several inputs; "
                                              "only a one-input block can repeat")
        actual = self._inputs(entry, path, lname, previous, scope)
        if len(actual) != len(block.inputs):
            raise ctx.fail((*path, "input") if "input" in entry else path,
                           f"block {block.name!r} takes {len(block.inputs)} input(s) "
                           f"({', '.join(block.inputs)}), got {len(actual)}")
        chain = (*(scope.chain if scope else ()), block.name)
        bpath: tuple[str | int, ...] = ("blocks", block.name, "layers")
        current = actual
        out = ""
        for r in range(repeat or 1):
            prefix = f"{qualname}.{r}" if repeat is not None else qualname
            inner = _Scope(prefix, dict(zip(block.inputs, current, strict=True)),
                           {str(e.get("name")) for e in block.layers}, depth, chain)
            prev = current[0] if len(current) == 1 else None
            for j, child in enumerate(block.layers):
                prev = self.layer(child, (*bpath, j), prev, inner)
            out = naming.param_var(f"{prefix}.{block.output}")
            current = (out,)
        self.outputs[lname if scope is None else naming.param_var(qualname)] = out
        self.names[out] = lname
        return out


@dataclass(frozen=True)
class _Scope:
    """The names visible inside one repetition of a block."""

    prefix: str  # dotted, e.g. "h.0"
    inputs: Mapping[str, str]  # block input name -> identifier it is bound to
    local: set[str]  # the block's layer names
    depth: int
    chain: tuple[str, ...]  # the blocks being expanded, outermost first

    def resolve(self, ctx: _Ctx, path: tuple[str | int, ...], name: str) -> str:
        if name in self.inputs:
            return self.inputs[name]
        if name in self.local:
            return naming.param_var(f"{self.prefix}.{name}")
        raise ctx.fail(path, f"unknown input {name!r} inside a block (a block reads only "
                             f"its inputs {', '.join(self.inputs)} and its own layers)")


def load(path: str | Path) -> ModelSpec:
    """Read and parse a spec file (a regular file: a FIFO or a device could block forever
    or never end, so those are refused before a byte is read)."""
    path = Path(path)
    label = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SpecError("no such file", file=label) from None
    except IsADirectoryError:
        raise SpecError("is a directory, not a spec file", file=label) from None
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", file=label) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise SpecError("is a directory, not a spec file", file=label)
        raise SpecError("not a regular file (a pipe or a device); give a spec file",
                        file=label)
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(yamlsafe.MAX_BYTES + 1)
        except OSError as exc:
            raise SpecError(f"cannot read: {exc.strerror}", file=label) from None
    return parse(data, label)
