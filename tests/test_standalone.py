"""Generated modules stand alone: numpy needs no torch or sympy; torch pins no device."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from symbackprop.api import compile_spec
from symbackprop.check import load_module

from conftest import EXAMPLES

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "sympy", "symbackprop", "jinja2", "yaml"}:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
"""


def test_numpy_module_runs_without_torch_or_sympy(tmp_path) -> None:
    for name in ("seed_mlp", "mlp_classifier"):
        model = compile_spec(EXAMPLES / f"{name}.yaml")
        (tmp_path / f"{name}_numpy.py").write_text(model.source("numpy"), encoding="utf-8")
    script = BLOCKER + textwrap.dedent("""
        import numpy, sys
        sys.path.insert(0, sys.argv[1])
        import seed_mlp_numpy as m, mlp_classifier_numpy as c
        assert "torch" not in sys.modules and "sympy" not in sys.modules
        p = m.init_params(0)
        loss, grads = m.loss_and_grad(p, x=numpy.ones((3, 2)), t=numpy.zeros((3, 1)))
        assert set(grads) == set(m.PARAM_SHAPES)
        p = c.init_params(0)
        loss, grads = c.loss_and_grad(p, x=numpy.ones((3, 64)), label=numpy.eye(10)[:3])
        print("ok", float(loss))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_generated_sources_import_nothing_else() -> None:
    import ast

    for name in ("seed_mlp", "mlp_classifier"):
        model = compile_spec(EXAMPLES / f"{name}.yaml")
        # sys: the torch module's _tanh reads numpy from sys.modules (never imports it)
        for backend, allowed in (("numpy", {"numpy", "math"}), ("torch", {"torch", "sys"})):
            tree = ast.parse(model.source(backend))
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    imported.add((node.module or "").split(".")[0])
            assert imported <= allowed, (backend, imported)


def test_torch_module_runs_on_meta_tensors(tmp_path) -> None:
    """Nothing pins a device: every function works on shape-only 'meta' tensors."""
    model = compile_spec(EXAMPLES / "mlp_classifier.yaml")
    path = tmp_path / "mlp_classifier_torch.py"
    path.write_text(model.source("torch"), encoding="utf-8")
    mod = load_module(path)
    meta = torch.device("meta")
    params = mod.init_params(0, dtype=torch.float32, device=meta)
    x = torch.empty((8, 64), device=meta)
    label = torch.empty((8, 10), device=meta)
    loss, grads = mod.loss_and_grad(params, x=x, label=label)
    assert loss.device.type == "meta" and loss.shape == ()
    for key, shape in mod.PARAM_SHAPES.items():
        assert grads[key].device.type == "meta" and tuple(grads[key].shape) == shape
    net = mod.Model(device=meta)
    out = net.loss(x=x, label=label)
    out.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta"
               for p in net.parameters())
    assert tuple(net(x=x).shape) == (8, 10)


def test_shape_errors_are_clear(tmp_path) -> None:
    model = compile_spec(EXAMPLES / "seed_mlp.yaml")
    path = tmp_path / "seed_mlp_numpy.py"
    path.write_text(model.source("numpy"), encoding="utf-8")
    mod = load_module(path)
    import numpy as np
    import pytest

    with pytest.raises(ValueError, match=r"t: expected shape \(3, 1\), got \(3, 2\)"):
        mod.loss(mod.init_params(0), x=np.ones((3, 2)), t=np.ones((3, 2)))


def test_torch_module_never_mentions_numpy_or_math() -> None:
    """The torch printer maps every function to torch (a stray numpy. would fail on CUDA)."""
    from symbackprop.api import compile_text

    formula = ("exp(a) + log1p(x**2) + sqrt(1 + a**2) + sin(a) * cos(x) + cosh(a/9) + tanh(a)"
               " + erf(a) + sigmoid(a) + softplus(a) + logsigmoid(x) + abs(a) + max(a, x)"
               " + min(a, x) + where(a > x, a, x) + pi + e + expm1(a) + erfc(a) + sinh(a/9)")
    text = f"""
    name: every_function
    inputs: {{x: [N, 3]}}
    targets: {{t: [N, 3]}}
    layers:
      - {{name: a, type: dense, units: 3, activation: gelu}}
      - {{name: g, type: elementwise, input: [a, x], formula: "{formula}"}}
    loss: {{formula: "log(cosh(y - t))", target: t}}
    """
    source = compile_text(textwrap.dedent(text)).source("torch")
    import ast

    names = {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}
    assert not names & {"numpy", "np", "math"} and "math." not in source
    # numpy appears once in code: _tanh's optional use of the numpy torch has loaded
    assert source.count('sys.modules.get("numpy")') == 1
    assert "numpy." not in source.replace("numpy's", "")
