"""The two example specs against torch models written here by hand (float64, rel <= 1e-9).

These reference networks are independent of symbackprop: plain torch.nn layers and
autograd, with the generated module's parameters loaded by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import example_modules


class SeedNet(torch.nn.Module):
    """The 2-3-1 sigmoid network with mean squared error."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(2, 3)
        self.fc2 = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x))))

    def loss(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.MSELoss()(self(x), t)


class Classifier(torch.nn.Module):
    """64-32-32-10 with tanh, relu and softmax cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.h1 = torch.nn.Linear(64, 32)
        self.h2 = torch.nn.Linear(32, 32)
        self.logits = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(torch.relu(self.h2(torch.tanh(self.h1(x)))))

    def loss(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(x), label)


def _batch(name: str, rng: np.random.Generator, n: int = 7) -> dict[str, np.ndarray]:
    if name == "seed_mlp":
        return {"x": rng.normal(size=(n, 2)), "t": rng.uniform(size=(n, 1))}
    return {"x": rng.normal(size=(n, 64)), "label": np.eye(10)[rng.integers(0, 10, n)]}


@pytest.mark.parametrize("name,net_cls", [("seed_mlp", SeedNet), ("mlp_classifier", Classifier)])
def test_example_matches_handwritten_torch(tmp_path, name, net_cls) -> None:
    mods = example_modules(tmp_path, name)
    rng = np.random.default_rng(7)
    params = mods["numpy"].init_params(seed=11)
    net = net_cls().double()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    batch = _batch(name, rng)
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    ref_loss = net.loss(**tbatch)
    ref_loss.backward()
    ref = {k: p.grad.numpy() for k, p in net.named_parameters()}

    for backend, mod in mods.items():
        wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
        loss, grads = mod.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                        **{k: wrap(v) for k, v in batch.items()})
        assert abs(float(loss) - float(ref_loss.detach())) <= 1e-9 * abs(float(ref_loss.detach()))
        assert set(grads) == set(ref)
        for key, want in ref.items():
            got = grads[key].numpy() if backend == "torch" else grads[key]
            assert got.shape == want.shape
            assert np.max(np.abs(got - want)) <= 1e-9 * np.max(np.abs(want)), (backend, key)
        pred = mod.forward({k: wrap(v) for k, v in params.items()}, x=wrap(batch["x"]))
        pred = pred.numpy() if backend == "torch" else pred
        np.testing.assert_allclose(pred, net(tbatch["x"]).detach().numpy(), rtol=1e-12)
        assert abs(float(mod.loss({k: wrap(v) for k, v in params.items()},
                                  **{k: wrap(v) for k, v in batch.items()}))
                   - float(ref_loss.detach())) <= 1e-12


def test_state_dict_round_trip(tmp_path) -> None:
    """A torch state_dict loads into the numpy module and back, by name."""
    mods = example_modules(tmp_path, "seed_mlp")
    model = mods["torch"].Model(seed=5, dtype=torch.float64)
    assert list(model.state_dict()) == list(mods["numpy"].PARAM_SHAPES)
    assert list(mods["torch"].PARAM_SHAPES) == list(mods["numpy"].PARAM_SHAPES)
    for key, shape in mods["numpy"].PARAM_SHAPES.items():
        assert tuple(model.state_dict()[key].shape) == shape
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).normal(size=(4, 2))
    np.testing.assert_allclose(mods["numpy"].forward(params, x=x),
                               model(x=torch.from_numpy(x)).detach().numpy(), rtol=1e-13)
    fresh = mods["torch"].Model(seed=6, dtype=torch.float64)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in params)


def test_training_reduces_the_loss(tmp_path) -> None:
    """A few hundred steps of gradient descent with the generated gradients learn XOR."""
    mods = example_modules(tmp_path, "seed_mlp")
    m = mods["numpy"]
    params = m.init_params(seed=1)
    x = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    t = np.array([[0.0], [1.0], [1.0], [0.0]])
    first = m.loss(params, x=x, t=t)
    for _ in range(3000):
        _, grads = m.loss_and_grad(params, x=x, t=t)
        params = {k: v - 2.0 * grads[k] for k, v in params.items()}
    assert m.loss(params, x=x, t=t) < 0.5 * first


def test_init_params_dtype_and_determinism(tmp_path) -> None:
    mods = example_modules(tmp_path, "mlp_classifier")
    a = mods["numpy"].init_params(seed=3, dtype=np.float32)
    b = mods["numpy"].init_params(seed=3, dtype=np.float32)
    assert all(v.dtype == np.float32 and np.array_equal(v, b[k]) for k, v in a.items())
    bound = 1 / np.sqrt(64)
    assert np.max(np.abs(a["h1.weight"])) <= bound and np.std(a["h1.weight"]) > bound / 4
    t = mods["torch"].init_params(seed=3, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in t.values())
    assert set(t) == set(a)


def test_model_backward_matches_torch_autograd_and_runs_twice(tmp_path) -> None:
    """Model.loss().backward() fills .grad with what autograd gives the hand-written
    torch.nn model; under retain_graph a second backward adds the same gradient again."""
    mods = example_modules(tmp_path, "mlp_classifier")
    model = mods["torch"].Model(seed=3, dtype=torch.float64)
    net = Classifier().double()
    net.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(5, 64)))
    label = torch.from_numpy(np.eye(10)[rng.integers(0, 10, 5)])
    loss = model.loss(x=x, label=label)
    loss.backward(retain_graph=True)
    ref_loss = net.loss(x, label)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=0.0)
    ref = dict(net.named_parameters())
    for name, param in model.params().items():
        torch.testing.assert_close(param.grad, ref[name].grad, rtol=1e-9, atol=1e-15)
    first = {name: param.grad.clone() for name, param in model.params().items()}
    loss.backward()
    for name, param in model.params().items():
        torch.testing.assert_close(param.grad, 2 * first[name], rtol=1e-15, atol=0.0)
