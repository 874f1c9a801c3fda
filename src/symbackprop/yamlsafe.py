"""Loading untrusted YAML: safe constructors only, no anchors or aliases, no tags, caps.

Owns the first step of the pipeline. The result is plain Python data (dict, list, str,
int, float, bool, None) plus a table of source positions keyed by the path to each node,
so that every later error can say ``file:line:col``.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from .errors import SpecError

MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 20_000

PathKey = tuple[str | int, ...]
TIMESTAMP = "tag:yaml.org,2002:timestamp"
INT = "tag:yaml.org,2002:int"
MAX_DIGITS = 64


def _allowed(ch: str) -> bool:
    """The characters YAML 1.1 allows in a stream (tab, newlines, printable Unicode)."""
    code = ord(ch)
    return (ch in "\t\n\r" or 0x20 <= code <= 0x7E or code == 0x85
            or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code >= 0x10000)


def _check_characters(text: str, file: str) -> None:
    """Refuse a control character (NUL, ESC, ...) at its own line and column, in one
    line (the YAML reader reports it as two lines at 1:1)."""
    for index, ch in enumerate(text):
        if not _allowed(ch):
            line = text.count("\n", 0, index) + 1
            col = index - (text.rfind("\n", 0, index) + 1) + 1
            raise SpecError(f"control character U+{ord(ch):04X} is not allowed in a spec "
                            "(write it as an escape in a double-quoted string)",
                            file=file, line=line, col=col)


@dataclass(frozen=True)
class Document:
    """Parsed YAML data with the (line, col) of every node, keyed by its path."""

    data: object
    marks: dict[PathKey, tuple[int, int]]
    key_marks: dict[PathKey, tuple[int, int]]
    file: str


def _fail(file: str, mark: yaml.Mark | None, message: str) -> SpecError:
    line = mark.line + 1 if mark is not None else 1
    col = mark.column + 1 if mark is not None else 1
    return SpecError(message, file=file, line=line, col=col)


def load(text: str | bytes, file: str) -> Document:
    """Parse ``text`` as one YAML document of plain data, or raise :class:`SpecError`."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError(f"spec is {len(text)} bytes; the limit is {MAX_BYTES}", file=file)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"spec is not UTF-8 text ({exc.reason})", file=file) from None
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise SpecError(f"spec is larger than the limit of {MAX_BYTES} bytes", file=file)
    if not text.strip():
        raise SpecError("spec is empty", file=file)
    _check_characters(text, file)

    # Check the event stream before composing anything: aliases are refused here, so an
    # alias bomb is rejected after reading its first anchor, in constant time.
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            anchor = getattr(event, "anchor", None)
            if isinstance(event, yaml.AliasEvent) or anchor is not None:
                raise _fail(file, event.start_mark, "YAML anchors and aliases are not allowed")
            tag = getattr(event, "tag", None)
            if tag is not None:
                raise _fail(file, event.start_mark, f"YAML tags are not allowed (found {tag!r})")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _fail(file, event.start_mark, f"nesting deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context).split())
        raise _fail(file, mark, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:  # pragma: no cover - defensive, pyyaml always marks
        raise SpecError(f"invalid YAML: {exc}", file=file) from None
    if node is None:
        raise SpecError("spec is empty", file=file)

    marks: dict[PathKey, tuple[int, int]] = {}
    key_marks: dict[PathKey, tuple[int, int]] = {}
    constructor = yaml.constructor.SafeConstructor()
    count = 0

    def convert(n: yaml.Node, path: PathKey) -> object:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise _fail(file, n.start_mark, f"spec has more than {MAX_NODES} YAML nodes")
        marks[path] = (n.start_mark.line + 1, n.start_mark.column + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[str, object] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _fail(file, key_node.start_mark, "mapping keys must be plain strings")
                key = scalar(key_node)
                if not isinstance(key, str):
                    raise _fail(file, key_node.start_mark, f"mapping key {key!r} is not a string")
                if key in out:
                    raise _fail(file, key_node.start_mark, f"duplicate key {key!r}")
                key_marks[(*path, key)] = (key_node.start_mark.line + 1,
                                           key_node.start_mark.column + 1)
                out[key] = convert(value_node, (*path, key))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(item, (*path, i)) for i, item in enumerate(n.value)]
        return scalar(n)

    def scalar(n: yaml.Node) -> object:
        if n.tag == TIMESTAMP:
            # 2001-02-03 is a date to YAML 1.1 (and 2001-02-30 an error); no field of a
            # spec is a date, so it stays the text it looks like.
            return n.value
        if n.tag == INT and sum(ch.isalnum() for ch in n.value) > MAX_DIGITS:
            raise _fail(file, n.start_mark, f"integer with more than {MAX_DIGITS} digits")
        try:
            return constructor.construct_object(n)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            problem = " ".join(str(exc).split())
            raise _fail(file, n.start_mark, f"invalid scalar: {problem}") from None

    data = convert(node, ())
    return Document(data=data, marks=marks, key_marks=key_marks, file=file)
