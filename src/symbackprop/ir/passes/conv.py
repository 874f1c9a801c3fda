"""Convolutions: a window read contracted with a kernel -> one :class:`Conv` op.

Lowering leaves a convolution as what the derivation says it is: the input read through
sliding windows (a :class:`Window` view, materialised as a strided view ``xw``) and an
einsum of ``xw`` with the kernel; the weight gradient is an einsum of the output's
adjoint with the same windows; the input gradient an einsum of the adjoint with the
kernel whose windows a :class:`WindowAdd` adds back. This pass recognises the three (and
only these, here) and makes each one :class:`Conv` op, which torch prints as
``conv2d`` and ``aten.convolution_backward`` (as ``torch.nn.grad.conv2d_weight`` /
``conv2d_input`` call it) and numpy as one helper
each; a forward convolution whose only reader adds a per-channel bias takes the bias.

A small convolution (its kernel, written out as the matrix of its map on one example,
has at most :data:`DENSE_ENTRIES` entries) is computed as matrix products instead: one
:class:`DenseKernel` statement writes the kernel out (an index gather), the forward
convolution is the examples' flattened inputs against it, the input gradient the
flattened adjoint against it, and the weight gradient the adjoint's product with the
inputs, its entries summed back onto the kernel taps they came from. Convolution calls
have a fixed cost that dominates there: cnn.yaml's conv2 (16 x 8 x 3 x 3 on 4 x 4 inputs,
an 8192-entry matrix) took ~55 us forward and ~160 us backward in aten's convolutions
(oneDNN) at batch 64, one core, and ~36 and ~70 us as products. conv1 (8 x 1 x 3 x 3 on
8 x 8 inputs, padding 1: 32768 entries) was faster as a convolution, and so were the
larger layers measured (131072 entries: 1.6-2.3x slower as products).

A window of stride 1 reads ``x[i + a]``: which of its two indices is the output position
and which the kernel tap is decided here by the kernel's own axes (the lowering named
the shorter one the tap). Every match is checked against torch's output size,
``(n + 2p - k) // s + 1``; anything else stays an einsum.
"""

from __future__ import annotations

import math
from dataclasses import replace

import sympy as sp

from ... import naming
from ..nodes import (
    Assign,
    Conv,
    DenseKernel,
    Einsum,
    Map,
    Program,
    Slide,
    View,
    Window,
    WindowAdd,
    free_name,
    join_comments,
    readers,
)

#: The most entries a convolution's kernel written out densely may have for the
#: convolution to be computed as matrix products (see the module's docstring).
DENSE_ENTRIES = 16384


def _window_of(stmt: Assign) -> Window | None:
    """The window when ``stmt`` only materialises one (``xw = windows of x``)."""
    op = stmt.op
    if not isinstance(op, Map) or not isinstance(op.body, sp.Symbol) or len(op.views) != 1:
        return None
    ((sym, view),) = op.views
    if sym != op.body or not isinstance(view, Window) or any(p is not None for p in view.picks):
        return None
    if (len(view.axes) < 3 or not all(isinstance(a, int) for a in view.axes[:2])
            or not all(isinstance(a, Slide) and a.kernel_place >= 0 for a in view.axes[2:])):
        return None
    return view


def _letters(subscripts: str) -> tuple[list[str], str]:
    inputs, out = subscripts.split("->")
    return inputs.split(","), out


def _geometry(window: Window, sub: str, kernel: str, shapes: dict[str, tuple[sp.Expr, ...]],
              ) -> tuple[list[str], list[str], tuple[int, ...], tuple[int, ...]] | None:
    """For each spatial axis of ``window`` (read as einsum letters ``sub``): the kernel's
    letter (one of ``kernel``'s) and the output position's letter; None when the window
    is no convolution's of torch's output size."""
    taps: list[str] = []
    positions: list[str] = []
    strides: list[int] = []
    pads: list[int] = []
    sizes = shapes[window.src][2:]
    for slide, n in zip(window.axes[2:], sizes, strict=True):
        assert isinstance(slide, Slide)
        pos, tap = sub[slide.place], sub[slide.kernel_place]
        if tap in kernel:
            k, q = slide.size, slide.count
        elif pos in kernel and slide.stride == 1:
            pos, tap = tap, pos
            k, q = slide.count, slide.size
        else:
            return None
        if not sp.sympify(n).is_Integer or (int(n) + 2 * slide.pad - k) // slide.stride + 1 != q:
            return None
        taps.append(tap)
        positions.append(pos)
        strides.append(slide.stride)
        pads.append(slide.pad)
    return taps, positions, tuple(strides), tuple(pads)


def _forward_or_weight(op: Einsum, windows: dict[str, Window], program: Program,
                       shape: tuple[sp.Expr, ...]) -> Conv | None:
    if len(op.operands) != 2:
        return None
    (la, lb), out = _letters(op.subscripts)
    for (xw, lx), (other, lo) in (((op.operands[0], la), (op.operands[1], lb)),
                                  ((op.operands[1], lb), (op.operands[0], la))):
        window = windows.get(xw)
        if window is None:
            continue
        n, c = lx[window.axes[0]], lx[window.axes[1]]  # type: ignore[index]
        d = len(window.axes) - 2
        if len(lx) != 2 + 2 * d or len(lo) != 2 + d or len(set(lx)) != len(lx):
            continue
        # forward: the kernel (the other operand) holds the taps; the result the positions
        found = _geometry(window, lx, lo, program.shapes)
        if found is not None:
            taps, positions, stride, pad = found
            if lo[1:] == c + "".join(taps) and out == n + lo[0] + "".join(positions):
                return Conv("forward", window.src, other, stride, pad, shape)
        # weight: the adjoint (the other operand) holds the positions; the result the taps
        found = _geometry(window, lx, out, program.shapes)
        if found is not None:
            taps, positions, stride, pad = found
            if (lo[0] == n and lo[2:] == "".join(positions) and lo[1] != c
                    and out == lo[1] + c + "".join(taps)):
                return Conv("weight", window.src, other, stride, pad, shape)
    return None


def _input(op: WindowAdd, values: Einsum) -> Conv | None:
    d = len(op.slides)
    if (len(values.operands) != 2 or len(op.shape) != 2 + d
            or tuple(s[0] for s in op.slides) != tuple(range(2, 2 + d))):
        return None
    (la, lb), out = _letters(values.subscripts)
    if len(out) != 2 + 2 * d:
        return None
    n, c = out[0], out[1]
    for (g, lg), (w, lw) in (((values.operands[0], la), (values.operands[1], lb)),
                             ((values.operands[1], lb), (values.operands[0], la))):
        if len(lg) != 2 + d or len(lw) != 2 + d or lg[0] != n or lw[1] != c or lg[1] != lw[0]:
            continue
        ok = True
        for m, (_, stride, pad, count, size) in enumerate(op.slides):
            pos, tap = out[2 + 2 * m], out[3 + 2 * m]
            if lw[2 + m] == tap and lg[2 + m] == pos:
                k, q = size, count
            elif lw[2 + m] == pos and lg[2 + m] == tap and stride == 1:
                k, q = count, size
            else:
                ok = False
                break
            extent = op.shape[2 + m]
            if not sp.sympify(extent).is_Integer or (int(extent) + 2 * pad - k) // stride + 1 != q:
                ok = False
                break
        if ok:
            return Conv("input", g, w, tuple(s[1] for s in op.slides),
                        tuple(s[2] for s in op.slides), op.shape)
    return None


def _bias(stmt: Assign, convs: dict[str, Assign]) -> tuple[str, str] | None:
    """``z = conv + bias[:, None, None]``: (the conv's target, the bias)."""
    op = stmt.op
    if not isinstance(op, Map) or not isinstance(op.body, sp.Add) or len(op.body.args) != 2:
        return None
    views = dict(op.views)
    for a, b in (op.body.args, op.body.args[::-1]):
        cv, bv = views.get(a), views.get(b)
        if (isinstance(cv, View) and cv.is_identity and cv.src in convs and isinstance(bv, View)
                and bv.places == (1,) and all(p is None for p in bv.picks)
                and bv.out_rank == len(convs[cv.src].op.shape)):  # type: ignore[union-attr]
            return cv.src, bv.src
    return None


def conv(stmts: list[Assign], program: Program, protected: set[str]) -> list[Assign]:
    windows = {s.target: w for s in stmts if (w := _window_of(s)) is not None}
    if not windows:
        return stmts
    einsums = {s.target: s for s in stmts if isinstance(s.op, Einsum)}
    out: list[Assign] = []
    for stmt in stmts:
        op = stmt.op
        found: Conv | None = None
        if isinstance(op, Einsum):
            found = _forward_or_weight(op, windows, program, program.shapes[stmt.target])
            if found is not None:
                # the layer's comment sits on the window it read first: it moves here
                at = next((n for n, s in enumerate(out) if s.target in op.operands
                           and s.target in windows and s.comment and s.phase == stmt.phase),
                          None)
                if at is not None:
                    stmt = replace(stmt, comment=join_comments(out[at].comment, stmt.comment))
                    out[at] = replace(out[at], comment="")
        elif isinstance(op, WindowAdd) and op.values in einsums:
            found = _input(op, einsums[op.values].op)  # type: ignore[arg-type]
            if found is not None:
                stmt = replace(stmt, comment=join_comments(einsums[op.values].comment,
                                                           stmt.comment))
        out.append(replace(stmt, op=found) if found is not None else stmt)
    # a forward convolution read only by "+ bias" takes the bias
    count = readers(out)
    convs = {s.target: s for s in out if isinstance(s.op, Conv) and s.op.mode == "forward"
             and s.target not in protected and count.get(s.target) == 1}
    fused: dict[str, Assign] = {}
    final: list[Assign] = []
    for stmt in out:
        pair = _bias(stmt, convs)
        if pair is not None and pair[0] not in fused:
            source = convs[pair[0]]
            fused[pair[0]] = source
            stmt = replace(stmt, op=replace(source.op, bias=pair[1]),
                           comment=join_comments(source.comment, stmt.comment))
        final.append(stmt)
    final = [s for s in final if s.target not in fused]
    # drop what the convolutions made dead: the windows' views, the input gradient's
    # einsum
    while True:
        count = readers(final)
        dead = {s.target for s in final if (s.target in windows or s.target in einsums)
                and s.target not in protected and not count.get(s.target)}
        if not dead:
            return _dense(final, program)
        final = [s for s in final if s.target not in dead]


def _geometry_of(op: Conv, shapes: dict[str, tuple[sp.Expr, ...]],
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(kernel shape, input's spatial extents, output's positions) of a convolution in
    any mode; None where one is not a number."""
    if op.mode == "forward":
        kernel, size, positions = shapes[op.b], shapes[op.a][2:], op.shape[2:]
    elif op.mode == "input":
        kernel, size, positions = shapes[op.b], op.shape[2:], shapes[op.a][2:]
    else:
        kernel, size, positions = op.shape, shapes[op.a][2:], shapes[op.b][2:]
    parts = (tuple(kernel), tuple(size), tuple(positions))
    if not all(sp.sympify(n).is_Integer for part in parts for n in part):
        return None
    return tuple(tuple(int(n) for n in part) for part in parts)  # type: ignore[return-value]


def _dense(stmts: list[Assign], program: Program) -> list[Assign]:
    """Each convolution whose kernel written out densely is small, as matrix products:
    one :class:`DenseKernel` statement per kernel and geometry, before its first
    reader, which the forward convolution and the input gradient read."""
    taken = {t for s in stmts for t in s.targets} | {r for s in stmts for r in s.reads}
    made: dict[tuple[object, ...], str] = {}
    out: list[Assign] = []
    for stmt in stmts:
        op = stmt.op
        geometry = _geometry_of(op, program.shapes) if isinstance(op, Conv) else None
        if geometry is None:
            out.append(stmt)
            continue
        assert isinstance(op, Conv)
        kernel, size, positions = geometry
        shape = (kernel[0] * math.prod(positions), kernel[1] * math.prod(size))
        if math.prod(shape) > DENSE_ENTRIES:
            out.append(stmt)
            continue
        if op.mode == "weight":
            out.append(replace(stmt, op=replace(op, dense=True)))
            continue
        key = (op.b, size, op.stride, op.pad)
        name = made.get(key)
        if name is None:
            name = naming.dense_kernel(op.b)
            dims = (sp.Integer(shape[0]), sp.Integer(shape[1]))
            if not free_name(name, dims, taken, program):
                out.append(stmt)
                continue
            program.shapes[name] = dims
            taken.add(name)
            made[key] = name
            what = (f"{op.b} written out as the {shape[0]} x {shape[1]} matrix of its "
                    f"map on one example (a small convolution: matrix products instead "
                    f"of convolution calls)")
            out.append(Assign(name, DenseKernel(op.b, size, op.stride, op.pad, dims),
                              what, stmt.phase))
        out.append(replace(stmt, op=replace(op, dense=True, matrix=name)))
    return out
