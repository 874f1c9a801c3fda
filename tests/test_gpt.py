"""The GPT examples against a nanoGPT-style torch model written here by hand.

The twin uses what nanoGPT uses — ``nn.Linear``, ``F.layer_norm`` through ``nn.LayerNorm``,
attention written out with a causal mask, ``F.gelu(approximate="tanh")``,
``F.cross_entropy`` — and nothing of symbackprop. Its state dict has the generated
modules' parameter names, so its weights load into them unchanged; the loss and every
trainable gradient must agree in float64 to a relative 1e-9 in numpy ``loss_and_grad``,
torch ``loss_and_grad`` and the torch ``Model``.
"""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest

from conftest import EXAMPLES, ROOT, example_modules

torch = pytest.importorskip("torch")
F = torch.nn.functional


class LoraLinear(torch.nn.Linear):
    """peft's LoRA on a linear layer: W x + b + (x Aᵀ Bᵀ) alpha / r, W and b frozen."""

    def __init__(self, fan_in: int, fan_out: int, rank: int, alpha: float) -> None:
        super().__init__(fan_in, fan_out)
        self.lora_A = torch.nn.Parameter(torch.zeros(rank, fan_in))
        self.lora_B = torch.nn.Parameter(torch.zeros(fan_out, rank))
        self.scale = alpha / rank
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def _linear(fan_in: int, fan_out: int, lora: tuple[int, float] | None) -> torch.nn.Module:
    return torch.nn.Linear(fan_in, fan_out) if lora is None else LoraLinear(fan_in, fan_out,
                                                                            *lora)


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, width: int, heads: int, lora: tuple[int, float] | None = None) -> None:
        super().__init__()
        self.c_attn = _linear(width, 3 * width, lora)
        self.c_proj = _linear(width, width, lora)
        self.heads = heads

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q = q.view(n, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(n, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(n, t, self.heads, c // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        att = att.masked_fill(~mask, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(n, t, c))


class Mlp(torch.nn.Module):
    def __init__(self, width: int, lora: tuple[int, float] | None = None) -> None:
        super().__init__()
        self.c_fc = _linear(width, 4 * width, lora)
        self.c_proj = _linear(4 * width, width, lora)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, lora: tuple[int, float] | None = None) -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, lora)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = Mlp(width, lora)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(torch.nn.Module):
    """nanoGPT's GPT without the ``transformer.`` prefix: wte, wpe, h, ln_f, lm_head tied."""

    def __init__(self, vocab: int = 65, length: int = 32, width: int = 32, heads: int = 4,
                 layers: int = 2, lora: tuple[int, float] | None = None) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, width)
        self.wpe = torch.nn.Embedding(length, width)
        self.h = torch.nn.ModuleList(Block(width, heads, lora) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as nanoGPT
        if lora is not None:  # LoRA fine-tuning: only the adapters train
            for name, p in self.named_parameters():
                p.requires_grad_("lora_" in name)

    def forward(self, idx, y):
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn at random (layer norms' ones and zeros would hide a swap)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _agree(mods, twin, batch: dict, ref_loss, trainable: set[str],
           state: dict | None = None) -> None:
    """The loss and every trainable gradient of the three generated paths vs the twin's."""
    want = {k: p.grad for k, p in twin.named_parameters() if k in trainable}
    assert want and all(float(g.abs().max()) > 0 for g in want.values())
    state = {k: v.detach() for k, v in (state or twin.state_dict()).items()}
    np_batch = {k: v.numpy() for k, v in batch.items()}

    loss, grads = mods["numpy"].loss_and_grad({k: v.numpy() for k, v in state.items()},
                                              **np_batch)
    assert _rel(loss, ref_loss) <= 1e-9
    assert set(grads) == set(want)
    for k, g in want.items():
        assert _rel(grads[k], g.numpy()) <= 1e-9, k

    loss, grads = mods["torch"].loss_and_grad(state, **batch)
    assert _rel(loss.item(), ref_loss) <= 1e-9
    assert set(grads) == set(want)
    for k, g in want.items():
        assert _rel(grads[k].numpy(), g.numpy()) <= 1e-9, k

    model = mods["torch"].Model(dtype=torch.float64)
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state)
    out = model(**batch)
    out.backward()
    assert _rel(out.item(), ref_loss) <= 1e-9
    for k, p in model.named_parameters():
        if k in trainable:
            assert _rel(p.grad.numpy(), want[k].numpy()) <= 1e-9, k
        else:
            assert p.grad is None, k


def test_gpt_block_matches_a_nanogpt_block(tmp_path) -> None:
    mods = example_modules(tmp_path, "gpt_block")
    twin = Block(32, 4).double()
    _randomise(twin, 0)
    assert list(twin.state_dict()) == list(mods["numpy"].PARAM_SHAPES)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(3, 7, 32)))
    t = torch.from_numpy(rng.normal(size=(3, 7, 32)))
    ref = F.mse_loss(twin(x), t)
    ref.backward()
    _agree(mods, twin, {"x": x, "t": t}, ref.item(), set(mods["numpy"].TRAINABLE))


def test_gpt_block_initialises_as_torch_and_bounds_t(tmp_path) -> None:
    """Layer norms start at ones and zeros, linear layers within ±1/√fan_in; T over its
    declared max is refused with a message naming the input."""
    mods = example_modules(tmp_path, "gpt_block")
    params = mods["numpy"].init_params(0)
    assert np.all(params["ln_1.weight"] == 1) and np.all(params["ln_2.bias"] == 0)
    assert np.abs(params["attn.c_attn.weight"]).max() <= 1 / math.sqrt(32)
    assert np.abs(params["mlp.c_proj.weight"]).max() <= 1 / math.sqrt(128)
    assert params["attn.c_attn.weight"].shape == (96, 32)
    x = np.zeros((1, 65, 32))
    with pytest.raises(ValueError, match="x: T = 65 exceeds 64"):
        mods["numpy"].loss_and_grad(params, x=x, t=x)


def _gpt_batch(n: int = 3, t: int = 9, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 65, (n, t), generator=gen)
    y = torch.randint(0, 65, (n, t), generator=gen)
    return {"idx": idx, "y": y}


def _state_without_tied_copy(twin: torch.nn.Module) -> dict:
    """The twin's state dict as the generated modules name it: the tied lm_head.weight
    is wte.weight (one parameter, listed once)."""
    state = dict(twin.state_dict())
    del state["lm_head.weight"]
    return state


def test_tiny_gpt_matches_nanogpt(tmp_path) -> None:
    mods = example_modules(tmp_path, "tiny_gpt")
    twin = Gpt().double()
    _randomise(twin, 3)
    state = _state_without_tied_copy(twin)
    assert list(state) == list(mods["numpy"].PARAM_SHAPES)
    batch = _gpt_batch()
    ref = twin(**batch)
    ref.backward()
    # the tied weight's gradient is the sum over both uses, as autograd gives
    assert twin.wte.weight.grad is twin.lm_head.weight.grad
    _agree(mods, twin, batch, ref.item(), set(mods["numpy"].TRAINABLE), state=state)


def test_lora_gpt_matches_nanogpt_with_peft_adapters(tmp_path) -> None:
    mods = example_modules(tmp_path, "lora_gpt")
    twin = Gpt(lora=(4, 8.0)).double()
    _randomise(twin, 4)  # B at zero would send A no gradient
    state = _state_without_tied_copy(twin)
    assert list(state) == list(mods["numpy"].PARAM_SHAPES)
    trainable = {k for k, p in twin.named_parameters() if p.requires_grad}
    assert trainable == set(mods["numpy"].TRAINABLE) and len(trainable) == 16
    batch = _gpt_batch(seed=5)
    ref = twin(**batch)
    ref.backward()
    _agree(mods, twin, batch, ref.item(), trainable, state=state)


def test_lora_gpt_computes_no_product_of_the_adapters(tmp_path) -> None:
    """The step never forms B A (out x in) nor computes a frozen weight's gradient."""
    mods = example_modules(tmp_path, "lora_gpt")
    for backend in ("numpy", "torch"):
        tree = ast.parse((tmp_path / f"lora_gpt_{backend}.py").read_text())
        step = next(f for f in tree.body if isinstance(f, ast.FunctionDef)
                    and f.name == "loss_and_grad")
        assigned = set()
        for node in ast.walk(step):
            if isinstance(node, ast.Assign) and not isinstance(node.value, ast.Dict):
                names = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                assert not (any(n.endswith("lora_A") for n in names)
                            and any(n.endswith("lora_B") for n in names)), ast.unparse(node)
                assigned |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        assert "d_h_0_attn_c_attn_lora_B" in assigned and "d_h_1_mlp_c_fc_lora_A" in assigned
        frozen = {n for n in assigned if n.startswith("d_") and n.endswith(("_weight", "_bias"))}
        if backend == "torch":
            assert not frozen
        else:  # numpy's wrt= may ask for them; the default step skips that code
            defaults = dict(zip(mods["numpy"].DIFFERENTIABLE, mods["numpy"]._DEFAULT_NEEDS,
                                strict=True))
            assert frozen and not any(defaults[n] for n in defaults if "lora" not in n)
    merged = mods["numpy"].merge_lora({k: np.ones(v) for k, v in
                                       mods["numpy"].PARAM_SHAPES.items()})
    assert not any("lora" in k for k in merged)
    assert set(merged) == set(example_modules(tmp_path / "..", "tiny_gpt")["numpy"].PARAM_SHAPES)


def test_generated_gpt_examples_are_up_to_date() -> None:
    from symbackprop.cli import main

    for name in ("gpt_block", "tiny_gpt", "lora_gpt"):
        assert main(["generate", str(EXAMPLES / f"{name}.yaml"), "--out",
                     str(ROOT / "generated"), "--check"]) == 0


@pytest.mark.parametrize("options, message", [
    ("heads: 3", "32 features of 'x' do not split into 3 heads"),
    ("heads: 4, lora: {rank: 2, alpha: 4, targets: [c_fc]}", "lora.targets lists"),
    ("heads: 4, lora: {rank: 2, alpha: 4, targets: [c_attn, c_attn]}", "lora.targets lists"),
    ("heads: 4, lora: {rank: 0, alpha: 4}", "lora.rank: expected a positive integer"),
    ("heads: 4, lora: {rank: 2, alpha: 4, targets: [c_proj]}, "
     "trainable: {c_attn.lora_A: true}", "c_attn has no lora adapter"),
    ("heads: 4, bias: false, trainable: {c_proj.bias: true}", "bias: false"),
    ("heads: 4, causal: yes please", "expected true or false"),
])
def test_attention_options_are_checked(tmp_path, options: str, message: str) -> None:
    from symbackprop.cli import main

    spec = tmp_path / "a.yaml"
    spec.write_text("name: a\ninputs: {x: [N, T, 32]}\ntargets: {t: [N, T, 32]}\nlayers:\n"
                    f"  - {{name: attn, type: attention, {options}}}\n"
                    "loss: {type: mse, target: t}\n")
    out = tmp_path / "out"
    assert main(["generate", str(spec), "--out", str(out)]) == 2 and not out.exists()
    from symbackprop.api import compile_spec
    from symbackprop.errors import SpecError

    with pytest.raises(SpecError, match=message):
        compile_spec(spec)
