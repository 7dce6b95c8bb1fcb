"""Fused spatial gate of sSE and the concurrent scSE (Roy et al., MICCAI 2018 / IEEE TMI 2019).

sSE: ``y = x * q``, ``q = sigmoid(w . x + b)`` per (B, position). scSE: ``max(x*c, x*q)``, ``x*c + x*q`` or
``x*c*q`` with the channel gate ``c`` of :mod:`~medse.attention.kernels.channel`. Used by
:class:`~medse.attention.scse.SpatialSE` and :class:`~medse.attention.scse.SCSE`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from medse.attention.kernels.core import (
    acc_dtype,
    check_skip,
    chunk_spans,
    compiled_call,
    compiles,
    gate_backward,
    needs_grad,
    output_buffer,
    run_gate,
    split_output,
    unflat,
)

__all__ = ["AGGREGATIONS", "scse_attention", "spatial_attention"]

AGGREGATIONS = ("max", "add", "mul")


# kernels for the compile backend: pure functions on whole (B, C, N) tensors, fused by torch.compile


def _ck_scse_fwd(x: Tensor, c3: Tensor, w: Tensor, bias: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    q = torch.sigmoid((x * w.view(1, -1, 1)).sum(1, keepdim=True) + bias)
    if mode == "max":
        y = torch.maximum(x * c3, x * q)
    elif mode == "add":
        y = x * c3 + x * q
    else:
        y = x * c3 * q
    return y, q


def _scse_grad_split(x: Tensor, dy: Tensor, c3: Tensor, q: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Gradients wrt the two products a = x*c and b = x*q (mul: wrt c*x and q*x)."""
    if mode == "max":
        a, b = x * c3, x * q
        h = torch.where(a > b, 1.0, torch.where(a == b, 0.5, 0.0)).to(x.dtype)
        ga = dy * h
        return ga, dy - ga
    if mode == "add":
        return dy, dy
    return dy * q, dy * c3


def _ck_scse_bwd1(x: Tensor, dy: Tensor, c3: Tensor, q: Tensor, mode: str):
    ga, gb = _scse_grad_split(x, dy, c3, q, mode)
    gc = (ga * x).sum(-1, dtype=acc_dtype(x.dtype))
    gq = (gb * x).sum(1, keepdim=True)
    gs = gq * q * (1 - q)
    gw = (x * gs).sum((0, 2), dtype=acc_dtype(x.dtype))
    return gc, gs, gw, gs.sum(dtype=acc_dtype(x.dtype))


def _ck_scse_bwd2(x: Tensor, dy: Tensor, c3: Tensor, q: Tensor, w: Tensor, gs: Tensor, gzn: Tensor, mode: str):
    ga, gb = _scse_grad_split(x, dy, c3, q, mode)
    if mode == "mul":
        return ga * c3 + w.view(1, -1, 1) * gs + gzn
    return ga * c3 + gb * q + w.view(1, -1, 1) * gs + gzn


def _spatial_logits(x3: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``w . x + b`` over channels: (B, C, N) -> (B, 1, N), one read of x (a batched matrix product; ``bmm``
    takes a block ``x3[..., j0:j1]`` with its row stride, where ``matmul``'s broadcasting copied it first)."""
    s = torch.bmm(w.to(x3.dtype).view(1, 1, -1).expand(x3.shape[0], 1, -1), x3)
    if bias is not None:
        s = s.add_(bias.to(x3.dtype).view(1, 1, 1))
    return s


class _SpatialFn(torch.autograd.Function):
    """y = x * q, q = sigmoid(w . x + b).

    Backward, one blocked pass over (dy, y): with ``r = sum_c dy * y = q * sum_c dy * x``, ``gs = gq * q * (1 - q)
    = r * (1 - q)``, ``gx = dy * q + w * gs``, ``gw = sum_{b,n} x * gs = sum_{b,n} y * gs / q``, ``gb = sum gs``
    (positions with q exactly 0 contribute 0: there gs = 0). Saves the output y and q, not the input: the next
    layer saves y anyway, so the block's input is freed after the forward pass. An in-place operation on the
    output after the block makes autograd refuse the backward pass; use ``fused=False`` there.
    With ``skip`` the output is ``cat([skip, y], 1)``, written once, and that is what is saved.
    """

    @staticmethod
    def forward(ctx, x: Tensor, skip: Tensor | None, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x3 = x.flatten(2)
        q = _spatial_logits(x3, weight, bias).sigmoid_()
        out, y = output_buffer(x, skip)
        torch.mul(x3, q, out=y.flatten(2))
        ctx.save_for_backward(out, weight, q)
        ctx.skip_channels = None if skip is None else skip.shape[1]
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(q)
        return out, q

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor, _dq: Tensor | None):  # type: ignore[override]
        out, weight, q = ctx.saved_tensors
        _, y = split_output(out, ctx.skip_channels)
        g_skip, dy = split_output(dout, ctx.skip_channels)
        y3, dy3 = y.flatten(2), dy.flatten(2)
        b, c, n = y3.shape
        acc = acc_dtype(y.dtype)
        w3 = weight.to(y.dtype).view(1, c, 1)
        gx3 = torch.empty_like(y3)
        gw = torch.zeros(c, dtype=acc, device=y.device)
        gb = torch.zeros((), dtype=acc, device=y.device)
        for j0, j1 in chunk_spans(n, b * c, y.device):
            yc, dyc, qc = y3[..., j0:j1], dy3[..., j0:j1], q[..., j0:j1]
            gxc = gx3[..., j0:j1]
            gs = torch.mul(dyc, yc, out=gxc).sum(1, keepdim=True)  # r (B, 1, k); gx's buffer as scratch
            gs.mul_(1 - qc)
            torch.mul(dyc, qc, out=gxc)
            gxc.addcmul_(w3, gs)
            live = qc != 0
            t = torch.where(live, gs / torch.where(live, qc, 1), 0)  # gs / q: x * gs = y * t
            gw += torch.matmul(yc, t.transpose(1, 2)).sum(0, dtype=acc).view(c)
            gb += gs.sum(dtype=acc)
        g_bias = gb.to(weight.dtype).view(1) if ctx.has_bias else None
        return unflat(gx3, y.shape), g_skip, gw.to(weight.dtype).view(weight.shape), g_bias


def spatial_attention(
    x: Tensor, weight: Tensor, bias: Tensor | None, skip: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """sSE (Roy et al., MICCAI 2018): ``x * sigmoid(w . x + b)`` with the fused backward.

    Args:
        x: input (B, C, *spatial).
        weight: the C -> 1 pointwise convolution's weights, C elements (any shape, e.g. (1, C, 1, 1)).
        bias: its bias (one element) or None.
        skip: a (B, Cs, *spatial) tensor to put in front of the output: ``y`` is then ``torch.cat([skip, y], 1)``,
            written once. Needs x's dtype and device. Defaults to None.

    Returns:
        ``(y, q)``: the output (shape of x) and the gate q as (B, 1, N) (detached, N = number of positions).
    """
    check_skip("spatial_attention", x, skip)
    w = weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    if not needs_grad(x, skip, weight, bias):
        x3 = x.flatten(2)
        q = _spatial_logits(x3, w, b).sigmoid_()
        out, y = output_buffer(x, skip)
        torch.mul(x3, q, out=y.flatten(2))
        return out, q
    return _SpatialFn.apply(x, skip, w, b)


# ----------------------------------------------------------------------------------------------------------------
# scSE: max(x*c, x*q) | x*c + x*q | x*c*q
# ----------------------------------------------------------------------------------------------------------------


def _scse_output(
    x: Tensor, c3: Tensor, w: Tensor, bias: Tensor | None, mode: str, skip: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(out, q)``: scSE's output (shape of x, or ``cat([skip, y], 1)``) and the spatial gate (B, 1, N)."""
    if skip is None:
        y3, q = _scse_forward(x.flatten(2), c3, w, bias, mode)
        return unflat(y3, x.shape), q
    out, y = output_buffer(x, skip)
    _, q = _scse_forward(x.flatten(2), c3, w, bias, mode, y.flatten(2))
    return out, q


def _scse_forward(
    x3: Tensor, c3: Tensor, w: Tensor, bias: Tensor | None, mode: str, y3: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Blocked forward of scSE on (B, C, N): computes q chunk by chunk and writes y once (into ``y3`` if given)."""
    b, c, n = x3.shape
    bias_t = torch.zeros(1, dtype=x3.dtype, device=x3.device) if bias is None else bias.to(x3.dtype)
    out = compiled_call(_ck_scse_fwd, x3, c3, w.to(x3.dtype), bias_t.view(1, 1, 1), mode)
    if out is not None:
        if y3 is None:
            return out
        return y3.copy_(out[0]), out[1]
    y3 = torch.empty_like(x3) if y3 is None else y3
    q = torch.empty(b, 1, n, dtype=x3.dtype, device=x3.device)
    spans = chunk_spans(n, b * c, x3.device, scratch=x3.device.type == "cpu")
    for j0, j1 in spans:
        xc = x3[..., j0:j1]
        qc = _spatial_logits(xc, w, bias).sigmoid_()
        if len(spans) > 1:
            q[..., j0:j1] = qc
        else:
            q = qc
        yc = y3[..., j0:j1]
        torch.mul(xc, c3, out=yc)
        if mode == "max":  # max(a, b) = b + relu(a - b): no temporary
            yc.addcmul_(xc, qc, value=-1).relu_().addcmul_(xc, qc)
        elif mode == "add":
            yc.addcmul_(xc, qc)
        else:
            yc.mul_(qc)
    return y3, q


class _SCSEFn(torch.autograd.Function):
    """scSE with max / add / mul aggregation of the channel gate c (B, C) and the spatial gate q (B, N).

    Backward (max): with ``h = 1`` where ``x*c > x*q``, ``0`` where smaller, ``1/2`` on ties (torch.maximum's
    rule), ``gA = dy*h``, ``gB = dy - gA``: ``gc = sum_n gA*x``, ``gq = sum_c gB*x``,
    ``gx = gA*c + gB*q + w*gs + gz/N`` with ``gs = gq*q*(1-q)`` and ``gz`` the gate network's gradient.
    One blocked pass over (dy, x) writes gx without the ``gz/N`` term, a second in-place pass adds it.
    With ``skip`` the output is ``cat([skip, y], 1)``, written once (saved instead of y where y is saved).
    """

    @staticmethod
    def forward(ctx, x, skip, mode, gate_fn, weight, bias, *params):  # type: ignore[override]
        x3 = x.flatten(2)
        (zl,), c = run_gate(gate_fn, x3.mean(-1))
        c3 = c.detach().to(x.dtype).unsqueeze(-1)
        out, q = _scse_output(x, c3, weight, bias, mode, skip)
        ctx.saves_output = _max_saves_output(x3, c3, mode)
        ctx.skip_channels = None if skip is None else skip.shape[1]
        ctx.save_for_backward(out if ctx.saves_output else x, weight, q)
        ctx.gate = (zl, c)
        ctx.params = params
        ctx.mode = mode
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(q)
        return out, q

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dq):  # type: ignore[override]
        x, weight, q = ctx.saved_tensors
        if ctx.saves_output:
            _, x = split_output(x, ctx.skip_channels)
        g_skip, dy = split_output(dout, ctx.skip_channels)
        zl, c = ctx.gate
        mode = ctx.mode
        x3, dy3 = x.flatten(2), dy.flatten(2)
        b, ch, n = x3.shape
        c3 = c.detach().to(x.dtype).unsqueeze(-1)
        w3 = weight.to(x.dtype).view(1, ch, 1)
        out = None if ctx.saves_output else compiled_call(_ck_scse_bwd1, x3, dy3, c3, q, mode)
        if out is not None:
            gc, gs, gw, gb = out
            (gz,), gp = gate_backward([c], [gc], [zl], ctx.params)
            gzn = (torch.zeros_like(c3) if gz is None else (gz / n).to(x.dtype).unsqueeze(-1))
            args = (x3, dy3, c3, q, weight.to(x.dtype), gs, gzn, mode)
            gx3 = compiled_call(_ck_scse_bwd2, *args)
            gx3 = _ck_scse_bwd2(*args) if gx3 is None else gx3
            g_bias = gb.to(weight.dtype).view(1) if ctx.has_bias else None
            return (unflat(gx3, x.shape), g_skip, None, None, gw.to(weight.dtype).view(weight.shape), g_bias, *gp)
        if ctx.saves_output:  # x holds the output y
            gx3, gc, gw, gb = _scse_max_backward_output(x3, dy3, c3, q, w3)
        else:
            gx3, gc, gw, gb = _scse_backward_chunks(x3, dy3, c3, q, w3, mode)
        (gz,), gp = gate_backward([c], [gc], [zl], ctx.params)
        if gz is not None:
            gx3.add_((gz / n).to(x.dtype).unsqueeze(-1))
        g_bias = gb.to(weight.dtype).view(1) if ctx.has_bias else None
        return (unflat(gx3, x.shape), g_skip, None, None, gw.to(weight.dtype).view(weight.shape), g_bias, *gp)


def _max_saves_output(x3: Tensor, c3: Tensor, mode: str) -> bool:
    """Whether scSE-max's Function keeps its output instead of its input: with the eager kernels (the default),
    when every channel gate is at least the dtype's smallest normal number. Then ``x = y / c`` where the channel
    branch won and ``x = y / q`` where the spatial one did, so the backward needs only y. A channel gate of 0 (a
    saturated sigmoid) would lose x where that branch won, and sSE's weight gradient needs x at every position:
    such inputs keep x. (On CUDA the check is one (B, C) comparison read by the host.)"""
    if mode != "max" or compiles(_ck_scse_bwd1, x3):
        return False
    return bool((c3 >= torch.finfo(c3.dtype).tiny).all())


def _scse_max_backward_output(y3: Tensor, dy3: Tensor, c3: Tensor, q: Tensor, w3: Tensor):
    """scSE-max backward from the output y (``_SCSEFn`` with ``saves_output``): one full-size buffer, two
    cache-blocked passes.

    ``y = x * g`` with ``g = c`` or ``q`` (both positive), so ``sign(y q - y c) = sign(x q - x c)`` gives the
    branch weight ``1 - h = (1 + sg) / 2`` exactly as from x. Pass 1 writes ``u = (1 - h) y`` into the buffer,
    block by block, and reduces ``dy u`` (a cache-sized scratch) and ``dy y``. With ``x = y / c`` on the channel
    branch and ``y / q`` on the spatial one: ``gc = (sum_n dy y - sum_n dy u) / c``,
    ``gs = gq q (1 - q) = (1 - q) sum_c dy u``, ``gw = sum_b ((y - u) . gs) / c + u . (gs / q)`` (u is 0
    wherever q is). Pass 2 takes those dot products and overwrites each block of u with
    ``gx = dy * lerp(c, q, 1 - h) + w gs``. Blocks of SCRATCH_ELEMENTS keep the element-wise steps in cache.
    """
    b, ch, n = y3.shape
    acc = acc_dtype(y3.dtype)
    u = torch.empty_like(y3)
    spans = chunk_spans(n, b * ch, y3.device, scratch=True)
    dyu = torch.zeros(b, ch, dtype=acc, device=y3.device)
    dyy = torch.zeros(b, ch, dtype=acc, device=y3.device)
    rhs = torch.empty(b, 2, n, dtype=y3.dtype, device=y3.device)  # rows gs and gs / q
    gs = rhs[:, :1]
    for j0, j1 in spans:
        yc, dyc, qc, uc = y3[..., j0:j1], dy3[..., j0:j1], q[..., j0:j1], u[..., j0:j1]
        torch.mul(yc, qc, out=uc).addcmul_(yc, c3, value=-1).sign_().add_(1).mul_(0.5).mul_(yc)
        t = torch.mul(dyc, uc)
        dyu += t.sum(-1, dtype=acc)
        torch.sum(t, 1, keepdim=True, out=gs[..., j0:j1])
        dyy += torch.mul(dyc, yc, out=t).sum(-1, dtype=acc)
    cd = c3.squeeze(-1).to(acc)
    gc = (dyy - dyu) / cd
    gs.addcmul_(gs, q, value=-1)  # (1 - q) sum_c dy u
    torch.div(gs, q, out=rhs[:, 1:]).nan_to_num_(nan=0.0)  # 0 / 0 where q is 0 (u and gs are 0 there)
    yg = torch.zeros(b, ch, dtype=acc, device=y3.device)
    ug = torch.zeros(b, ch, 2, dtype=acc, device=y3.device)
    for j0, j1 in spans:
        yc, dyc, qc, uc, rc = y3[..., j0:j1], dy3[..., j0:j1], q[..., j0:j1], u[..., j0:j1], rhs[..., j0:j1]
        yg += torch.matmul(yc, rc[:, :1].transpose(1, 2)).squeeze(-1)
        ug += torch.matmul(uc, rc.transpose(1, 2))  # u . gs, u . (gs / q)
        torch.mul(yc, qc, out=uc).addcmul_(yc, c3, value=-1).sign_().add_(1).mul_(0.5)
        torch.lerp(c3, qc, uc, out=uc).mul_(dyc).addcmul_(w3, rc[:, :1])
    gw = ((yg - ug[..., 0]) / cd + ug[..., 1]).sum(0)
    return u, gc, gw, gs.sum(dtype=acc)


def _scse_backward_chunks(x3: Tensor, dy3: Tensor, c3: Tensor, q: Tensor, w3: Tensor, mode: str):
    """scSE backward from the input (add, mul, and max where a channel gate is 0) in cache blocks of
    SCRATCH_ELEMENTS; returns gx without the ``gz/N`` term, gc, gw, gb."""
    b, ch, n = x3.shape
    acc = acc_dtype(x3.dtype)
    x = x3
    gx3 = torch.empty_like(x3)
    gc = torch.zeros(b, ch, dtype=acc, device=x.device)
    gw = torch.zeros(ch, dtype=acc, device=x.device)
    gb = torch.zeros((), dtype=acc, device=x.device)
    for j0, j1 in chunk_spans(n, b * ch, x.device, scratch=True):
        xc, dyc, qc = x3[..., j0:j1], dy3[..., j0:j1], q[..., j0:j1]
        gxc = gx3[..., j0:j1]
        if mode == "max":
            # h = (1 + sign(x c - x q)) / 2; ga = dy h; gb = dy - ga. Buffers: ga and gx only.
            ga = torch.mul(xc, c3).addcmul_(xc, qc, value=-1).sign_().add_(1).mul_(0.5).mul_(dyc)
            gc += torch.mul(ga, xc, out=gxc).sum(-1, dtype=acc)
            gs = gxc.neg_().addcmul_(dyc, xc).sum(1, keepdim=True)  # sum_c (dy - ga) x
            torch.mul(ga, c3, out=gxc).addcmul_(dyc, qc).addcmul_(ga, qc, value=-1)
        elif mode == "add":
            t = torch.mul(dyc, xc, out=gxc)
            gc += t.sum(-1, dtype=acc)
            gs = t.sum(1, keepdim=True)
            torch.mul(dyc, c3, out=gxc).addcmul_(dyc, qc)
        else:
            t = torch.mul(dyc, xc)
            gc += torch.mul(t, qc).sum(-1, dtype=acc)
            gs = t.mul_(c3).sum(1, keepdim=True)
            torch.mul(dyc, c3 * qc, out=gxc)
        gs.mul_(qc).mul_(1 - qc)
        gxc.addcmul_(w3, gs)
        gw += torch.matmul(xc, gs.transpose(1, 2)).sum(0, dtype=acc).view(ch)
        gb += gs.sum(dtype=acc)
    return gx3, gc, gw, gb


def scse_attention(
    x: Tensor,
    gate_fn: Callable[[Tensor], Tensor],
    params: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    aggregation: str = "max",
    skip: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """scSE (Roy et al., MICCAI 2018 / IEEE TMI 2019) with the fused forward and backward.

    Args:
        x: input (B, C, *spatial).
        gate_fn: the channel branch: (B, C) spatial mean -> (B, C) gate c (after the sigmoid).
        params: the tensors requiring grad that ``gate_fn`` uses.
        weight: the spatial branch's C -> 1 pointwise convolution weights (C elements).
        bias: its bias (one element) or None.
        aggregation: ``"max"`` (authors' code), ``"add"`` (MICCAI paper) or ``"mul"``. Defaults to ``"max"``.
        skip: a (B, Cs, *spatial) tensor to put in front of the output: ``y`` is then ``torch.cat([skip, y], 1)``,
            written once. Needs x's dtype and device. Defaults to None.

    Returns:
        ``(y, q)``: the output (shape of x) and the spatial gate as (B, 1, N), detached.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"scse_attention: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    check_skip("scse_attention", x, skip)
    w = weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    if not needs_grad(x, skip, weight, bias, *params):
        x3 = x.flatten(2)
        c3 = gate_fn(x3.mean(-1)).to(x.dtype).unsqueeze(-1)
        return _scse_output(x, c3, w, b, aggregation, skip)
    return _SCSEFn.apply(x, skip, aggregation, gate_fn, w, b, *params)
