"""Fused channel gate of SE (Hu et al., CVPR 2018), cSE (Roy et al., MICCAI 2018) and ECA (Wang et al., CVPR
2020): ``y = x * c``, ``c = gate_fn(mean(x))`` per (B, C).

Used by :class:`~medse.attention._base.ChannelGateBlock` (``se``, ``cse``, ``eca``) and by the channel branch of
:class:`~medse.attention.scse.SCSE` through :func:`~medse.attention.kernels.spatial.scse_attention`.
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
    dot_spatial,
    gate_backward,
    needs_grad,
    output_buffer,
    run_gate,
    split_output,
    unflat,
)

__all__ = ["channel_attention"]


class _ChannelFn(torch.autograd.Function):
    """y = x * c, c = gate_fn(mean_n x) per (B, C).

    Backward: ``gc = sum_n dy * x = (sum_n dy * y) / c``; the gate network maps gc to ``gz`` (and its parameter
    gradients); ``gx = dy * c + gz / N`` in one pass (the mean's gradient is folded into the same write).

    The Function saves its output y, not its input: the next layer (a convolution) saves y anyway, so the
    block's input can be freed after the forward pass and the block adds no activation to the training peak.
    Where a gate is exactly 0 (a saturated sigmoid), ``gc`` is taken as 0: a gate that saturates has zero
    derivative, so the gate network's gradient is unchanged. An in-place operation on the block's output after
    it (``nn.ReLU(inplace=True)``) makes autograd refuse the backward pass; use ``fused=False`` there.
    With ``skip`` the output is ``cat([skip, y], 1)``, written once, and that is what is saved.
    """

    @staticmethod
    def forward(ctx, x: Tensor, skip: Tensor | None, gate_fn: Callable[[Tensor], Tensor], *params: Tensor) -> Tensor:  # type: ignore[override]
        x3 = x.flatten(2)
        (zl,), c = run_gate(gate_fn, x3.mean(-1))
        out, y = output_buffer(x, skip)
        torch.mul(x3, c.detach().to(x.dtype).unsqueeze(-1), out=y.flatten(2))
        ctx.save_for_backward(out)
        ctx.skip_channels = None if skip is None else skip.shape[1]
        ctx.gate = (zl, c)
        ctx.params = params
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        _, y = split_output(out, ctx.skip_channels)
        g_skip, dy = split_output(dout, ctx.skip_channels)
        zl, c = ctx.gate
        y3, dy3 = y.flatten(2), dy.flatten(2)
        b, ch, n = y3.shape
        single = len(chunk_spans(n, b * ch, y.device)) == 1
        if single:  # the gradient's buffer doubles as the scratch of dy * y: one full-size allocation
            gx3 = torch.mul(dy3, y3)
            gyc = gx3.sum(-1, dtype=acc_dtype(y.dtype))
        else:
            gyc = dot_spatial(dy3, y3)
        cd = c.detach().to(gyc.dtype)
        gc = torch.where(cd != 0, gyc / torch.where(cd != 0, cd, 1), 0)  # sum_n dy * x
        (gz,), gp = gate_backward([c], [gc], [zl], ctx.params)
        gz = torch.zeros_like(zl) if gz is None else gz
        gzn, c3 = (gz / n).to(y.dtype).unsqueeze(-1), c.detach().to(y.dtype).unsqueeze(-1)
        gx3 = torch.addcmul(gzn, dy3, c3, out=gx3) if single else torch.addcmul(gzn, dy3, c3)
        return (unflat(gx3, y.shape), g_skip, None, *gp)


def channel_attention(
    x: Tensor, gate_fn: Callable[[Tensor], Tensor], params: Sequence[Tensor], skip: Tensor | None = None
) -> Tensor:
    """``x * gate_fn(mean(x))`` with the fused backward (SE, Hu et al. CVPR 2018; cSE, Roy et al. MICCAI 2018).

    Args:
        x: input (B, C, *spatial).
        gate_fn: maps the (B, C) spatial mean to the (B, C) gate (after the sigmoid).
        params: every tensor requiring grad that ``gate_fn`` uses (its parameters); their gradients are
            computed by autograd through ``gate_fn``.
        skip: a (B, Cs, *spatial) tensor to put in front of the result: the return value is then
            ``torch.cat([skip, y], 1)``, written once (:func:`~medse.attention.kernels.core.output_buffer`).
            Needs x's dtype and device. Defaults to None.

    Returns:
        The recalibrated tensor, shape of x, or its concatenation after ``skip``.
    """
    check_skip("channel_attention", x, skip)
    if not needs_grad(x, skip, *params):
        x3 = x.flatten(2)
        c = gate_fn(x3.mean(-1))
        out, y = output_buffer(x, skip)
        torch.mul(x3, c.to(x.dtype).unsqueeze(-1), out=y.flatten(2))
        return out
    return _ChannelFn.apply(x, skip, gate_fn, *params)
