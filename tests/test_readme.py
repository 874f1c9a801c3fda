"""The README documents every registered layer type, activation and loss."""

from __future__ import annotations

import pytest

from symbackprop.layers import ACTIVATIONS, LAYERS, LOSSES

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("key", sorted({*LAYERS, *ACTIVATIONS, *LOSSES}))
def test_registry_entry_is_documented(key: str) -> None:
    assert f"| `{key}` |" in README, f"README has no table row for `{key}`"


def test_quick_start_commands_are_present() -> None:
    assert "symbackprop generate examples/seed_mlp.yaml" in README
    assert "python -m pytest" in README
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
