"""Integer tensors, embeddings and cross-entropy on class ids.

Two networks, each against an independent hand-written torch model (``nn.Embedding``,
``F.cross_entropy``) in float64, for the loss and every trainable gradient, in the numpy
module, torch ``loss_and_grad`` and the torch ``Model``: an embedding -> dense ->
softmax cross-entropy on int64 targets with ``ignore_index``, and a token + position
embedding language model. Then repeated ids, the run-time checks (ids out of range, float
ids, a sequence longer than its bound), the spec errors, and that a float network pays
nothing for any of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from symbackprop.api import compile_text
from symbackprop.check import check_model, random_batch
from symbackprop.cli import main as cli_main
from symbackprop.errors import SpecError

CLASSIFIER = """
name: emb_cls
inputs:
  idx: {shape: [N, T], dtype: int64}
targets:
  y: {shape: [N, T], dtype: int64}
layers:
  - {name: wte, type: embedding, num: 9, dim: 4, input: idx}
  - {name: hid, type: dense, units: 5, activation: tanh}
  - {name: out, type: dense, units: 6}
loss: {type: softmax_cross_entropy, target: y, ignore_index: 2}
"""

LANGUAGE_MODEL = """
name: tok_pos
inputs:
  idx: {shape: [N, T], dtype: int64}
targets:
  y: {shape: [N, T], dtype: int64}
dims: {T: {max: 6}}
layers:
  - {name: wte, type: embedding, num: 11, dim: 4, input: idx}
  - {name: wpe, type: position_embedding, max_len: 8, dim: 4, input: idx}
  - {name: x, type: add, input: [wte, wpe]}
  - {name: mlp, type: dense, units: 7, activation: tanh}
  - {name: head, type: dense, units: 11, bias: false}
loss: {type: softmax_cross_entropy, target: y, ignore_index: -1}
"""


class Classifier(torch.nn.Module):
    """CLASSIFIER written by hand with torch.nn."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(9, 4)
        self.hid = torch.nn.Linear(4, 5)
        self.out = torch.nn.Linear(5, 6)

    def forward(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.out(torch.tanh(self.hid(self.wte(idx))))
        return F.cross_entropy(logits.reshape(-1, 6), y.reshape(-1), ignore_index=2)


class LanguageModel(torch.nn.Module):
    """LANGUAGE_MODEL written by hand with torch.nn, nanoGPT-style."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(11, 4)
        self.wpe = torch.nn.Embedding(8, 4)
        self.mlp = torch.nn.Linear(4, 7)
        self.head = torch.nn.Linear(7, 11, bias=False)

    def forward(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        logits = self.head(torch.tanh(self.mlp(x)))
        return F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), ignore_index=-1)


def _batch(rng: np.random.Generator, n: int, t: int, vocab: int, classes: int,
           ignore: int) -> dict[str, np.ndarray]:
    idx = rng.integers(0, vocab, size=(n, t))
    idx[0, :] = 1  # one id repeated along a whole row: its gradient rows must sum
    y = rng.integers(0, classes, size=(n, t))
    y[1, ::2] = ignore
    return {"idx": idx, "y": y}


def _oracle(net: torch.nn.Module, params: dict[str, np.ndarray],
            batch: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    net = net.to(torch.float64)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    assert all(p.dtype == torch.float64 for p in net.parameters())
    net.zero_grad()
    loss = net(torch.from_numpy(batch["idx"]), torch.from_numpy(batch["y"]))
    loss.backward()
    return float(loss.detach()), {k: p.grad.numpy() for k, p in net.named_parameters()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-300))


CASES = [
    pytest.param(CLASSIFIER, Classifier, 9, 6, 2, id="embedding-dense-ce-ignore_index"),
    pytest.param(LANGUAGE_MODEL, LanguageModel, 11, 11, -1, id="token-position-lm"),
]


@pytest.mark.parametrize(("text", "reference", "vocab", "classes", "ignore"), CASES)
def test_matches_hand_written_torch(tmp_build, text: str, reference: type, vocab: int,
                                    classes: int, ignore: int) -> None:
    model, modules = tmp_build(text)
    np_mod, t_mod = modules["numpy"], modules["torch"]
    params = np_mod.init_params(seed=4)
    batch = _batch(np.random.default_rng(0), 3, 5, vocab, classes, ignore)
    ref_loss, ref = _oracle(reference(), params, batch)
    assert set(ref) == set(np_mod.TRAINABLE) == set(params)

    loss, grads = np_mod.loss_and_grad(params, **batch)
    assert abs(loss - ref_loss) <= 1e-9 * abs(ref_loss)
    assert abs(np_mod.loss(params, **batch) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name in ref:
        assert _rel(grads[name], ref[name]) <= 1e-9, name

    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss, grads = t_mod.loss_and_grad(tparams, **tbatch)
    assert abs(float(loss) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name in ref:
        assert _rel(grads[name].numpy(), ref[name]) <= 1e-9, name

    net = t_mod.Model(dtype=torch.float64)
    net.load_state_dict(tparams)
    loss = net(**tbatch)
    loss.backward()
    assert abs(float(loss.detach()) - ref_loss) <= 1e-9 * abs(ref_loss)
    for name, p in net.named_parameters():
        assert _rel(p.grad.numpy(), ref[name]) <= 1e-9, name
    # the prediction, without targets, agrees across the modules
    pred = net(idx=tbatch["idx"]).detach().numpy()
    assert np.allclose(pred, np_mod.forward(params, idx=batch["idx"]), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("text", "reference", "vocab", "classes", "ignore"), CASES)
def test_check_command_passes(text: str, reference: type, vocab: int, classes: int,
                              ignore: int) -> None:
    """``check`` draws valid ids and labels (some ignored) and every row passes."""
    model = compile_text(text)
    batch = random_batch(model, batch=4)
    assert batch["idx"].dtype == np.int64 and batch["idx"].max() < vocab
    assert (batch["y"] == ignore).any() and (batch["y"] != ignore).any()
    rows = check_model(model)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_repeated_ids_sum_and_unused_rows_are_zero(tmp_build) -> None:
    _, modules = tmp_build(CLASSIFIER)
    np_mod = modules["numpy"]
    params = np_mod.init_params(seed=1)
    idx = np.array([[3, 3, 3, 0], [0, 3, 5, 5]])
    y = np.array([[1, 0, 4, 5], [3, 3, 1, 0]])
    _, grads = np_mod.loss_and_grad(params, idx=idx, y=y)
    _, ref = _oracle(Classifier(), params, {"idx": idx, "y": y})
    assert _rel(grads["wte.weight"], ref["wte.weight"]) <= 1e-12
    unused = [k for k in range(9) if k not in idx]
    assert np.all(grads["wte.weight"][unused] == 0)
    assert np.all(grads["wte.weight"][3] != 0)
    # the row of id 3 is the sum of the four positions that read it
    _, one = np_mod.loss_and_grad(params, idx=idx, y=y, wrt=["wte.weight"])
    assert np.array_equal(one["wte.weight"], grads["wte.weight"])


def test_integer_inputs_are_not_differentiable_and_never_cast(tmp_build) -> None:
    _, modules = tmp_build(LANGUAGE_MODEL)
    np_mod, t_mod = modules["numpy"], modules["torch"]
    assert "idx" not in np_mod.DIFFERENTIABLE and "y" not in np_mod.DIFFERENTIABLE
    with pytest.raises(ValueError, match="wrt"):
        np_mod.loss_and_grad(np_mod.init_params(), idx=[[1, 2]], y=[[1, 2]], wrt="idx")
    params = np_mod.init_params()
    # lists and other integer dtypes are taken as int64 ids; float32 parameters keep
    # float32 losses and gradients (the ids never promote them)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    loss, grads = np_mod.loss_and_grad(p32, idx=np.array([[1, 2, 3]], dtype=np.int32),
                                       y=[[4, -1, 0]])
    assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    t32 = {k: torch.from_numpy(v) for k, v in p32.items()}
    loss, grads = t_mod.loss_and_grad(t32, idx=torch.tensor([[1, 2, 3]], dtype=torch.int32),
                                      y=[[4, -1, 0]])
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32
                                               for g in grads.values())
    net = t_mod.Model(dtype=torch.float32)
    net(idx=[[1, 2, 3]], y=torch.tensor([[4, -1, 0]])).backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


def _callers(modules: dict) -> list[tuple[str, object, bool]]:
    """Every entry point that takes a batch: (name, f(idx, y), whether it reads y)."""
    np_mod, t_mod = modules["numpy"], modules["torch"]
    p = np_mod.init_params()
    tp = {k: torch.from_numpy(v) for k, v in p.items()}
    net = t_mod.Model(dtype=torch.float64)
    as_t = lambda a: torch.as_tensor(a) if isinstance(a, np.ndarray) else a  # noqa: E731
    return [
        ("numpy forward", lambda i, y: np_mod.forward(p, idx=i), False),
        ("numpy loss", lambda i, y: np_mod.loss(p, idx=i, y=y), True),
        ("numpy loss_and_grad", lambda i, y: np_mod.loss_and_grad(p, idx=i, y=y), True),
        ("torch forward", lambda i, y: t_mod.forward(tp, idx=as_t(i)), False),
        ("torch loss", lambda i, y: t_mod.loss(tp, idx=as_t(i), y=as_t(y)), True),
        ("torch loss_and_grad",
         lambda i, y: t_mod.loss_and_grad(tp, idx=as_t(i), y=as_t(y)), True),
        ("Model loss", lambda i, y: net(idx=as_t(i), y=as_t(y)), True),
        ("Model prediction", lambda i, y: net(idx=as_t(i)), False),
    ]


BAD_INPUTS = [
    pytest.param(np.array([[1, 11, 2]]), np.array([[0, 1, 2]]),
                 r"idx: id 11 is outside \[0, 11\) \(the embedding 'wte' has num = 11\)",
                 id="id-past-num"),
    pytest.param(np.array([[1, -1, 2]]), np.array([[0, 1, 2]]), r"idx: id -1 is outside",
                 id="negative-id"),
    pytest.param(np.array([[1.0, 2.0, 3.0]]), np.array([[0, 1, 2]]),
                 r"idx: expected integer ids \(int64\), got (torch\.)?float64", id="float-ids"),
    pytest.param(np.array([[True, False, True]]), np.array([[0, 1, 2]]),
                 r"idx: expected integer ids \(int64\), got (torch\.)?bool", id="bool-ids"),
    pytest.param(np.zeros((2, 7), dtype=np.int64), np.zeros((2, 7), dtype=np.int64),
                 r"idx: T = 7 exceeds 6, its declared max \(dims\)", id="T-over-max"),
]


@pytest.mark.parametrize(("idx", "y", "message"), BAD_INPUTS)
def test_bad_ids_raise_value_error_naming_the_input(tmp_build, idx: np.ndarray, y: np.ndarray,
                                                    message: str) -> None:
    _, modules = tmp_build(LANGUAGE_MODEL)
    for name, call, _ in _callers(modules):
        with pytest.raises(ValueError, match=message):
            call(idx, y)
            pytest.fail(f"{name} accepted the bad input")


@pytest.mark.parametrize(("y", "message"), [
    (np.array([[0, 11, 2]]), r"y: id 11 is outside \[0, 11\) \(softmax_cross_entropy over "
                             r"11 classes, ignore_index -1\)"),
    (np.array([[0, -2, 2]]), r"y: id -2 is outside"),
    (np.array([[0.0, 1.0, 2.0]]), r"y: expected integer ids"),
])
def test_bad_class_targets_raise(tmp_build, y: np.ndarray, message: str) -> None:
    _, modules = tmp_build(LANGUAGE_MODEL)
    idx = np.array([[1, 2, 3]])
    for name, call, reads_y in _callers(modules):
        if not reads_y:
            call(idx, y)  # the prediction takes no target
            continue
        with pytest.raises(ValueError, match=message):
            call(idx, y)
            pytest.fail(f"{name} accepted the bad target")


def test_position_embedding_length_checked_at_run_time_without_dims(tmp_build) -> None:
    """T unbounded in the spec: a sequence longer than max_len is a ValueError."""
    text = LANGUAGE_MODEL.replace("dims: {T: {max: 6}}\n", "")
    _, modules = tmp_build(text)
    idx = np.zeros((1, 9), dtype=np.int64)
    for _, call, _ in _callers(modules):
        with pytest.raises(ValueError, match=r"idx: T = 9 exceeds 8, max_len = 8 of the "
                                             r"position embedding 'wpe'"):
            call(idx, idx)
    # T = max_len is fine
    _, grads = modules["numpy"].loss_and_grad(modules["numpy"].init_params(),
                                              idx=np.zeros((1, 8), np.int64),
                                              y=np.zeros((1, 8), np.int64))
    assert grads["wpe.weight"].shape == (8, 4)


def test_position_rows_past_t_get_no_gradient(tmp_build) -> None:
    _, modules = tmp_build(LANGUAGE_MODEL)
    np_mod = modules["numpy"]
    batch = _batch(np.random.default_rng(3), 2, 4, 11, 11, -1)
    _, grads = np_mod.loss_and_grad(np_mod.init_params(), **batch)
    assert np.all(grads["wpe.weight"][4:] == 0) and np.all(grads["wpe.weight"][:4] != 0)


def test_every_position_ignored_gives_nan_as_torch(tmp_build) -> None:
    _, modules = tmp_build(CLASSIFIER)
    np_mod, t_mod = modules["numpy"], modules["torch"]
    params = np_mod.init_params()
    idx, y = np.array([[1, 2]]), np.array([[2, 2]])
    with np.errstate(invalid="ignore", divide="ignore"):
        assert np.isnan(np_mod.loss(params, idx=idx, y=y))
    ref = F.cross_entropy(torch.zeros(2, 6), torch.tensor([2, 2]), ignore_index=2)
    assert torch.isnan(ref)
    tp = {k: torch.from_numpy(v) for k, v in params.items()}
    assert torch.isnan(t_mod.loss(tp, idx=torch.tensor(idx), y=torch.tensor(y)))


def test_embedding_init_is_normal_002_and_settable() -> None:
    text = """
    name: init_emb
    inputs: {idx: {shape: [N], dtype: int64}}
    targets: {t: [N, 64]}
    layers:
      - {name: a, type: embedding, num: 500, dim: 64, input: idx}
      - {name: b, type: embedding, num: 500, dim: 64, input: idx, init_std: 1.0}
      - {name: c, type: add, input: [a, b]}
    loss: {type: mse, target: t}
    """
    import textwrap

    model = compile_text(textwrap.dedent(text))
    namespace: dict = {}
    exec(compile(model.source("numpy"), "init_emb_numpy", "exec"), namespace)  # noqa: S102
    params = namespace["init_params"](0)
    a, b = params["a.weight"], params["b.weight"]
    assert a.shape == (500, 64) and abs(a.mean()) < 0.002 and abs(a.std() - 0.02) < 0.001
    assert abs(b.std() - 1.0) < 0.05


# -- spec errors ---------------------------------------------------------------------------
BAD_SPECS = [
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int32}}",
                 r"3:.*inputs\.idx\.dtype: unknown dtype 'int32' \(allowed: float, int64\)",
                 id="dtype-int32"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: [int64]}}", r"unknown dtype",
                 id="dtype-list"),
    pytest.param("inputs: {idx: {shape: [N, T], type: int64}}", r"unknown key 'type'",
                 id="dtype-misspelt"),
    pytest.param("inputs: {idx: {dtype: int64}}", r"needs a 'shape'", id="no-shape"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: null}}", r"unknown dtype None",
                 id="dtype-null"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: [T]",
                 r"dims: expected a mapping, got a list", id="dims-list"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {T: {max: 99999999999}}",
                 r"max is a positive integer up to", id="dims-huge"),
    pytest.param("inputs: {idx: [N, T]}",
                 r"embedding 'wte' reads 'idx', a float tensor; its input must be integer",
                 id="embedding-over-float"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {T: {max: 0}}",
                 r"4:.*dims\.T\.max: max is a positive integer", id="dims-zero"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {T: {max: 2.5}}",
                 r"max is a positive integer up to \d+, got 2\.5", id="dims-float"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {T: {max: true}}",
                 r"max is a positive integer", id="dims-bool"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {T: {min: 2}}",
                 r"dims\.T\.min: unknown key 'min' \(allowed: max\)", id="dims-unknown-key"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {S: {max: 4}}",
                 r"dims names 'S', which no input or target shape uses", id="dims-unused"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {T: 4}",
                 r"dims\.T: expected a mapping", id="dims-not-mapping"),
    pytest.param("inputs: {idx: {shape: [N, T], dtype: int64}}\ndims: {T: {max: 16}}",
                 r"T may be up to 16 \(dims\), more than max_len = 8", id="max-over-max_len"),
    pytest.param("inputs: {idx: {shape: [N, 9], dtype: int64}}",
                 r"'idx' has 9 positions, more than max_len = 8", id="fixed-T-over-max_len"),
]

SPEC_TAIL = """
targets:
  y: {shape: [N, T], dtype: int64}
layers:
  - {name: wte, type: embedding, num: 11, dim: 4, input: idx}
  - {name: wpe, type: position_embedding, max_len: 8, dim: 4, input: idx}
  - {name: x, type: add, input: [wte, wpe]}
  - {name: head, type: dense, units: 11}
loss: {type: softmax_cross_entropy, target: y}
"""


@pytest.mark.parametrize(("head", "message"), BAD_SPECS)
def test_spec_errors(head: str, message: str) -> None:
    text = "name: bad\n\n" + head + SPEC_TAIL
    if "[N, 9]" in head:
        text = text.replace("[N, T], dtype: int64}\nlayers", "[N, 9], dtype: int64}\nlayers")
    with pytest.raises(SpecError, match=message):
        compile_text(text, "bad.yaml")


@pytest.mark.parametrize(("loss", "targets", "message"), [
    ("{type: softmax_cross_entropy, target: y, ignore_index: 0}", "y: [N, T, 11]",
     r"loss\.ignore_index: ignore_index applies to integer class targets"),
    ("{type: softmax_cross_entropy, target: y, ignore_index: 1.5}",
     "y: {shape: [N, T], dtype: int64}", r"expected an integer, got 1\.5"),
    ("{type: softmax_cross_entropy, target: y, ignore_index: 36893488147419103232}",
     "y: {shape: [N, T], dtype: int64}", r"expected an integer, got 36893488147419103232"),
    ("{type: softmax_cross_entropy, target: y}", "y: {shape: [N, T, 11], dtype: int64}",
     r"integer class target 'y' has shape \[N, T, 11\]; it needs the shape of prediction "
     r"'head' \[N, T, 11\] without its last"),
    ("{type: softmax_cross_entropy, target: y}", "y: {shape: [N], dtype: int64}",
     r"integer class target 'y' has shape \[N\]"),
    ("{type: mse, target: y}", "y: {shape: [N, T, 11], dtype: int64}",
     r"loss 'mse' cannot take 'y', an integer tensor"),
])
def test_loss_spec_errors(loss: str, targets: str, message: str) -> None:
    text = f"""name: bad
inputs: {{idx: {{shape: [N, T], dtype: int64}}}}
targets: {{{targets}}}
layers:
  - {{name: wte, type: embedding, num: 11, dim: 4, input: idx}}
  - {{name: head, type: dense, units: 11}}
loss: {loss}
"""
    with pytest.raises(SpecError, match=message):
        compile_text(text, "bad.yaml")


@pytest.mark.parametrize("layer", ["{name: d, type: dense, units: 2, input: idx}",
                                   "{name: d, type: activation, activation: tanh, input: idx}",
                                   "{name: d, type: add, input: [idx, idx]}"])
def test_only_embeddings_read_integer_tensors(layer: str) -> None:
    text = f"""name: bad
inputs: {{idx: {{shape: [N, 2], dtype: int64}}}}
targets: {{t: [N, 2]}}
layers:
  - {layer}
loss: {{type: mse, target: t}}
"""
    with pytest.raises(SpecError, match=r"bad\.yaml:5:.*cannot read 'idx', an integer "
                                        r"tensor \(ids are read by embedding"):
        compile_text(text, "bad.yaml")


def test_spec_error_exits_2_with_position(tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ninputs: {idx: {shape: [N, T], dtype: int64}}\n"
                    "dims: {T: {max: -3}}" + SPEC_TAIL, encoding="utf-8")
    assert cli_main(["generate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:3:" in err and "dims.T.max" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_float_network_pays_nothing_new() -> None:
    """A spec without integer tensors or bounds gets none of the new checks."""
    text = """
    name: plain
    inputs: {x: [N, 3]}
    targets: {t: [N, 2]}
    layers:
      - {name: h, type: dense, units: 4, activation: tanh}
      - {name: out, type: dense, units: 2}
    loss: {type: softmax_cross_entropy, target: t}
    """
    import textwrap

    model = compile_text(textwrap.dedent(text))
    for backend in ("numpy", "torch"):
        source = model.source(backend)
        for word in ("_as_ids", "_check_ids", "_too_large", "count_nonzero"):
            assert word not in source, (backend, word)


def test_bounded_dimension_of_a_float_input(tmp_build) -> None:
    """dims bounds any symbolic dimension, also one that only a float input has."""
    _, modules = tmp_build("""
    name: seq
    inputs: {x: [N, T, 3]}
    targets: {t: [N, T, 2]}
    dims: {T: {max: 4}}
    layers:
      - {name: out, type: dense, units: 2}
    loss: {type: mse, target: t}
    """)
    np_mod, t_mod = modules["numpy"], modules["torch"]
    x, t = np.zeros((2, 5, 3)), np.zeros((2, 5, 2))
    with pytest.raises(ValueError, match=r"x: T = 5 exceeds 4, its declared max \(dims\)"):
        np_mod.loss_and_grad(np_mod.init_params(), x=x, t=t)
    net = t_mod.Model(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x: T = 5 exceeds 4"):
        net(x=torch.from_numpy(x), t=torch.from_numpy(t))
    loss, _ = np_mod.loss_and_grad(np_mod.init_params(), x=x[:, :4], t=t[:, :4])
    assert np.isfinite(loss)


def test_hostile_ids_are_refused(tmp_build) -> None:
    """Ids past int64 (unsigned), nested objects and strings: a ValueError, never an
    IndexError or a silent wrap-around."""
    _, modules = tmp_build(CLASSIFIER)
    np_mod, t_mod = modules["numpy"], modules["torch"]
    p = np_mod.init_params()
    y = np.array([[0, 1]])
    for bad in (np.array([[2**63 + 5, 1]], dtype=np.uint64), [["a", "b"]], [[object(), 1]],
                np.array([[1 + 2j, 1]])):
        with pytest.raises(ValueError, match="idx: "):
            np_mod.loss(p, idx=bad, y=y)
    tp = {k: torch.from_numpy(v) for k, v in p.items()}
    for bad in ([["a", "b"]], torch.tensor([[1.5, 2.0]])):
        with pytest.raises(ValueError, match="idx: "):
            t_mod.loss(tp, idx=bad, y=torch.from_numpy(y))


def test_check_refuses_a_batch_with_bad_ids() -> None:
    """``check --batch`` names a bad id or an over-long sequence as a usage error."""
    from symbackprop.errors import UsageError

    model = compile_text(LANGUAGE_MODEL)
    good = {"idx": np.array([[1, 2, 3]]), "y": np.array([[0, -1, 4]])}
    assert all(r.ok for r in check_model(model, batch=good))
    for batch, message in (
            ({"idx": np.array([[1, 12, 3]]), "y": good["y"]}, r"idx: id 12 is outside"),
            ({"idx": good["idx"], "y": np.array([[0, -3, 4]])}, r"y: id -3 is outside"),
            ({"idx": good["idx"].astype(float), "y": good["y"]}, r"idx: expected integer"),
            ({"idx": np.zeros((1, 7), int), "y": np.zeros((1, 7), int)},
             r"T = 7 exceeds 6, its declared max")):
        with pytest.raises(UsageError, match=message):
            check_model(model, batch=batch)
