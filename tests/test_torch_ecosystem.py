"""The generated torch Model as a torch user uses any nn.Module, checked against torch itself.

Every gradient here is compared with torch autograd over an independent ``torch.nn`` twin
(the same network written by hand, parameters loaded by name), with finite differences
(gradcheck), or with the functional ``loss_and_grad``: gradcheck and gradgradcheck, a
Hessian-vector product through the generated backward, torch.func (grad, vmap, jacrev),
torch.compile with fullgraph=True, torch.export, DistributedDataParallel (gloo, two
processes), autocast with the backward inside and outside the context, frozen parameters
unfrozen at run time, the gradient into the inputs, an upstream nn.Linear, Adam. The
numpy module's ``wrt=``, ``sgd_step`` and ``adam_step`` are checked against torch too.

Tests taking ``device`` also run on CUDA where a GPU is present (skipped otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from test_cnn import Cnn

from symbackprop.api import compile_spec, compile_text
from symbackprop.check import load_module
from symbackprop.emit.guards import guards
from symbackprop.errors import SpecError

from conftest import EXAMPLES, build, example_modules

F64 = torch.float64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]

FROZEN_SPEC = """
name: adapter
inputs: {x: [N, 4]}
targets: {t: [N, 2]}
layers:
  - {name: base, type: dense, units: 5, activation: tanh, trainable: false}
  - {name: head, type: dense, units: 2}
loss: {type: mse, target: t}
"""


class SeedNet(torch.nn.Module):
    """examples/seed_mlp.yaml by hand: 2-3-1, sigmoid, mean squared error."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(2, 3)
        self.fc2 = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x)))), t)


class Classifier(torch.nn.Module):
    """examples/mlp_classifier.yaml by hand: 64-32-32-10, tanh, relu, cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.h1 = torch.nn.Linear(64, 32)
        self.h2 = torch.nn.Linear(32, 32)
        self.logits = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(torch.relu(self.h2(torch.tanh(self.h1(x))))), label)


class Adapter(torch.nn.Module):
    """FROZEN_SPEC by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 5)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.head(torch.tanh(self.base(x))), t)


TWINS = {"seed_mlp": SeedNet, "mlp_classifier": Classifier, "adapter": Adapter}


@pytest.fixture(scope="module")
def mods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Both generated modules of the two examples and of FROZEN_SPEC, written once."""
    folder = tmp_path_factory.mktemp("ecosystem")
    out: dict[str, dict] = {}
    for name in ("seed_mlp", "mlp_classifier"):
        model = compile_spec(EXAMPLES / f"{name}.yaml")
        out[name] = {}
        for backend in ("numpy", "torch"):
            path = folder / f"{name}_{backend}.py"
            path.write_text(model.source(backend), encoding="utf-8")
            out[name][backend] = load_module(path)
            out[name][backend + "_path"] = path
    sub = folder / "adapter"
    sub.mkdir()
    _, built = build(sub, FROZEN_SPEC)
    out["adapter"] = dict(built)
    return out


def batch(name: str, n: int = 6, seed: int = 0, device: str = "cpu",
          dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "seed_mlp":
        b = {"x": torch.randn(n, 2, generator=g), "t": torch.rand(n, 1, generator=g)}
    elif name == "adapter":
        b = {"x": torch.randn(n, 4, generator=g), "t": torch.randn(n, 2, generator=g)}
    else:
        b = {"x": torch.randn(n, 64, generator=g),
             "label": torch.softmax(2 * torch.randn(n, 10, generator=g), dim=1)}
    return {k: v.to(device=device, dtype=dtype) for k, v in b.items()}


def pair(mods: dict, name: str, *, seed: int = 3, device: str = "cpu",
         dtype: torch.dtype = F64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The generated Model and its twin with the same parameter values."""
    model = mods[name]["torch"].Model(seed=seed, dtype=dtype, device=device)
    twin = TWINS[name]().to(device=device, dtype=dtype)
    twin.load_state_dict(model.state_dict())
    for key, p in twin.named_parameters():
        p.requires_grad_(model.get_parameter(key).requires_grad)
    return model, twin


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in module.named_parameters() if p.grad is not None}


def close(a: dict, b: dict, tol: float) -> None:
    assert a and a.keys() == b.keys()
    for key in a:
        scale = max(float(b[key].detach().abs().max()), 1e-30)
        err = float((a[key].detach().to(b[key].dtype) - b[key].detach()).abs().max()) / scale
        assert err <= tol, (key, err)


def apply_loss(mod):
    """The loss as a function of (inputs, targets, parameters), through LossFunction."""
    def f(*args: torch.Tensor) -> torch.Tensor:
        return mod.LossFunction.apply(*args)[0]
    return f


# ------------------------------------------------------------------ first and second order
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["seed_mlp", "mlp_classifier"])
def test_gradcheck_and_gradgradcheck(mods, name, device) -> None:
    """Every argument (inputs, targets, parameters) against finite differences, and the
    generated backward's own derivative (gradgradcheck)."""
    mod = mods[name]["torch"]
    model = mod.Model(seed=1, dtype=F64, device=device)
    b = batch(name, n=4, device=device)
    args = [v.requires_grad_() for v in b.values()] + list(model.parameters())
    f = apply_loss(mod)
    fast = name == "mlp_classifier"  # thousands of entries: one random direction
    assert torch.autograd.gradcheck(f, args, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, args, fast_mode=fast)


@pytest.mark.parametrize("name", ["seed_mlp", "mlp_classifier"])
def test_hessian_vector_product_through_generated_backward(mods, name) -> None:
    model, twin = pair(mods, name)
    b = batch(name, seed=1)
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}

    def hvp(module: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        names, params = zip(*module.named_parameters(), strict=True)
        g = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((gi * v[k]).sum() for k, gi in zip(names, g, strict=True))
        return dict(zip(names, torch.autograd.grad(dot, params), strict=True))

    close(hvp(model, model(**b)), hvp(twin, twin(**b)), 1e-10)


def test_backward_twice_with_retain_graph(mods) -> None:
    model, _ = pair(mods, "mlp_classifier")
    loss = model(**batch("mlp_classifier"))
    loss.backward(retain_graph=True)
    once = {k: g.clone() for k, g in grads(model).items()}
    loss.backward()
    close(grads(model), {k: 2 * g for k, g in once.items()}, 1e-15)


def test_large_intermediates_freed_early_then_recomputed_for_a_second_backward(mods) -> None:
    """With intermediates of 64 KiB and more, the first backward frees them after their
    last use (peak memory as autograd's); a second backward under retain_graph computes
    them again and adds the same gradient. Small ones are never freed."""
    model, twin = pair(mods, "mlp_classifier")
    b = batch("mlp_classifier", n=512)
    loss = model(**b)
    kept = loss.grad_fn.saved_tensors[len(b) + 6:]  # after the arguments: inputs, params
    assert max(t.nbytes for t in kept) >= 65536
    loss.backward(retain_graph=True)
    assert any(t.untyped_storage().nbytes() == 0 for t in loss.grad_fn.saved_tensors)
    once = {k: g.clone() for k, g in grads(model).items()}
    twin(**b).backward()
    close(once, grads(twin), 1e-12)
    loss.backward()
    close(grads(model), {k: 2 * g for k, g in once.items()}, 1e-15)
    small = model(**batch("mlp_classifier"))
    small.backward(retain_graph=True)
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in small.grad_fn.saved_tensors)


def test_intermediates_are_freed_beside_views_of_parameters(tmp_path) -> None:
    """gpt_block saves attention's per-head weights, a view of c_attn.weight: once no
    intermediate was freed early when any one was a view (peak 2.9 MiB against eager's
    1.9 in a step). Now each intermediate whose storage nothing else shares is freed
    after its last use; the parameters' own storage is never touched."""
    mod = example_modules(tmp_path, "gpt_block")["torch"]
    model = mod.Model(seed=3, dtype=torch.float32)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 64, 32, generator=gen), torch.randn(8, 64, 32, generator=gen)
    loss = model(x=x, t=t)
    saved = loss.grad_fn.saved_tensors
    arguments, kept = saved[:14], saved[14:]
    param_storages = {a.untyped_storage().data_ptr() for a in arguments}
    big = [k for k in kept if k.untyped_storage().nbytes() >= 65536
           and k.untyped_storage().data_ptr() not in param_storages]
    views = [k for k in kept if k.untyped_storage().data_ptr() in param_storages]
    assert big and views  # attn_p, mlp_c_fc, ...; attn_w, attn_wp
    del saved, arguments, kept
    loss.backward(retain_graph=True)
    assert all(k.untyped_storage().nbytes() == 0 for k in big)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), k
    once = {k: p.grad.clone() for k, p in model.named_parameters()}
    loss.backward()  # the intermediates computed again from the arguments
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * once[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["seed_mlp", "mlp_classifier"])
def test_gradient_into_inputs_matches_twin(mods, name, device) -> None:
    model, twin = pair(mods, name, device=device)
    b = batch(name, device=device)
    xs = b["x"].clone().requires_grad_()
    xt = b["x"].clone().requires_grad_()
    model(**{**b, "x": xs}).backward()
    twin(**{**b, "x": xt}).backward()
    close({"x": xs.grad, **grads(model)}, {"x": xt.grad, **grads(twin)}, 1e-12)


def test_target_gradient_matches_twin(mods) -> None:
    """A target that requires grad (distillation from a teacher) gets its gradient."""
    model, twin = pair(mods, "mlp_classifier")
    b = batch("mlp_classifier")
    ls = b["label"].clone().requires_grad_()
    lt = b["label"].clone().requires_grad_()
    model(x=b["x"], label=ls).backward()
    twin(b["x"], lt).backward()
    close({"label": ls.grad}, {"label": lt.grad}, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_parameter_unfrozen_at_run_time(mods, device) -> None:
    model, twin = pair(mods, "adapter", device=device)
    assert not model.base.weight.requires_grad
    b = batch("adapter", device=device)
    model(**b).backward()
    assert model.base.weight.grad is None and model.base.bias.grad is None
    model.zero_grad()
    model.base.weight.requires_grad_(True)
    twin.base.weight.requires_grad_(True)
    model(**b).backward()
    twin(**b).backward()
    assert model.base.bias.grad is None
    close(grads(model), grads(twin), 1e-12)


def test_backward_skips_gradients_nobody_asked_for(mods) -> None:
    """The generated backward computes only what needs_input_grad asks for."""
    mod = mods["seed_mlp"]["torch"]
    model = mod.Model(seed=2, dtype=F64)
    b = batch("seed_mlp")
    outputs = mod.LossFunction.apply(b["x"], b["t"], *model.parameters())
    args = (b["x"], b["t"], *model.parameters())
    for wanted in range(len(args)):
        needs = tuple(i == wanted for i in range(len(args)))
        got = mod._loss_backward(needs, False, torch.ones((), dtype=F64), *args, *outputs[1:])
        assert [g is not None for g in got] == list(needs)
    # The guards themselves: a statement runs under the union of what needs it.
    class S:
        def __init__(self, target: str, reads: set[str], *also: str) -> None:
            self.targets, self.reads = (target, *also), frozenset(reads)
    stmts = [S("a", {"in"}), S("ga", {"a"}), S("b", {"a"}), S("gb", {"b"}), S("gc", {"b"})]
    assert guards(stmts, {"ga": "na", "gb": "nb", "gc": "nc"}) == [
        "", "na", "nb or nc", "nb", "nc"]
    assert guards(stmts, {"ga": None, "gb": "nb", "gc": "nc"})[0] == ""
    # a statement with several results (a layer norm's backward: the input's, the
    # weight's and the bias's gradients) runs when any of them is asked for
    stmts = [S("a", {"in"}), S("gx", {"a"}, "gw", "gb"), S("gy", {"in"})]
    assert guards(stmts, {"gx": "nx", "gw": "nw", "gb": "nb", "gy": "ny"}) == [
        "nx or nw or nb", "nx or nw or nb", "ny"]


# ------------------------------------------------------------------ torch.func
@pytest.mark.parametrize("name", ["seed_mlp", "mlp_classifier"])
def test_torch_func_on_functional_loss(mods, name) -> None:
    from torch.func import grad, jacrev, vmap

    mod = mods[name]["torch"]
    params = mod.init_params(4, dtype=F64)
    b = batch(name, n=5)
    _, want = mod.loss_and_grad(params, **b)
    twin = TWINS[name]().to(F64)  # the independent reference: autograd of the nn twin
    twin.load_state_dict(params)
    twin(**b).backward()
    close(want, grads(twin), 1e-12)
    close(grad(lambda p: mod.loss(p, **b))(params), want, 1e-13)
    close(jacrev(lambda p: mod.loss(p, **b))(params), want, 1e-13)

    # Per-example gradients with vmap, against loss_and_grad one example at a time.
    one = {k: v[:, None] for k, v in b.items()}  # (N, 1, ...): a batch of one per example
    per = vmap(grad(lambda p, ex: mod.loss(p, **ex)), in_dims=(None, 0))(params, one)
    for i in range(5):
        _, gi = mod.loss_and_grad(params, **{k: v[i] for k, v in one.items()})
        close({k: v[i] for k, v in per.items()}, gi, 1e-12)


def test_torch_func_through_model(mods) -> None:
    """functional_call + torch.func.grad / vmap run the generated backward itself."""
    from torch.func import functional_call, grad, vmap

    model, twin = pair(mods, "mlp_classifier", seed=5)
    params = {k: v.detach() for k, v in model.named_parameters()}
    b = batch("mlp_classifier", n=4)
    twin(**b).backward()
    close(grad(lambda p: functional_call(model, p, (), b))(params), grads(twin), 1e-12)
    one = {k: v[:, None] for k, v in b.items()}
    per = vmap(grad(lambda p, ex: functional_call(model, p, (), ex)),
               in_dims=(None, 0))(params, one)
    twin.zero_grad()
    twin(**{k: v[0] for k, v in one.items()}).backward()
    close({k: v[0] for k, v in per.items()}, grads(twin), 1e-12)


# ------------------------------------------------------------------ nn.Module integration
def test_forward_returns_loss_or_prediction_and_hooks_fire(mods) -> None:
    model, twin = pair(mods, "mlp_classifier")
    b = batch("mlp_classifier")
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, out: seen.append(out),
                                with_kwargs=True)
    loss = model(**b)
    assert loss.shape == () and seen[-1] is loss
    assert torch.equal(model.loss(**b), loss) and len(seen) == 2  # the alias calls too
    prediction = model(x=b["x"])
    assert prediction.shape == (6, 10) and seen[-1] is prediction
    assert abs(loss.item() - twin(**b).item()) < 1e-13


def test_parameters_replaced_after_init_are_the_ones_used(mods) -> None:
    """The Model reads its parameters from the modules' tables on every call: a parameter
    (or a whole submodule) assigned after __init__ is used and gets the gradient; one
    deleted raises torch's own AttributeError."""
    model, twin = pair(mods, "mlp_classifier")
    b = batch("mlp_classifier")
    weight = torch.nn.Parameter(torch.randn(32, 64, dtype=F64))
    model.h1.weight = weight
    with torch.no_grad():
        twin.h1.weight.copy_(weight)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(10, 32, dtype=F64))
    layer.bias = torch.nn.Parameter(torch.randn(10, dtype=F64))
    model.logits = layer
    twin.logits.load_state_dict(layer.state_dict())
    model(**b).backward()
    twin(**b).backward()
    close(grads(model), grads(twin), 1e-12)
    assert weight.grad is not None and layer.weight.grad is not None
    del model.h2.bias
    with pytest.raises(AttributeError, match="bias"):
        model(**b)


def test_upstream_linear_trains(mods) -> None:
    torch.manual_seed(0)
    model, twin = pair(mods, "mlp_classifier")
    encoder = torch.nn.Linear(64, 64, dtype=F64)
    twin_encoder = torch.nn.Linear(64, 64, dtype=F64)
    twin_encoder.load_state_dict(encoder.state_dict())
    b = batch("mlp_classifier", n=16)
    model(x=encoder(b["x"]), label=b["label"]).backward()
    twin(twin_encoder(b["x"]), b["label"]).backward()
    close(grads(encoder), grads(twin_encoder), 1e-12)

    # Only the encoders learn; the generated model and the twin stay fixed.
    model.requires_grad_(False)
    twin.requires_grad_(False)
    losses = []
    for enc, net in ((encoder, model), (twin_encoder, twin)):
        optimizer = torch.optim.Adam(enc.parameters(), lr=0.05)
        first = net(enc(b["x"]), b["label"]).item() if net is twin else \
            net(x=enc(b["x"]), label=b["label"]).item()
        for _ in range(30):
            optimizer.zero_grad()
            if net is twin:
                net(enc(b["x"]), b["label"]).backward()
            else:
                net(x=enc(b["x"]), label=b["label"]).backward()
            optimizer.step()
        losses.append((first, net(enc(b["x"]), b["label"]).item() if net is twin
                       else net(x=enc(b["x"]), label=b["label"]).item()))
    assert losses[0][1] < losses[0][0] - 0.2
    close(dict(encoder.named_parameters()), dict(twin_encoder.named_parameters()), 1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_adam_100_steps_matches_twin(mods, device) -> None:
    model, twin = pair(mods, "mlp_classifier", device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for step in range(100):
        b = batch("mlp_classifier", n=8, seed=step, device=device)
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            m(**b).backward()
            o.step()
    close(dict(model.named_parameters()), dict(twin.named_parameters()), 1e-9)


def test_saved_tensor_hooks_and_checkpoint(mods) -> None:
    model, twin = pair(mods, "mlp_classifier")
    b = batch("mlp_classifier")
    twin(**b).backward()
    with torch.autograd.graph.save_on_cpu():
        model(**b).backward()
    close(grads(model), grads(twin), 1e-12)
    model.zero_grad()
    from torch.utils.checkpoint import checkpoint

    checkpoint(lambda x, label: model(x=x, label=label), b["x"], b["label"],
               use_reentrant=False).backward()
    close(grads(model), grads(twin), 1e-12)


def test_parameters_created_on_requested_device_and_dtype(mods) -> None:
    mod = mods["mlp_classifier"]["torch"]
    model = mod.Model(seed=7, dtype=torch.float32)
    ref = mod.init_params(7, dtype=torch.float32)
    for key, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), ref[key])
    meta = mod.Model(device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert meta(**batch("mlp_classifier", device="meta", dtype=torch.float32)).is_meta


def test_layer_named_like_a_module_attribute_is_refused() -> None:
    for bad in ("to", "training", "train", "cuda", "state_dict", "reset_parameters"):
        with pytest.raises(SpecError, match="attribute of torch.nn.Module"):
            compile_text(f"""
name: m
inputs: {{x: [N, 2]}}
targets: {{t: [N, 1]}}
layers: [{{name: {bad}, type: dense, units: 1}}]
loss: {{type: mse, target: t}}
""")


def test_torch_compile_fullgraph_training_step(mods) -> None:
    """One small model: compiling is slow on a small CPU machine."""
    model, twin = pair(mods, "seed_mlp", dtype=torch.float32)
    b = batch("seed_mlp", dtype=torch.float32)
    explained = torch._dynamo.explain(model)(**b)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    twin(**b).backward()
    want = grads(twin)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(**b)
    loss.backward()
    assert abs(float(loss) - float(model(**b))) < 1e-6
    close(grads(model), want, 1e-5)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("cnn") / "cnn_torch.py"
    path.write_text(compile_spec(EXAMPLES / "cnn.yaml").source("torch"), encoding="utf-8")
    model = load_module(path).Model(seed=1, dtype=F64)
    with torch.no_grad():
        # conv1 passes the image through to every channel (plus a little of the corner
        # pixel, so that the weight gradient sees where the pooling routed), so the
        # pooling sees the small integer pixels themselves: many windows whose maximum,
        # positive, is tied, where the routing decides which pixel gets the gradient
        model.conv1.weight.zero_()
        model.conv1.weight[:, 0, 1, 1] = 1.0
        model.conv1.weight[:, 0, 0, 0] = 1e-3 * torch.arange(1, 9, dtype=F64)
        model.conv1.bias.zero_()
    twin = Cnn().to(F64)
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    b = {"x": torch.randint(1, 4, (6, 1, 8, 8), generator=g).to(F64),
         "label": torch.randint(0, 10, (6,), generator=g)}
    return model, twin, b


def test_vmap_per_example_gradients_with_integer_class_ids(cnn) -> None:
    """Integer ids are checked under vmap too (every example's at once), and each
    example's gradient is the twin's on that example alone."""
    from torch.func import functional_call, grad, vmap

    model, twin, b = cnn
    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(p, x, label):
        return functional_call(model, p, (), {"x": x[None], "label": label[None]})

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, b["x"], b["label"])
    for i in range(len(b["label"])):
        twin.zero_grad()
        twin(b["x"][i:i + 1], b["label"][i:i + 1]).backward()
        close({k: v[i] for k, v in per.items()}, grads(twin), 1e-12)
    bad = b["label"].clone()
    bad[3] = 10
    with pytest.raises(ValueError, match="label: id 10 is outside"):
        vmap(grad(one), in_dims=(None, 0, 0))(params, b["x"], bad)


def test_torch_compile_fullgraph_with_integer_class_ids(cnn) -> None:
    """The id check is an assert inside the graph while torch.compile traces: no graph
    break, the twin's gradients, and a RuntimeError naming the input for a bad id."""
    model, twin, b = cnn
    explained = torch._dynamo.explain(model)(**b)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    twin.zero_grad()
    twin(**b).backward()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    compiled(**b).backward()
    close(grads(model), grads(twin), 1e-10)
    bad = b["label"].clone()
    bad[0] = -3
    with pytest.raises(RuntimeError, match="label: an id is outside"):
        compiled(x=b["x"], label=bad)


def test_torch_export(mods) -> None:
    model, _ = pair(mods, "mlp_classifier")
    b = batch("mlp_classifier")
    program = torch.export.export(model, (), {"x": b["x"]})
    assert torch.equal(program.module()(x=b["x"]), model(x=b["x"]))
    program = torch.export.export(model, (), b)
    assert float(program.module()(**b)) == pytest.approx(float(model(**b)), rel=1e-14)


# ------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, path: str, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        mod = load_module(Path(path))
        model = torch.nn.parallel.DistributedDataParallel(mod.Model(seed=3, dtype=F64))
        b = batch("mlp_classifier", n=8, seed=9)
        shard = {k: v[rank * 4:(rank + 1) * 4] for k, v in b.items()}
        model(**shard).backward()
        torch.save({k: p.grad for k, p in model.module.named_parameters()},
                   f"{out}/rank{rank}.pt")
        # Both ranks done before either tears gloo down: a rank that destroys the group
        # while its peer still talks to it can abort ("terminate called without an
        # active exception"), as one CI run saw.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_gives_full_batch_gradient(mods, tmp_path) -> None:
    import torch.multiprocessing as mp

    path = str(mods["mlp_classifier"]["torch_path"])
    mp.start_processes(_ddp_worker, args=(path, f"file://{tmp_path}/rendezvous",
                                          str(tmp_path)), nprocs=2, start_method="spawn")
    _, twin = pair(mods, "mlp_classifier", seed=3)
    twin(**batch("mlp_classifier", n=8, seed=9)).backward()
    full = grads(twin)  # the full batch, through autograd of the nn twin
    for rank in range(2):
        close(torch.load(tmp_path / f"rank{rank}.pt"), full, 1e-12)


# ------------------------------------------------------------------ mixed precision
# bfloat16 keeps 8 significant bits: two correct implementations that round at different
# places differ by a few units of 2**-8 of the largest gradient entry.
AUTOCAST_TOL = 3e-2  # worst seen over 10 seeds: 1.0e-2


@pytest.mark.parametrize("inside", [True, False], ids=["backward-inside", "backward-outside"])
def test_autocast_bfloat16_cpu_matches_twin(mods, inside) -> None:
    model, twin = pair(mods, "mlp_classifier", dtype=torch.float32)
    b = batch("mlp_classifier", n=32, dtype=torch.float32)
    for m in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**b) if m is model else m(b["x"], b["label"])
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
    for p in model.parameters():
        assert p.grad.dtype == torch.float32
    close(grads(model), grads(twin), AUTOCAST_TOL)
    # Without autocast the same model is exact: the tolerance is bfloat16's alone.
    model.zero_grad()
    twin.zero_grad()
    model(**b).backward()
    twin(**b).backward()
    close(grads(model), grads(twin), 1e-5)


def test_autocast_functional_grads_in_parameter_dtype_and_grad_scaler(mods) -> None:
    mod = mods["mlp_classifier"]["torch"]
    params = mod.init_params(0, dtype=torch.float32)
    b = batch("mlp_classifier", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, g = mod.loss_and_grad(params, **b)
    assert all(v.dtype == torch.float32 for v in g.values())

    model = mod.Model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = model.h1.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**b)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.isfinite(model.h1.weight).all() and not torch.equal(before, model.h1.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_autocast_float16_cuda_with_grad_scaler_matches_twin(mods) -> None:
    model, twin = pair(mods, "mlp_classifier", device="cuda", dtype=torch.float32)
    b = batch("mlp_classifier", n=32, device="cuda", dtype=torch.float32)
    for m in (model, twin):
        scaler = torch.amp.GradScaler("cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = m(**b) if m is model else m(b["x"], b["label"])
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(m.parameters(), lr=0.1))
    close(grads(model), grads(twin), 1e-2)


# ------------------------------------------------------------------ numpy: wrt, optimisers
def test_numpy_wrt_inputs_and_frozen_parameters(mods) -> None:
    mod = mods["adapter"]["numpy"]
    _, twin = pair(mods, "adapter")
    params = {k: v.detach().numpy().copy() for k, v in twin.state_dict().items()}
    b = batch("adapter")
    xt = b["x"].clone().requires_grad_()
    for p in twin.parameters():
        p.requires_grad_(True)
    twin(xt, b["t"]).backward()
    nb = {k: v.numpy() for k, v in b.items()}
    _, default = mod.loss_and_grad(params, **nb)
    assert set(default) == {"head.weight", "head.bias"} == set(mod.TRAINABLE)
    _, g = mod.loss_and_grad(params, **nb, wrt=("x", "base.weight", "head.bias"))
    assert list(g) == ["x", "base.weight", "head.bias"]
    want = {"x": xt.grad, "base.weight": twin.base.weight.grad, "head.bias": twin.head.bias.grad}
    close({k: torch.from_numpy(v) for k, v in g.items()}, want, 1e-12)
    _, only_t = mod.loss_and_grad(params, **nb, wrt="t")
    assert list(only_t) == ["t"]
    with pytest.raises(ValueError, match="cannot differentiate with respect to"):
        mod.loss_and_grad(params, **nb, wrt=("nope",))


def test_numpy_sgd_and_adam_match_torch_optim_over_100_steps(mods) -> None:
    mod = mods["mlp_classifier"]["numpy"]
    init = mod.init_params(2)
    runs = [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
         lambda p, g, s: mod.sgd_step(p, g, s, lr=0.1, momentum=0.9, weight_decay=1e-3)),
        (lambda p: torch.optim.AdamW(p, lr=1e-2),
         lambda p, g, s: mod.adam_step(p, g, s, lr=1e-2)),
        (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
         lambda p, g, s: mod.adam_step(p, g, s, lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                       weight_decay=0.0)),
    ]
    for make_torch, numpy_step in runs:
        params = {k: v.copy() for k, v in init.items()}
        tparams = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
        optimizer = make_torch(list(tparams.values()))
        state: dict = {}
        for step in range(100):
            b = {k: v.numpy() for k, v in batch("mlp_classifier", n=8, seed=step).items()}
            _, g = mod.loss_and_grad(params, **b)
            state = numpy_step(params, g, state)
            _, tg = mod.loss_and_grad({k: p.detach().numpy() for k, p in tparams.items()}, **b)
            for k, p in tparams.items():
                p.grad = torch.from_numpy(tg[k])
            optimizer.step()
        for k in init:
            err = np.abs(params[k] - tparams[k].detach().numpy()).max()
            assert err <= 1e-12 * max(1.0, np.abs(params[k]).max()), (k, err)



# ------------------------------------------------------------------ numpy's tanh on the CPU
class _CountingNumpy:
    """numpy, counting the tanh calls that the torch module makes through it."""

    def __init__(self) -> None:
        self.calls = 0
        self.from_dlpack = np.from_dlpack

    def tanh(self, *args, **kwargs):
        self.calls += 1
        return np.tanh(*args, **kwargs)


@pytest.fixture
def numpy_tanh(mods, monkeypatch):
    """mlp_classifier's torch module with numpy's tanh for every size (the module's own
    threshold keeps small tensors, as in the other tests here, on torch's kernel)."""
    mod = mods["mlp_classifier"]["torch"]
    spy = _CountingNumpy()
    monkeypatch.setattr(mod, "_NUMPY", spy)
    monkeypatch.setattr(mod, "_NUMPY_TANH_MIN", 1)
    return mod, spy


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tanh_uses_numpy_where_nothing_records_and_matches_torch(numpy_tanh, dtype) -> None:
    mod, spy = numpy_tanh
    x = 4 * torch.randn(64, 48, dtype=dtype, generator=torch.Generator().manual_seed(0))
    ulp = torch.finfo(dtype).eps
    for value in (x, x.T, x[:, ::3], x[:1, :1]):  # contiguous, transposed, strided, one
        before = spy.calls
        y = mod._tanh(value)
        assert spy.calls == before + 1
        assert y.shape == value.shape and y.dtype == dtype
        assert torch.allclose(y, torch.tanh(value), rtol=4 * ulp, atol=0)
        assert y.untyped_storage().resizable()  # the backward may free it early
    with torch.no_grad():  # a tensor that requires grad, where nothing records
        w = x.clone().requires_grad_()
        assert torch.equal(mod._tanh(w), mod._tanh(x))
    assert spy.calls == 6


def test_tanh_keeps_torch_kernel_where_torch_must_see_it(numpy_tanh) -> None:
    mod, spy = numpy_tanh
    x = torch.randn(8, 8, dtype=F64, requires_grad=True)
    y = mod._tanh(x)  # autograd records it
    assert y.grad_fn is not None
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, 1 - torch.tanh(x.detach()) ** 2, rtol=1e-15)
    assert mod._tanh(x.detach().to(torch.bfloat16)).dtype == torch.bfloat16  # numpy has none
    torch.func.vmap(mod._tanh)(x.detach())
    torch.func.grad(lambda v: mod._tanh(v).sum())(x.detach())
    assert spy.calls == 0
    mod._NUMPY = None  # numpy not loaded: torch's kernel (monkeypatch restores it)
    assert torch.equal(mod._tanh(x.detach()), torch.tanh(x.detach()))


def test_tanh_keeps_torch_kernel_for_every_other_observer(numpy_tanh, monkeypatch) -> None:
    """Forward-mode AD, torch.jit.trace, make_fx and dispatch modes see torch.tanh (numpy's
    call would hand them an empty tensor); lazily negated or zero tensors are computed
    by torch (DLPack would export their memory as it lies); and with many threads
    torch's kernel, which uses them, is faster again."""
    import torch.autograd.forward_ad as fwad
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    mod, spy = numpy_tanh
    x, v = torch.randn(32, 16, dtype=F64), torch.randn(32, 16, dtype=F64)
    with fwad.dual_level():
        y = mod._tanh(fwad.make_dual(x, v))
        tangent = fwad.unpack_dual(y).tangent
    assert tangent is not None and torch.allclose(tangent, v * (1 - torch.tanh(x) ** 2))
    traced = torch.jit.trace(mod._tanh, (x,), check_trace=False)  # (the check runs eagerly)
    other = torch.randn(32, 16, dtype=F64)
    assert torch.allclose(traced(other), torch.tanh(other))
    graph = make_fx(mod._tanh)(x).graph
    assert any("tanh" in str(node.target) for node in graph.nodes)
    with FlopCounterMode(display=False):
        assert torch.allclose(mod._tanh(x), torch.tanh(x))
    negated = torch.randn(32, 16, dtype=torch.complex128).conj().imag
    assert negated.is_neg() and torch.allclose(mod._tanh(negated), torch.tanh(negated))
    zeros = torch._efficientzerotensor((32, 16), dtype=F64)
    assert torch.equal(mod._tanh(zeros), torch.zeros(32, 16, dtype=F64))
    assert spy.calls == 0
    monkeypatch.setattr(mod, "_NUMPY_TANH_MAX_THREADS", 0)  # as if torch had many threads
    assert torch.equal(mod._tanh(x), torch.tanh(x)) and spy.calls == 0
    monkeypatch.undo()
    # torch spreads a tanh over one thread per 32768 values: with 8 threads, 65536 values
    # use two of them (numpy's kernel is faster), 327680 values five (torch's is)
    threads = torch.get_num_threads()
    monkeypatch.setattr(mod, "_NUMPY", spy)
    monkeypatch.setattr(mod, "_NUMPY_TANH_MIN", 1)
    try:
        torch.set_num_threads(8)
        mod._tanh(torch.randn(65536, dtype=F64))
        assert spy.calls == 1
        mod._tanh(torch.randn(327680, dtype=F64))
        assert spy.calls == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    assert torch.allclose(mod._tanh(x), torch.tanh(x), rtol=1e-15, atol=0)


def test_export_with_a_dynamic_batch_through_tanh(mods) -> None:
    """The size test comes after the tracing test: no guard on the symbolic batch."""
    mod = mods["mlp_classifier"]["torch"]
    model = mod.Model(dtype=torch.float32)

    class Predict(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x=x)

    batch = torch.export.Dim("batch", min=2, max=4096)
    program = torch.export.export(Predict(), (torch.randn(256, 64),),
                                  dynamic_shapes={"x": {0: batch}})
    for n in (3, 255, 300):  # tanh over 32 n values: either side of the numpy threshold
        x = torch.randn(n, 64)
        assert torch.allclose(program.module()(x), model(x=x), rtol=1e-5, atol=1e-6)


def test_model_with_numpy_tanh_matches_twin_first_and_second_order(numpy_tanh, mods) -> None:
    """The training step, a second backward after the first freed the intermediates that
    numpy wrote, and second derivatives (recorded with torch's kernel) against the twin."""
    mod, spy = numpy_tanh
    model, twin = pair(mods, "mlp_classifier")
    b = batch("mlp_classifier", n=512)
    loss = model(**b)
    assert spy.calls == 1
    loss.backward(retain_graph=True)
    assert any(t.untyped_storage().nbytes() == 0 for t in loss.grad_fn.saved_tensors)
    once = {k: g.clone() for k, g in grads(model).items()}
    twin(**b).backward()
    close(once, grads(twin), 1e-12)
    loss.backward()
    close(grads(model), {k: 2 * g for k, g in once.items()}, 1e-15)
    _, lag = mod.loss_and_grad(model.params(), **b)
    close(lag, grads(twin), 1e-12)
    small = batch("mlp_classifier", n=3)
    args = [v.requires_grad_() for v in small.values()] + list(model.parameters())
    assert torch.autograd.gradgradcheck(apply_loss(mod), args, fast_mode=True)


def test_torch_compile_sees_tanh_without_graph_break(numpy_tanh, mods) -> None:
    mod, spy = numpy_tanh
    model, _ = pair(mods, "mlp_classifier", dtype=torch.float32)
    b = batch("mlp_classifier", dtype=torch.float32)
    explained = torch._dynamo.explain(model)(**b)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert spy.calls == 0


# ------------------------------------------------------------------ kept inputs
@pytest.mark.parametrize("layer", ["{name: a, type: activation, activation: identity}",
                                   "{name: a, type: dropout, p: 0.0}"])
def test_an_input_kept_for_the_backward_as_it_is(tmp_path, layer) -> None:
    """An identity layer (or dropout with p = 0) hands the input itself to the dense
    layer, whose weight gradient then keeps it: autograd refuses an argument returned
    as an output as it is, so it goes out as a view. The gradients, the input's own and
    a second backward against a hand-written twin."""
    _, built = build(tmp_path, f"""
name: kept_input
inputs: {{x: [N, 3]}}
targets: {{t: [N, 2]}}
layers:
  - {layer}
  - {{name: fc, type: dense, units: 2}}
loss: {{type: mse, target: t}}
""")
    model = built["torch"].Model(seed=2, dtype=F64)
    twin = torch.nn.Linear(3, 2).to(F64)
    twin.load_state_dict({k.split(".", 1)[1]: v for k, v in model.state_dict().items()})
    x, t = torch.randn(5, 3, dtype=F64, requires_grad=True), torch.randn(5, 2, dtype=F64)
    loss = model(x=x, t=t)
    loss.backward(retain_graph=True)
    xt = x.detach().clone().requires_grad_()
    F.mse_loss(twin(xt), t).backward()
    close(grads(model), {f"fc.{k}": p.grad for k, p in twin.named_parameters()}, 1e-13)
    close({"x": x.grad}, {"x": xt.grad}, 1e-13)
    loss.backward()
    close(grads(model), {f"fc.{k}": 2 * p.grad for k, p in twin.named_parameters()}, 1e-13)
    _, lag = built["torch"].loss_and_grad(model.params(), x=x.detach(), t=t)
    close(lag, {f"fc.{k}": p.grad for k, p in twin.named_parameters()}, 1e-13)


# ------------------------------------------------------- branches that are not finite
BRANCHES = {
    # relu then a fractional power: the power's derivative at a negative number is NaN
    "relu-power": ("""
name: relu_power
inputs: {x: [N, 2]}
targets: {t: [N, 2]}
layers:
  - {name: fc, type: dense, units: 2, activation: relu}
  - {name: s, type: elementwise, formula: "fc**1.5"}
loss: {type: mse, target: t}
""", lambda p, b: torch.nn.functional.mse_loss(
        torch.relu(torch.nn.functional.linear(b["x"], p["fc.weight"], p["fc.bias"])) ** 1.5,
        b["t"])),
    # elu at a large input: expm1 of the untaken branch is infinite
    "elu-large": ("""
name: elu_large
inputs: {x: [N, 2]}
targets: {t: [N, 2]}
layers:
  - {name: a, type: activation, activation: elu}
  - {name: fc, type: dense, units: 2}
loss: {type: mse, target: t}
""", lambda p, b: torch.nn.functional.mse_loss(torch.nn.functional.linear(
        torch.nn.functional.elu(b["x"]), p["fc.weight"], p["fc.bias"]), b["t"])),
}


@pytest.mark.parametrize("name", list(BRANCHES))
def test_untaken_branches_give_no_nan_to_autograd(tmp_path, name) -> None:
    """A where() whose untaken branch is infinite or NaN (a power of a negative number,
    expm1(800)) gave autograd through the functional loss, torch.func.grad and the
    Model's second derivative NaN where eager torch is finite; each branch now reads
    its arrays only where it is taken (_taken). Gradients for the input too."""
    text, eager = BRANCHES[name]
    _, modules = build(tmp_path, text)
    tm = modules["torch"]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, generator=gen, dtype=F64) * 3
    x[0, 0] = 800.0  # elu's expm1 overflows here; relu's power is negative elsewhere
    t = torch.randn(4, 2, generator=gen, dtype=F64)
    params = tm.init_params(1, dtype=F64)

    def leaves() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return x.clone().requires_grad_(), {k: v.clone().requires_grad_()
                                            for k, v in params.items()}

    def first_and_second(loss_of) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        xs, ps = leaves()
        wrt = [xs, *ps.values()]
        grads = torch.autograd.grad(loss_of(xs, ps), wrt, create_graph=True)
        # a Hessian-vector product, v = ones, every argument
        hv = torch.autograd.grad(sum(g.sum() for g in grads), wrt)
        return [g.detach() for g in grads], list(hv)

    want = first_and_second(lambda xs, ps: eager(ps, {"x": xs, "t": t}))
    for label, loss_of in (("loss", lambda xs, ps: tm.loss(ps, x=xs, t=t)),
                           ("Model", lambda xs, ps: tm.LossFunction.apply(
                               xs, t, *(ps[k] for k in tm.PARAM_SHAPES))[0])):
        got = first_and_second(loss_of)
        for mine, ref in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
            assert torch.isfinite(mine).all(), (label, mine)
            assert torch.allclose(mine, ref, rtol=1e-9, atol=1e-11), (label, mine, ref)
    xs, ps = leaves()
    funcs = torch.func.grad(lambda p: tm.loss(p, x=xs.detach(), t=t))(
        {k: v.detach() for k, v in ps.items()})
    for k, ref in zip(ps, want[0][1:], strict=True):
        assert torch.allclose(funcs[k], ref, rtol=1e-10, atol=1e-12), k


@pytest.mark.parametrize("name", ["gpt_block", "tiny_gpt"])
def test_attention_models_under_cpu_autocast(tmp_path, name) -> None:
    """Under autocast an attention model's products come out in bfloat16 beside float32
    parameters: torch.tensordot, einsum and the layer-norm kernels, which are no autocast
    ops, refused the mix (RuntimeError in the forward, then in the backward). Now the
    Model's step and loss_and_grad run, give float32 gradients and agree with float32's
    to bfloat16's precision."""
    tm = example_modules(tmp_path, name)["torch"]
    gen = torch.Generator().manual_seed(0)
    if name == "gpt_block":
        batch = {"x": torch.randn(2, 8, 32, generator=gen), "t": torch.randn(2, 8, 32,
                                                                            generator=gen)}
    else:
        batch = {"idx": torch.randint(0, 65, (2, 8), generator=gen),
                 "y": torch.randint(0, 65, (2, 8), generator=gen)}
    model = tm.Model(seed=1, dtype=torch.float32)
    model(**batch).backward()
    exact = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch)
        _, lag = tm.loss_and_grad(dict(model.named_parameters()), **batch)
    loss.backward()
    for k, p in model.named_parameters():
        for grad in (p.grad, lag[k]):
            assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), k
            scale = float(exact[k].abs().max()) or 1.0
            assert float((grad - exact[k]).abs().max()) <= 0.1 * scale, k
