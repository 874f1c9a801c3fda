"""Every identifier that reaches generated code is made, or checked, here.

User names (model, layers, inputs, targets, shape symbols) are validated ASCII
identifiers; generated names (``fc1_z``, ``d_fc1_z``, ``fc1_weight``, ``tmp3``) are
derived from them by the functions below, and :func:`claim` guarantees that no two
things in one module end up with the same identifier.
"""

from __future__ import annotations

import builtins
import keyword
import re

IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
MAX_NAME = 64

# Names the templates and printers use themselves; a user name equal to one of these
# (or starting with a reserved prefix) would shadow module structure.
RESERVED = frozenset(
    {
        # modules and the generated functions' own locals and arguments
        "numpy", "torch", "math", "params", "grads", "ctx", "self", "values", "shapes",
        "dtype", "device", "seed", "rng", "generator",
        # module-level names of the generated modules
        "loss", "forward", "init_params", "loss_and_grad", "Model", "LossFunction",
        "PARAM_SHAPES", "TRAINABLE", "INPUT_SHAPES", "TARGET_SHAPES", "SPEC_SHA256",
        "DERIVATIONS",
    }
)
RESERVED_PREFIXES = ("d_", "tmp", "_")


def check_user_name(name: object) -> str | None:
    """Return why ``name`` cannot be a user-chosen name, or None when it is fine."""
    if not isinstance(name, str):
        return f"a name must be a string, not {type(name).__name__}"
    if not name:
        return "a name cannot be empty"
    if len(name) > MAX_NAME:
        return f"name is longer than {MAX_NAME} characters"
    if not name.isascii() or not IDENT.match(name):
        return (f"{name!r} is not a valid name: use ASCII letters, digits and underscores, "
                "starting with a letter")
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"{name!r} is a Python keyword"
    if hasattr(builtins, name):
        return f"{name!r} is a Python builtin"
    if name in RESERVED:
        return f"{name!r} is reserved by the generated modules"
    if "__" in name:
        return f"{name!r} contains a double underscore"
    for prefix in RESERVED_PREFIXES:
        if name.startswith(prefix):
            return f"{name!r} starts with the reserved prefix {prefix!r}"
    return None


def param_name(layer: str, role: str) -> str:
    """The torch-style parameter name: ``fc1.weight``."""
    return f"{layer}.{role}"


def param_var(param: str) -> str:
    """The variable holding a parameter in generated code: ``fc1.weight`` -> ``fc1_weight``."""
    return param.replace(".", "_")


def preactivation(layer: str) -> str:
    return f"{layer}_z"


def adjoint(var: str) -> str:
    """The variable holding dL/d(var)."""
    return f"d_{var}"


TEMP_PREFIX = "tmp"


def temp(index: int) -> str:
    """A common subexpression shared by several statements."""
    return f"{TEMP_PREFIX}{index}"


def partial(index: int) -> str:
    """An intermediate array (a reduction) inside one statement's lowering."""
    return f"{TEMP_PREFIX}_sum{index}"


def claim(registry: dict[str, str], ident: str, owner: str) -> str:
    """Record that ``owner`` uses identifier ``ident``; return the owner already using it."""
    previous = registry.get(ident)
    if previous is not None and previous != owner:
        return previous
    registry[ident] = owner
    return ""
