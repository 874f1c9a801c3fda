"""Gradient checks: central finite differences and an independent torch autograd oracle.

The oracle is built from the *spec* with each registered layer's ``reference`` (plain
torch.nn ops) and differentiated by torch autograd; it shares nothing with the sympy
derivation. Finite differences run in float64 with step 6e-6 (about the cube root of
machine epsilon), over every entry of small parameters and along random directions
(<J^T c, v> against the directional difference) for large ones.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np

from .api import CompiledModel, _open_regular, compile_spec
from .build import layer_order
from .emit.render import module_filename
from .errors import CheckFailed, UsageError
from .graph import IdBound
from .layers import LAYERS, LOSSES
from .spec import ModelSpec

FD_STEP = {np.dtype(np.float64): 6e-6, np.dtype(np.float32): 5e-3}
FD_TOL = {np.dtype(np.float64): 1e-6, np.dtype(np.float32): 2e-2}
# A central difference (L(p + h) - L(p - h)) / 2h carries the rounding of the two losses,
# about a unit of the dtype's epsilon times |L| each, divided by 2h (0.4 eps |L| / h was
# measured on a gradient that is exactly zero): a difference below that says nothing.
# This many epsilons times |L| / h is taken as that noise.
FD_NOISE = 4
FULL_JACOBIAN_MAX = 64
DIRECTIONS = 4


def load_module(path: str | Path) -> ModuleType:
    """Import a generated module from a file, under a fresh unique name."""
    name = f"_symbackprop_generated_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def random_batch(model: CompiledModel, batch: int = 5, seed: int = 1,
                 dtype: Any = np.float64) -> dict[str, np.ndarray]:
    """Inputs ~ N(0, 1); targets drawn to suit the loss (probabilities, one-hot rows);
    integer tensors get valid ids (a quarter of them the ignored label, where a loss
    ignores one), and bounded dimensions stay within their bound."""
    rng = np.random.default_rng(seed)
    graph = model.derivation.graph
    sizes = _dim_sizes(model, batch)
    out: dict[str, np.ndarray] = {}
    # each target drawn to suit the loss term that reads it
    kinds = {term.target: LOSSES[term.type].target_kind
             for term in reversed(model.spec.losses or (model.spec.loss,))}
    for node in graph.nodes.values():
        if node.role not in ("input", "target"):
            continue
        shape = tuple(int(d) if d.is_Integer else sizes[str(d)] for d in node.shape)
        kind = kinds.get(node.name)
        if node.dtype == "int64":
            out[node.name] = _random_ids(graph.id_bounds.get(node.name), shape, rng)
        elif node.role == "input":
            out[node.name] = rng.normal(size=shape)
        elif kind == "probability":
            out[node.name] = rng.uniform(0.05, 0.95, size=shape)
        elif kind == "distribution":
            classes = shape[-1]
            flat = np.eye(classes)[rng.integers(0, classes, int(np.prod(shape[:-1])))]
            out[node.name] = flat.reshape(shape)
        else:
            out[node.name] = rng.normal(size=shape)
    return {k: v if v.dtype.kind == "i" else v.astype(dtype) for k, v in out.items()}


def _random_ids(bound: IdBound | None, shape: tuple[int, ...],
                rng: np.random.Generator) -> np.ndarray:
    """Ids in [0, high) (any small ids where nothing bounds them); where a loss ignores a
    label, about a quarter of them are that label, but never all."""
    ids = rng.integers(0, bound.high if bound is not None else 4, size=shape, dtype=np.int64)
    if bound is not None and bound.ignore is not None and ids.size:
        flat = ids.reshape(-1)
        ignored = rng.random(flat.size) < 0.25
        flat[ignored] = bound.ignore
        # one id that counts (the ignored label may be a valid id too: a loss over no
        # counted row is NaN, as torch's), where any id other than the ignored one exists
        counted = [i for i in range(bound.high) if i != bound.ignore]
        if counted and not (flat != bound.ignore).any():
            flat[rng.integers(0, flat.size)] = counted[int(rng.integers(0, len(counted)))]
    return ids


def call_args(module: ModuleType, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a generated loss function takes (unused targets dropped)."""
    import inspect

    # (Arguments with a default, such as dropout's training and seed, are options.)
    names = [name for name, p in inspect.signature(module.loss).parameters.items()
             if name != "params" and p.default is inspect.Parameter.empty]
    return {k: batch[k] for k in names}


@dataclass
class Row:
    check: str
    param: str
    abs_err: float
    rel_err: float
    ok: bool


# A gradient is measured against the largest of its own entries, but never against less
# than this fraction of the largest gradient of any parameter: a gradient that is zero
# (a bias before a softmax over another axis) comes out as rounding, ~1e-17, which is
# right, and relative to its own size would fail every tolerance.
FLOOR = 1e-6


def _rel(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> tuple[float, float]:
    """(max abs error, max relative error) against the largest entry of ``b`` (or
    ``floor`` where that is larger); NaN when either side has a non-finite value, so
    that the row fails: a NaN is never within a tolerance."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan"), float("nan")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return diff, diff / max(scale, floor, 1e-30)


def _floor(references: Iterable[Any]) -> float:
    """FLOOR times the largest entry of any of the reference gradients."""
    largest = [float(np.max(np.abs(np.asarray(r, dtype=np.float64))))
               for r in references if np.size(r)]
    finite = [v for v in largest if np.isfinite(v)]
    return FLOOR * max(finite, default=0.0)


def _within(rel: float, tol: float) -> bool:
    return bool(np.isfinite(rel)) and rel <= tol


def finite_differences(module: ModuleType, params: dict[str, np.ndarray],
                       batch: Mapping[str, np.ndarray], *, to_numpy: Any = np.asarray,
                       wrap: Any = None, seed: int = 2) -> dict[str, tuple[float, float]]:
    """{param: (max abs error, max relative error)} of loss_and_grad against central FD."""
    wrap = wrap or (lambda a: a)
    args = call_args(module, batch)
    args = {k: wrap(v) for k, v in args.items()}
    _, grads = module.loss_and_grad({k: wrap(v) for k, v in params.items()}, **args)
    dtype = next(iter(params.values())).dtype
    h = FD_STEP[np.dtype(dtype)]
    rng = np.random.default_rng(seed)

    def loss_at(p: dict[str, np.ndarray]) -> float:
        return float(to_numpy(module.loss({k: wrap(v) for k, v in p.items()}, **args)))

    out: dict[str, tuple[float, float]] = {}
    # The floor: a millionth of the largest gradient (see FLOOR), or where that is less,
    # the differences' own noise over their tolerance: a gradient that is exactly zero (a
    # key's bias before a softmax over the keys) is then within tolerance when its
    # difference is within that noise, and the check cannot tell more than that.
    loss0 = abs(loss_at(params))
    noise = FD_NOISE * float(np.finfo(dtype).eps) * loss0 / h if np.isfinite(loss0) else 0.0
    floor = max(_floor(to_numpy(g) for g in grads.values()), noise / FD_TOL[np.dtype(dtype)])
    # A NaN or infinite loss makes every finite difference NaN, so every row fails;
    # a finite loss with NaN gradients fails on the analytic side.
    for name, grad in grads.items():
        analytic = np.asarray(to_numpy(grad), dtype=np.float64)
        base = params[name]
        if base.size <= FULL_JACOBIAN_MAX:
            numeric = np.zeros(base.shape)
            for idx in np.ndindex(base.shape):
                plus = dict(params)
                plus[name] = base.copy()
                plus[name][idx] += h
                minus = dict(params)
                minus[name] = base.copy()
                minus[name][idx] -= h
                numeric[idx] = (loss_at(plus) - loss_at(minus)) / (2 * h)
            out[name] = _rel(analytic, numeric, floor)
        else:
            worst = (0.0, 0.0)
            if not np.isfinite(analytic).all():
                out[name] = (float("nan"), float("nan"))  # no projection may hide a NaN
                continue
            for _ in range(DIRECTIONS):
                v = rng.normal(size=base.shape).astype(dtype)
                plus = dict(params, **{name: base + h * v})
                minus = dict(params, **{name: base - h * v})
                numeric = np.array((loss_at(plus) - loss_at(minus)) / (2 * h))
                directional = np.array(np.sum(analytic * v))
                scale = float(np.linalg.norm(analytic) * np.linalg.norm(v))
                diff = float(abs(directional - numeric))
                if not np.isfinite(diff):
                    worst = (float("nan"), float("nan"))
                    break
                worst = max(worst, (diff, diff / max(scale, floor * np.linalg.norm(v),
                                                       1e-30)))
            out[name] = worst
    return out


def reference_loss(spec: ModelSpec, params: Mapping[str, Any], batch: Mapping[str, Any]) -> Any:
    """The loss computed by the independent torch.nn oracle (differentiable by autograd)."""
    from .layers.shape import DIMS

    values: dict[str, Any] = {d.name: batch[d.name] for d in spec.inputs}
    sizes: dict[str, int] = {}  # the batch's size of each dimension symbol (for reshape)
    for decl in (*spec.inputs, *spec.targets):
        if decl.name in batch:
            for dim, size in zip(decl.shape, batch[decl.name].shape, strict=False):
                if isinstance(dim, str):
                    sizes.setdefault(dim, int(size))
    token = DIMS.set(sizes)
    try:
        for layer in layer_order(spec):
            inputs = [values[name] for name in layer.inputs]
            values[layer.name] = LAYERS[layer.type].reference(layer, inputs, params)
        total = 0
        for loss in spec.losses or (spec.loss,):
            target = batch[loss.target] if loss.target is not None else None
            prediction = values[loss.prediction] if loss.prediction else None
            if loss.type == "formula":  # it may read parameters by name
                term = LOSSES[loss.type].reference(loss, prediction, target,  # type: ignore[call-arg]
                                                   params=params)
            else:
                term = LOSSES[loss.type].reference(loss, prediction, target)
            # (a term's weight counts also when it is the list's only term; the single
            # loss: form has weight 1)
            total = total + loss.weight * term
        decay = spec.weight_decay
        if decay is not None:
            names = decay.params or [n for n, p in params.items() if p.ndim >= 2
                                     and n.rsplit(".", 1)[-1] == "weight"
                                     and getattr(p, "requires_grad", True)]
            total = total + decay.l2 / 2 * sum((params[n] ** 2).sum() for n in names)
        return total
    finally:
        DIMS.reset(token)


def oracle_grads(spec: ModelSpec, params: Mapping[str, np.ndarray],
                 batch: Mapping[str, np.ndarray], trainable: list[str]) -> tuple[float, dict]:
    import torch

    tparams = {k: torch.tensor(v, requires_grad=k in trainable) for k, v in params.items()}
    tbatch = {k: torch.tensor(v) for k, v in batch.items()}
    loss = reference_loss(spec, tparams, tbatch)
    # A trainable layer that does not feed the loss has a zero gradient, not an error.
    grads = torch.autograd.grad(loss, [tparams[k] for k in trainable], allow_unused=True)
    return float(loss.detach()), {
        k: (torch.zeros_like(tparams[k]) if g is None else g).numpy()
        for k, g in zip(trainable, grads, strict=True)}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _dim_sizes(model: CompiledModel, batch: int) -> dict[str, int]:
    graph = model.derivation.graph
    sizes = {name: (batch if n == 0 else 3) for n, name in enumerate(graph.dims)}
    for name, limit in graph.dim_limits.items():
        sizes[name] = min(sizes[name], limit.max)
    return sizes


def estimate_bytes(model: CompiledModel, batch: Mapping[str, np.ndarray] | None = None) -> int:
    """About how much memory ``check`` needs: every parameter is held ~10 times over
    (the parameters, finite-difference copies, gradients, the oracle's and the Model's
    copies) and every intermediate ~8 times (forward and backward of several models)."""
    graph = model.derivation.graph
    sizes = _dim_sizes(model, 5)
    if batch:
        for node in graph.nodes.values():
            if node.name in batch:
                for dim, n in zip(node.shape, np.shape(batch[node.name]), strict=False):
                    if not dim.is_Integer:
                        sizes[str(dim)] = int(n)
    total = 0
    for node in graph.nodes.values():
        count = 1
        for dim in node.shape:
            count *= int(dim) if dim.is_Integer else sizes.get(str(dim), 3)
        total += count * (10 if node.role == "param" else 8)
    return 8 * total


def memory_limit() -> int:
    """Half the memory available now (Linux), else 4 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


def load_arrays(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """Arrays by name from a ``.npz`` file (or a ``.pt`` state dict, with torch); never
    unpickles arbitrary objects, and reads only regular files (a FIFO would block)."""
    path = Path(path)
    if path.suffix == ".pt" and not torch_available():
        raise UsageError(f"{path}: reading .pt needs torch; save the {what} as .npz")
    if path.suffix not in (".pt", ".npz"):
        raise UsageError(f"{path}: the {what} file must be .npz (or .pt with torch)")
    try:
        with _open_regular(path, os.O_RDONLY) as handle:
            return _read_arrays(path, handle, what)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def _read_arrays(path: Path, handle: BinaryIO, what: str) -> dict[str, np.ndarray]:
    if path.suffix == ".pt":
        import torch

        try:
            data = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise UsageError(f"{path}: cannot read the {what}: "
                             f"{' '.join(str(exc).split())[:200]}") from None
        if not isinstance(data, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in data.values()):
            raise UsageError(f"{path}: expected a mapping of names to tensors")
        return {str(k): v.detach().cpu().double().numpy() for k, v in data.items()}
    try:
        with np.load(handle, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"{path}: cannot read the {what}: "
                         f"{' '.join(str(exc).split())[:200]}") from None


def _checked_params(module: ModuleType, given: Mapping[str, np.ndarray], label: str,
                    dtype: np.dtype) -> dict[str, np.ndarray]:
    expected = module.PARAM_SHAPES
    missing = sorted(set(expected) - set(given))
    unknown = sorted(set(given) - set(expected))
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unknown {', '.join(unknown)}"] if unknown else [])
        raise UsageError(f"{label}: parameters do not match the spec: {'; '.join(parts)}")
    out = {}
    for name, shape in expected.items():
        value = np.asarray(given[name])
        if value.shape != tuple(shape):
            raise UsageError(f"{label}: {name}: expected shape {tuple(shape)}, "
                             f"got {value.shape}")
        if not np.issubdtype(value.dtype, np.number) or np.iscomplexobj(value):
            raise UsageError(f"{label}: {name}: expected real numbers, got {value.dtype}")
        out[name] = value.astype(dtype)
    return out


def _checked_batch(model: CompiledModel, module: ModuleType,
                   given: Mapping[str, np.ndarray], label: str,
                   dtype: np.dtype) -> dict[str, np.ndarray]:
    graph = model.derivation.graph
    out: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    needed = [n for n in graph.nodes.values() if n.role in ("input", "target")
              and n.name in call_args_names(module)]
    for node in needed:
        if node.name not in given:
            raise UsageError(f"{label}: the batch has no array {node.name!r}")
        value = np.asarray(given[node.name])
        if node.dtype == "int64" and value.dtype.kind not in "iu":
            raise UsageError(f"{label}: {node.name}: expected integer ids, got {value.dtype}")
        if not np.issubdtype(value.dtype, np.number) or np.iscomplexobj(value):
            raise UsageError(f"{label}: {node.name}: expected real numbers, got {value.dtype}")
        if value.ndim != len(node.shape):
            raise UsageError(f"{label}: {node.name}: expected {len(node.shape)} axes, "
                             f"got shape {value.shape}")
        for dim, n in zip(node.shape, value.shape, strict=True):
            if dim.is_Integer and int(dim) != n or not dim.is_Integer and \
                    sizes.setdefault(str(dim), n) != n:
                raise UsageError(f"{label}: {node.name}: shape {value.shape} does not fit "
                                 f"the declared {tuple(str(d) for d in node.shape)}")
            if n == 0:
                raise UsageError(f"{label}: {node.name}: the batch is empty")
        bound = graph.id_bounds.get(node.name)
        if bound is not None and value.size:
            bad = value[((value < 0) | (value >= bound.high)) & (value != bound.ignore)]
            if bad.size:
                raise UsageError(f"{label}: {node.name}: id {bad.flat[0]} is outside "
                                 f"[0, {bound.high}) ({bound.reason})")
        out[node.name] = value.astype(np.int64 if node.dtype == "int64" else dtype)
    for dim, size in sizes.items():
        limit = graph.dim_limits.get(dim)
        if limit is not None and size > limit.max:
            raise UsageError(f"{label}: {dim} = {size} exceeds {limit.max}, {limit.reason}")
    return out


def call_args_names(module: ModuleType) -> list[str]:
    import inspect

    return [p for p in inspect.signature(module.loss).parameters if p != "params"]


def check_model(model: CompiledModel, *, dtype: Any = np.float64,
                params: Mapping[str, np.ndarray] | None = None,
                batch: Mapping[str, np.ndarray] | None = None,
                labels: tuple[str, str] = ("--params", "--batch")) -> list[Row]:
    """Generate into a temporary folder, run every check, return the table rows.

    ``params`` and ``batch`` (arrays by name) give the point to check at; by default the
    parameters are each layer's declared initialisation (``init_params``; a frozen
    layer's values are what the spec says they are) and the batch is random."""
    needed = estimate_bytes(model, batch)
    limit = memory_limit()
    if needed > limit:
        raise UsageError(f"{model.label}: checking this network needs about {_gib(needed)} "
                         f"of memory, more than the {_gib(limit)} allowed (half of what is "
                         "available); check a smaller version of it")
    rows: list[Row] = []
    backends = ("numpy", "torch") if torch_available() else ("numpy",)
    dtype = np.dtype(dtype)
    fd_tol = FD_TOL[dtype]
    ref_tol = 1e-9 if dtype == np.float64 else 1e-4
    with tempfile.TemporaryDirectory(prefix="symbackprop-check-") as tmp:
        modules = {}
        for backend in backends:
            path = Path(tmp) / module_filename(model.spec.name, backend)
            path.write_text(model.source(backend), encoding="utf-8")
            modules[backend] = load_module(path)
        np_mod = modules["numpy"]
        if params is None:
            params = {k: v.astype(dtype) for k, v in np_mod.init_params(0).items()}
        else:
            params = _checked_params(np_mod, params, labels[0], dtype)
        if batch is None:
            batch = random_batch(model, dtype=dtype)
        else:
            batch = _checked_batch(model, np_mod, batch, labels[1], dtype)
        for name, (a, r) in finite_differences(np_mod, params, batch).items():
            rows.append(Row("finite differences (numpy)", name, a, r, _within(r, fd_tol)))
        if "torch" in modules:
            import torch

            t_mod = modules["torch"]
            for name, (a, r) in finite_differences(
                    t_mod, params, batch, to_numpy=lambda t: t.detach().numpy(),
                    wrap=torch.from_numpy).items():
                rows.append(Row("finite differences (torch)", name, a, r, _within(r, fd_tol)))
            trainable = list(np_mod.TRAINABLE)
            ref_loss, ref = oracle_grads(model.spec, params, batch, trainable)
            floor = _floor(ref.values())
            for backend, mod in modules.items():
                wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
                loss, grads = mod.loss_and_grad({k: wrap(v) for k, v in params.items()},
                                                **{k: wrap(v) for k, v in
                                                   call_args(mod, batch).items()})
                a, r = _rel(np.array(float(loss)), np.array(ref_loss))
                rows.append(Row(f"torch autograd oracle ({backend})", "loss", a, r,
                                _within(r, ref_tol)))
                for name in trainable:
                    got = grads[name]
                    got = got.numpy() if hasattr(got, "numpy") else got
                    a, r = _rel(np.asarray(got, dtype=np.float64), ref[name], floor)
                    rows.append(Row(f"torch autograd oracle ({backend})", name, a, r,
                                    _within(r, ref_tol)))
            model_obj = t_mod.Model(dtype=torch.float64 if dtype == np.float64 else
                                    torch.float32)
            model_obj.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
            # The oracle is the network in evaluation mode (dropout the identity); in
            # training mode the Model draws masks the oracle cannot know.
            model_obj.eval()
            loss = model_obj.loss(**{k: torch.from_numpy(v)
                                     for k, v in call_args(t_mod, batch).items()})
            loss.backward()
            for name, p in model_obj.named_parameters():
                if name not in ref:
                    continue
                a, r = _rel(p.grad.numpy().astype(np.float64), ref[name], floor)
                rows.append(Row("Model.loss().backward() vs oracle", name, a, r,
                                _within(r, ref_tol)))
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max(len(r.param) for r in rows) if rows else 5
    lines = []
    current = None
    for row in rows:
        if row.check != current:
            current = row.check
            lines.append(f"\n{row.check}")
            lines.append(f"  {'parameter':<{width}}  {'max abs err':>12}  {'max rel err':>12}  ")
        status = "ok" if row.ok else "FAIL"
        lines.append(f"  {row.param:<{width}}  {row.abs_err:12.3e}  {row.rel_err:12.3e}  {status}")
    return "\n".join(lines).lstrip("\n")


def check_path(path: str | Path, *, params: str | Path | None = None,
               batch: str | Path | None = None,
               memory_cap: Callable[[str], AbstractContextManager[None]] | None = None,
               ) -> tuple[list[Row], str]:
    """Check the spec at ``path``; ``memory_cap`` (the command line's) bounds its
    derivation, not the numerical checks, whose size is estimated and refused up front."""
    with (memory_cap(f"deriving {path}") if memory_cap else nullcontext()):
        model = compile_spec(path)
    rows = check_model(model,
                       params=load_arrays(params, "parameters") if params else None,
                       batch=load_arrays(batch, "batch") if batch else None,
                       labels=(str(params), str(batch)))
    text = format_rows(rows)
    if not torch_available():
        text += ("\n\n(torch is not installed: the torch module and the autograd oracle "
                 "were skipped)")
    if not all(r.ok for r in rows):
        raise CheckFailed(text + "\n\ncheck FAILED")
    return rows, text
