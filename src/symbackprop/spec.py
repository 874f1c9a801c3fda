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
from dataclasses import dataclass, field
from pathlib import Path

from . import naming, yamlsafe
from .errors import SpecError

TOP_KEYS = ("name", "description", "inputs", "targets", "layers", "loss")
MAX_DIM = 1 << 24
MAX_LAYERS = 512
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
    name: str
    shape: tuple[int | str, ...]
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
    name: str
    type: str
    inputs: tuple[str, ...]
    options: Mapping[str, object]
    where: Where
    option_where: Mapping[str, Where]


@dataclass(frozen=True)
class LossSpec:
    type: str
    prediction: str
    target: str | None
    options: Mapping[str, object]
    where: Where
    option_where: Mapping[str, Where]


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
    for name, shape in table.items():
        _name(ctx, name, (key, name))
        out.append(TensorDecl(name, _shape(ctx, shape, (key, name)), ctx.where((key, name),
                                                                                   key=True)))
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
        if isinstance(item, dict | list):
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
    from .layers import LAYERS, LOSSES

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
    layers: list[LayerSpec] = []
    previous = inputs[0].name if len(inputs) == 1 else None
    for i, entry in enumerate(layers_raw):
        path: tuple[str | int, ...] = ("layers", i)
        entry = _mapping(ctx, entry, path)
        if "name" not in entry:
            raise ctx.fail(path, "a layer needs a 'name'")
        lname = _name(ctx, entry["name"], (*path, "name"))
        why = naming.check_layer_name(lname)
        if why:
            raise ctx.fail((*path, "name"), why)
        if lname in seen:
            raise ctx.fail((*path, "name"), f"name {lname!r} is already used")
        seen[lname] = ctx.where((*path, "name"))
        if "type" not in entry:
            raise ctx.fail(path, f"layer {lname!r} needs a 'type'")
        ltype = entry["type"]
        if not isinstance(ltype, str) or ltype not in LAYERS:
            raise ctx.fail((*path, "type"), f"unknown layer type {ltype!r}; known: "
                                            f"{', '.join(sorted(LAYERS))}")
        cls = LAYERS[ltype]
        if "input" in entry:
            src = entry["input"]
            names = src if isinstance(src, list) else [src]
            if not names:
                raise ctx.fail((*path, "input"), "input list is empty")
            for j, item in enumerate(names):
                sub = (*path, "input", j) if isinstance(src, list) else (*path, "input")
                if not isinstance(item, str):
                    raise ctx.fail(sub, f"an input is a layer or input name, "
                                        f"got {_type_name(item)}")
            layer_inputs = tuple(names)
        else:
            if previous is None:
                raise ctx.fail(path, f"layer {lname!r} must name its 'input' (the spec has "
                                     "several inputs)")
            layer_inputs = (previous,)
        lo, hi = cls.arity
        if not lo <= len(layer_inputs) <= (hi if hi is not None else len(layer_inputs)):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            raise ctx.fail((*path, "input") if "input" in entry else path,
                           f"layer type {ltype!r} takes {want} input(s), got {len(layer_inputs)}")
        options, wheres = _options(ctx, entry, cls.options, path, {"name", "type", "input"})
        wheres["input"] = ctx.where((*path, "input")) if "input" in entry else ctx.where(path)
        cls.validate(layer_inputs, options, wheres)
        layers.append(LayerSpec(lname, ltype, layer_inputs, options, ctx.where(path), wheres))
        previous = lname

    loss_raw = _mapping(ctx, top["loss"], ("loss",))
    if "type" not in loss_raw and "formula" not in loss_raw:
        raise ctx.fail(("loss",), "the loss needs a 'type' (or a 'formula')")
    ltype = loss_raw.get("type", "formula")
    if not isinstance(ltype, str) or ltype not in LOSSES:
        raise ctx.fail(("loss", "type"), f"unknown loss {ltype!r}; known: "
                                         f"{', '.join(sorted(LOSSES))}")
    loss_cls = LOSSES[ltype]
    prediction = loss_raw.get("prediction", layers[-1].name)
    if not isinstance(prediction, str):
        raise ctx.fail(("loss", "prediction"), "prediction is a layer name")
    target = loss_raw.get("target")
    if target is None and loss_cls.needs_target:
        raise ctx.fail(("loss",), f"loss {ltype!r} needs a 'target'")
    if target is not None and not isinstance(target, str):
        raise ctx.fail(("loss", "target"), "target is a name from 'targets'")
    loss_options, loss_wheres = _options(ctx, loss_raw, loss_cls.options, ("loss",),
                                         {"type", "prediction", "target"})
    loss_cls.validate(loss_options, loss_wheres)
    loss_wheres.setdefault("prediction", ctx.where(("loss", "prediction")))
    loss_wheres.setdefault("target", ctx.where(("loss", "target")))
    loss = LossSpec(ltype, prediction, target, loss_options, ctx.where(("loss",)), loss_wheres)
    return ModelSpec(name, description, inputs, targets, tuple(layers), loss, file,
                     hashlib.sha256(raw).hexdigest(), ctx.where(()))


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
