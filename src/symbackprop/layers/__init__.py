"""The layer, activation and loss registries (importing this module fills them)."""

from . import activations, bilinear, core, dropout, elementwise, losses  # noqa: F401  (registration side effects)
from .base import ACTIVATIONS, LAYERS, LOSSES, Activation, Layer, Loss, Option, Param

__all__ = ["ACTIVATIONS", "LAYERS", "LOSSES", "Activation", "Layer", "Loss", "Option",
           "Param"]
