"""Shared test helpers: compile spec text, generate modules into tmp folders, load them."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from symbackprop.api import CompiledModel, compile_spec
from symbackprop.check import load_module
from symbackprop.emit.render import module_filename

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def write_spec(folder: Path, text: str, name: str = "model.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def build(folder: Path, text: str) -> tuple[CompiledModel, dict[str, ModuleType]]:
    """Compile spec text, write both modules into ``folder``, import them."""
    spec_path = write_spec(folder, text)
    model = compile_spec(spec_path)
    modules = {}
    for backend in ("numpy", "torch"):
        out = folder / module_filename(model.spec.name, backend)
        out.write_text(model.source(backend), encoding="utf-8")
        modules[backend] = load_module(out)
    return model, modules


def example_modules(folder: Path, name: str) -> dict[str, ModuleType]:
    """Generate ``examples/<name>.yaml`` into ``folder`` and import both modules."""
    model = compile_spec(EXAMPLES / f"{name}.yaml")
    out = {}
    for backend in ("numpy", "torch"):
        path = folder / module_filename(name, backend)
        path.write_text(model.source(backend), encoding="utf-8")
        out[backend] = load_module(path)
    return out


@pytest.fixture
def tmp_build(tmp_path: Path):
    def _build(text: str) -> tuple[CompiledModel, dict[str, ModuleType]]:
        return build(tmp_path, text)

    return _build
