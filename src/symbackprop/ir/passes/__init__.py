"""Passes over the IR, each a small module that can be read and tested alone.

:func:`function` runs them in order for one generated function: select what its outputs
need, fuse single-use elementwise temporaries, share common subexpressions, then the
pattern passes (convolutions, max pooling's backward and indices, cross-entropy with
class ids, log-softmax, softmax backward, log-softmax backward, products against
stacked parts, the tanh GELU, product + bias, activation-backward kernels, broadcast
factors first, and last the layer norm, whose statements it reads as the others left
them), each pattern recognised in exactly one of them. Freeing after last use
and in-place reuse are the memory pass, run by the printer's caller once the
function's inputs are known.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..nodes import Assign, Program
from .broadcast import broadcast
from .conv import conv
from .cross_entropy import cross_entropy
from .cse import cse
from .fuse import fuse
from .gelu import gelu
from .kernels import kernels
from .layer_norm import layer_norm
from .linear import linear
from .log_softmax import log_softmax
from .log_softmax_backward import log_softmax_backward
from .max_pool import max_pool
from .memory import memory
from .select import select
from .softmax_backward import softmax_backward
from .stacked import stacked


def function(program: Program, outputs: Sequence[str], *,
             keep: Iterable[str] = ()) -> list[Assign]:
    """The optimised statements that compute ``outputs``."""
    protected = {*outputs, *keep}
    stmts = select(program.stmts, outputs)
    stmts = fuse(stmts, program, protected)
    stmts = cse(stmts, program)
    stmts = conv(stmts, program, protected)
    stmts = max_pool(stmts, program, protected)
    stmts = cross_entropy(stmts, program, protected)
    stmts = log_softmax(stmts, program, protected)
    stmts = softmax_backward(stmts, program, protected)
    stmts = log_softmax_backward(stmts, program, protected)
    stmts = stacked(stmts, program, protected)
    stmts = gelu(stmts, program, protected)
    stmts = linear(stmts, program, protected)
    stmts = kernels(stmts, program)
    stmts = broadcast(stmts, program)
    stmts = layer_norm(stmts, program, protected)
    return stmts


__all__ = ["function", "memory", "select", "fuse", "cse", "conv", "max_pool", "cross_entropy",
           "log_softmax", "softmax_backward", "log_softmax_backward", "stacked", "gelu",
           "linear", "kernels", "broadcast", "layer_norm"]
