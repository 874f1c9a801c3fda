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
from collections.abc import Container

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
        "DERIVATIONS", "sgd_step", "adam_step", "DIFFERENTIABLE",
        "merge_lora",
        # arguments and locals of generated functions that also take the user's names
        "wrt", "wanted", "needs", "release", "given",
    }
)

# Attributes of torch.nn.Module (torch 2.13) and of the generated Model: the torch module
# stores layer L as the submodule ``self.L``, so a layer of one of these names would
# replace a method (``to``, ``train``) or the ``training`` flag. Public names only: names
# with a leading underscore are refused for every user name already.
TORCH_MODULE_ATTRS = frozenset(
    {
        "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init",
        "children", "compile", "cpu", "cuda", "double", "dump_patches", "eval",
        "extra_repr", "float", "forward", "get_buffer", "get_extra_state",
        "get_parameter", "get_submodule", "half", "ipu", "load_state_dict", "modules",
        "mtia", "named_buffers", "named_children", "named_modules", "named_parameters",
        "parameters", "register_backward_hook", "register_buffer",
        "register_forward_hook", "register_forward_pre_hook",
        "register_full_backward_hook", "register_full_backward_pre_hook",
        "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook",
        "register_module", "register_parameter", "register_state_dict_post_hook",
        "register_state_dict_pre_hook", "requires_grad_", "set_extra_state",
        "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train",
        "training", "type", "xpu", "zero_grad",
        # the generated Model's own
        "loss", "params", "reset_parameters",
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


def check_layer_name(name: str) -> str | None:
    """Why ``name`` cannot name a layer beyond :func:`check_user_name`, or None."""
    if name in TORCH_MODULE_ATTRS:
        return (f"layer name {name!r} is an attribute of torch.nn.Module (the torch Model "
                f"keeps each layer as a submodule of that name): rename the layer")
    return None


def need_flag(var: str) -> str:
    """The boolean that asks a generated backward for dL/d(var): ``_need_fc1_weight``."""
    return f"_need_{var}"


def param_name(layer: str, role: str) -> str:
    """The torch-style parameter name: ``fc1.weight``."""
    return f"{layer}.{role}"


def param_var(param: str) -> str:
    """The variable holding a parameter in generated code: ``fc1.weight`` -> ``fc1_weight``."""
    return param.replace(".", "_")


def preactivation(layer: str) -> str:
    return f"{layer}_z"


def layer_part(layer: str, part: str) -> str:
    """An intermediate tensor a layer builds from several ops: ``ln1_mean``, ``attn_lse``."""
    return f"{layer}_{part}"


def dense_kernel(kernel: str) -> str:
    """A small convolution's kernel written out as the dense matrix of its map on one
    example: ``conv2_weight_dense``."""
    return f"{kernel}_dense"


def positions(layer: str) -> str:
    """The integer positions 0..T-1 a position embedding reads its rows at."""
    return f"{layer}_positions"


def loss_part(prediction: str, role: str, taken: Container[str] = ()) -> str:
    """An intermediate of a loss over ``prediction``: ``out_lse``, ``out_count``; where
    that name is ``taken`` (a softmax layer's own ``sm_lse``, a second loss term over the
    same prediction), the first free of ``out_lse_2``, ``out_lse_3``, ..."""
    name, n = f"{prediction}_{role}", 1
    while name in taken:
        n += 1
        name = f"{prediction}_{role}_{n}"
    return name


def lora_down(prefix: str) -> str:
    """A low-rank adapter's narrow projection (alpha/r) x A^T of the map ``prefix``
    (``fc1`` or ``attn.c_attn``): ``fc1_lora_xA``."""
    return f"{param_var(prefix)}_lora_xA"


# The keyword a spec with dropout adds to the generated functions (beside ``seed``, which
# is reserved everywhere): an input or target of this name would shadow it.
DROPOUT_KEYWORD = "training"


def dropout_mask(layer: str) -> str:
    """The random mask of dropout layer ``layer``: ``drop1_mask``."""
    return f"{layer}_mask"


def lora_base(prefix: str) -> str:
    """The frozen map x W^T + b of a layer with a low-rank adapter: ``fc1_base``."""
    return f"{param_var(prefix)}_base"


def adjoint(var: str) -> str:
    """The variable holding dL/d(var)."""
    return f"d_{var}"


TEMP_PREFIX = "tmp"


# The weight-decay penalty of a composite loss (a 0-d tensor of the loss).
WEIGHT_DECAY = "weight_decay"


def loss_term(index: int) -> str:
    """Term ``index`` (from 1) of a composite loss (``loss: [...]``)."""
    return f"loss_{index}"


def reduction(layer: str, kind: str, index: int) -> str:
    """The ``index``-th reduction (``kind``: sum, mean, max, argmax, logsumexp) written
    in ``layer``'s formula: ``norm_mean1``."""
    return f"{layer}_{kind}{index}"


def temp(index: int) -> str:
    """A common subexpression shared by several statements."""
    return f"{TEMP_PREFIX}{index}"


def partial(index: int) -> str:
    """An intermediate array (a reduction) inside one statement's lowering."""
    return f"{TEMP_PREFIX}_sum{index}"


def grouped(index: int) -> str:
    """The product of a statement's broadcast factors, taken at their own shape."""
    return f"{TEMP_PREFIX}_bcast{index}"


def claim(registry: dict[str, str], ident: str, owner: str) -> str:
    """Record that ``owner`` uses identifier ``ident``; return the owner already using it."""
    previous = registry.get(ident)
    if previous is not None and previous != owner:
        return previous
    registry[ident] = owner
    return ""
