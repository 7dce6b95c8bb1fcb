"""Fused Coordinate attention (Hou et al., CVPR 2021), 2D and medse's 3D form: ``y = x * a_1 * ... * a_d``,
each directional gate computed from the strip means along its axis. Used by
:class:`~medse.attention.coord.CoordAttention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from medse.attention.kernels.core import acc_dtype, chunk_spans, compiled_call, gate_backward, needs_grad, run_gate

__all__ = ["coord_attention"]


# kernels for the compile backend: pure functions on whole (B, C, N) tensors, fused by torch.compile


def _ck_ca_apply(x: Tensor, a1: Tensor, r: Tensor) -> Tensor:
    return x * a1 * r


def _ck_ca_bwd1(x: Tensor, dy: Tensor, a1: Tensor, r: Tensor):
    t = dy * x
    nd = x.ndim - 2
    rest = tuple(range(3, 2 + nd))
    acc = acc_dtype(x.dtype)
    return (t * r).sum(rest, dtype=acc), (t * a1).sum(2, dtype=acc)


def _ck_ca_bwd2(dy: Tensor, a1: Tensor, r: Tensor, e1: Tensor, e_rest: Tensor) -> Tensor:
    return dy * a1 * r + e1 + e_rest


def _rest_view(t: Tensor, nd: int, axis: int) -> Tensor:
    """(B, C, L) strip for spatial axis ``axis`` (1-based among the rest) -> broadcastable (B, C, 1, ...)."""
    shape = [t.shape[0], t.shape[1]] + [1] * nd
    shape[2 + axis] = t.shape[2]
    return t.reshape(shape)


def _coord_pool(x: Tensor) -> list[Tensor]:
    """Strip means for every spatial axis, (B, C, L_i) each, reading x once (blocked along the first axis)."""
    b, c = x.shape[:2]
    sizes = x.shape[2:]
    nd = len(sizes)
    n = math.prod(sizes)
    rest = n // sizes[0]
    acc = acc_dtype(x.dtype)
    first = torch.empty(b, c, sizes[0], dtype=acc, device=x.device)
    plane = torch.zeros(b, c, *sizes[1:], dtype=acc, device=x.device)
    rest_axes = tuple(range(3, 2 + nd))
    for j0, j1 in chunk_spans(sizes[0], b * c * rest, x.device):
        xc = x[:, :, j0:j1]
        first[:, :, j0:j1] = xc.sum(rest_axes, dtype=acc)
        plane += xc.sum(2, dtype=acc)
    strips = [first / rest]
    for i in range(1, nd):
        other = tuple(2 + j for j in range(nd - 1) if j != i - 1)
        s = plane.sum(other) if other else plane
        strips.append(s / (n // sizes[i]))
    return [s.to(x.dtype) for s in strips]


def _coord_rest_product(gates: Sequence[Tensor], nd: int) -> Tensor:
    """Product of the gates of axes 2..nd as a (B, C, 1, S2, ..., Snd) tensor (small: N / S1 per (B, C))."""
    r = _rest_view(gates[1], nd, 1)
    for i in range(2, nd):
        r = r * _rest_view(gates[i], nd, i)
    return r


class _CoordFn(torch.autograd.Function):
    """Coordinate attention on the strips: ``y = x * a_1 * R`` with R the product of the other axes' gates.

    Backward: ``T = dy * x``; ``g a_1[s1] = sum_rest T * R``; ``g R = sum_{s1} T * a_1`` from which each other
    axis' gate gradient is a reduction of ``g R`` times the remaining gates; the strip network (conv, BN, h_swish,
    convs, sigmoids) maps gate gradients to strip gradients ``g_i``; ``gx = dy * a_1 * R + sum_i g_i / (N / S_i)``
    broadcast along the other axes. Pass 1 (blocked along the first axis) reads dy and x and writes
    ``dy * a_1 * R``; pass 2 adds the strip terms in place. Saves x only (plus the small strip graph).
    """

    @staticmethod
    def forward(ctx, x, strip_fn, *params):  # type: ignore[override]
        nd = x.ndim - 2
        leaves, gates = run_gate(strip_fn, *_coord_pool(x))
        gd = [g.detach().to(x.dtype) for g in gates]
        y = _coord_apply(x, gd)
        ctx.save_for_backward(x)
        ctx.gate = (leaves, gates)
        ctx.params = params
        ctx.nd = nd
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        leaves, gates = ctx.gate
        nd = ctx.nd
        b, c = x.shape[:2]
        sizes = x.shape[2:]
        n = math.prod(sizes)
        acc = acc_dtype(x.dtype)
        gd = [g.detach().to(x.dtype) for g in gates]
        r = _coord_rest_product(gd, nd)
        a1 = gd[0]
        rest_axes = tuple(range(3, 2 + nd))
        spans = chunk_spans(sizes[0], b * c * (n // sizes[0]), x.device)
        out = compiled_call(_ck_ca_bwd1, x, dy, _rest_view(a1, nd, 0), r)
        gx = None
        m = n // sizes[0]
        gemm = out is None and len(spans) == 1 and x.is_contiguous()
        if out is not None:
            g_first, g_r = out
            spans = []
        elif gemm:
            # whole tensor: the gradient's buffer holds T = dy * x; both weighted reductions of T are batched
            # matrix products (T @ R and a_1^T @ T), which read T once and allocate nothing full-size
            gx = torch.empty_like(x, memory_format=torch.contiguous_format)
            t3 = torch.mul(dy, x, out=gx).view(b * c, sizes[0], m)
            g_first = torch.bmm(t3, r.reshape(b * c, m, 1)).view(b, c, sizes[0])
            g_r = torch.bmm(a1.reshape(b * c, 1, sizes[0]), t3).view(b, c, *sizes[1:])
            torch.mul(dy, _rest_view(a1, nd, 0), out=gx).mul_(r)
            spans = []
        else:
            gx = torch.empty_like(x)
            g_first = torch.empty(b, c, sizes[0], dtype=acc, device=x.device)
            g_r = torch.zeros(b, c, *sizes[1:], dtype=acc, device=x.device)
        for j0, j1 in spans:
            xc, dyc = x[:, :, j0:j1], dy[:, :, j0:j1]
            a1c = _rest_view(a1[:, :, j0:j1], nd, 0)
            t = torch.mul(dyc, xc)
            g_first[:, :, j0:j1] = torch.mul(t, r).sum(rest_axes, dtype=acc)
            g_r += t.mul_(a1c).sum(2, dtype=acc)
            gxc = gx[:, :, j0:j1]
            torch.mul(dyc, a1c, out=gxc)
            gxc.mul_(r)
        g_gates = [g_first]
        for i in range(1, nd):
            prod = g_r
            for k in range(1, nd):
                if k != i:
                    prod = prod * _rest_view(gd[k], nd, k)[:, :, 0]
            other = tuple(2 + j for j in range(nd - 1) if j != i - 1)
            g_gates.append(prod.sum(other) if other else prod)
        g_strips, gp = gate_backward(gates, g_gates, leaves, ctx.params)
        terms = [
            (torch.zeros_like(s) if g is None else g / (n // sizes[i])).to(x.dtype)
            for i, (g, s) in enumerate(zip(g_strips, leaves, strict=True))
        ]
        e_rest = _rest_view(terms[1], nd, 1)
        for i in range(2, nd):
            e_rest = e_rest + _rest_view(terms[i], nd, i)
        if gemm:  # gx += e_1 (along axis 1) + e_rest (along the others): one rank-2 update
            lhs = torch.stack([terms[0], torch.ones_like(terms[0])], dim=-1).reshape(b * c, sizes[0], 2)
            rhs = torch.stack([torch.ones_like(e_rest), e_rest], dim=2).reshape(b * c, 2, m)
            gx.view(b * c, sizes[0], m).baddbmm_(lhs, rhs)
        elif gx is None:
            args = (dy, _rest_view(a1, nd, 0), r, _rest_view(terms[0], nd, 0), e_rest)
            gx = compiled_call(_ck_ca_bwd2, *args)
            gx = _ck_ca_bwd2(*args) if gx is None else gx
        for j0, j1 in spans:
            gxc = gx[:, :, j0:j1]
            gxc.add_(_rest_view(terms[0][:, :, j0:j1], nd, 0)).add_(e_rest)
        return (gx, None, *gp)


def _coord_apply(x: Tensor, gates: Sequence[Tensor]) -> Tensor:
    nd = x.ndim - 2
    b, c = x.shape[:2]
    sizes = x.shape[2:]
    r = _coord_rest_product(gates, nd)
    a1 = _rest_view(gates[0], nd, 0)
    out = compiled_call(_ck_ca_apply, x, a1, r)
    if out is not None:
        return out
    y = torch.empty_like(x)
    for j0, j1 in chunk_spans(sizes[0], b * c * (math.prod(sizes) // sizes[0]), x.device):
        yc = y[:, :, j0:j1]
        torch.mul(x[:, :, j0:j1], _rest_view(gates[0][:, :, j0:j1], nd, 0), out=yc)
        yc.mul_(r)
    return y


def coord_attention(x: Tensor, strip_fn: Callable[..., list[Tensor]], params: Sequence[Tensor]) -> Tensor:
    """Coordinate attention (Hou et al., CVPR 2021) with the fused forward and backward, 2D or 3D.

    NOTE: not in paper: the 3D form (one strip and one gate per axis D, H, W).

    Args:
        x: input (B, C, S_1, ..., S_d), d >= 2.
        strip_fn: maps the d strips (B, C, S_i) (mean of x over the other spatial axes) to the d gates
            (B, C, S_i) (after the sigmoids).
        params: the tensors requiring grad that ``strip_fn`` uses.

    Returns:
        ``x * a_1 * ... * a_d`` (each gate broadcast along its axis), shape of x.
    """
    if x.ndim < 4:
        raise ValueError(f"coord_attention: expected (B, C, S1, S2[, S3]), got shape {tuple(x.shape)}.")
    if not needs_grad(x, *params):
        gates = strip_fn(*_coord_pool(x))
        return _coord_apply(x, [g.to(x.dtype) for g in gates])
    return _CoordFn.apply(x, strip_fn, *params)
