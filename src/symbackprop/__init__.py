"""symbackprop: derive backpropagation symbolically and emit standalone code.

The library API (the CLI is a thin layer over it)::

    import symbackprop
    model = symbackprop.compile_spec("examples/seed_mlp.yaml")
    sources = model.sources()                  # {"numpy": "...", "torch": "..."}
    symbackprop.generate("examples/seed_mlp.yaml", out="generated")
    doc = symbackprop.derive("examples/seed_mlp.yaml")  # the chain rule, in LaTeX
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import CompiledModel, compile_spec, generate  # noqa: E402
from .api import derive_document as derive  # noqa: E402
from .errors import SpecError, SymbackpropError  # noqa: E402

__all__ = ["CompiledModel", "SpecError", "SymbackpropError", "__version__", "compile_spec",
           "derive", "generate"]
