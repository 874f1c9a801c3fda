"""The layer, activation and loss registries (importing this module fills them)."""

from . import (  # noqa: F401  (registration side effects)
    activations,
    attention,
    bilinear,
    conv,
    core,
    dropout,
    elementwise,
    embedding,
    losses,
    normalization,
    shape,
)
from .base import ACTIVATIONS, LAYERS, LOSSES, Activation, Layer, Loss, Option, Param

__all__ = ["ACTIVATIONS", "LAYERS", "LOSSES", "Activation", "Layer", "Loss", "Option",
           "Param"]
