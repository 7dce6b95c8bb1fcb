"""Fused SimAM (Yang et al., ICML 2021): ``y = x * sigmoid(e)``, no parameters. Used by
:class:`~medse.attention.simam.SimAM` for float32/float64 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from medse.attention.kernels.core import chunk_spans, compiled_call, needs_grad, unflat

__all__ = ["simam_attention"]


# kernels for the compile backend: pure functions on whole (B, C, N) tensors, fused by torch.compile


def _ck_simam_fwd(x: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = max(x.shape[-1] - 1, 1)
    mu = x.mean(-1, keepdim=True)
    d = (x - mu) ** 2
    den = 4 * (d.sum(-1, keepdim=True) / n + lam)
    return x * torch.sigmoid(d / den + 0.5), mu, den


def _ck_simam_bwd(x: Tensor, dy: Tensor, mu: Tensor, den: Tensor) -> Tensor:
    n_pos = x.shape[-1]
    n = max(n_pos - 1, 1)
    u = x - mu
    s = torch.sigmoid(u * u / den + 0.5)
    ge = dy * x * s * (1 - s)
    r1 = (ge * u).sum(-1, keepdim=True)
    rd = (ge * u * u).sum(-1, keepdim=True)
    alpha = 8 * (-rd / (den * den)) / n
    return dy * s + 2 * u * ge / den + alpha * u - 2 * r1 / (n_pos * den)


def _simam_stats(x3: Tensor, e_lambda: float) -> tuple[Tensor, Tensor, int]:
    """Per-(B, C) mean and energy denominator ``4 * (sum((x - mean)^2) / n + lambda)``, n = max(N - 1, 1)."""
    b, c, n_pos = x3.shape
    mu = x3.mean(-1, keepdim=True)
    dsum = torch.zeros(b, c, 1, dtype=x3.dtype, device=x3.device)
    for j0, j1 in chunk_spans(n_pos, b * c, x3.device):
        u = x3[..., j0:j1] - mu
        dsum += u.mul_(u).sum(-1, keepdim=True)
    n = max(n_pos - 1, 1)
    den = 4 * (dsum / n + e_lambda)
    return mu, den, n


def _simam_forward(x3: Tensor, mu: Tensor, den: Tensor) -> Tensor:
    b, c, n = x3.shape
    y3 = torch.empty_like(x3)
    for j0, j1 in chunk_spans(n, b * c, x3.device):
        xc = x3[..., j0:j1]
        u = xc - mu
        s = u.mul_(u).div_(den).add_(0.5).sigmoid_()
        torch.mul(xc, s, out=y3[..., j0:j1])
    return y3


def _simam_eager(x3: Tensor, e_lambda: float) -> tuple[Tensor, Tensor, Tensor, int]:
    """SimAM forward with eager operators: ``(y, mu, den, n)``. Whole tensors: the output's buffer is the only
    full-size allocation (it holds x - mu, whose norm gives sum d, then the gate, then y)."""
    b, c, n_pos = x3.shape
    if len(chunk_spans(n_pos, b * c, x3.device)) > 1:
        mu, den, n = _simam_stats(x3, e_lambda)
        return _simam_forward(x3, mu, den), mu, den, n
    mu = x3.mean(-1, keepdim=True)
    y3 = torch.sub(x3, mu)
    dsum = torch.linalg.vector_norm(y3, dim=-1, keepdim=True).square_()
    n = max(n_pos - 1, 1)
    den = 4 * (dsum / n + e_lambda)
    y3.square_().div_(den).add_(0.5).sigmoid_().mul_(x3)
    return y3, mu, den, n


def _simam_backward_whole(x3: Tensor, dy3: Tensor, mu: Tensor, den: Tensor, n: int) -> Tensor:
    """SimAM's input gradient on whole (B, C, N) tensors with two full-size allocations (the gradient and one
    scratch buffer; on CPU a fresh buffer's page faults cost several in-place passes).

    ``t = u`` (scratch), ``g = u^2`` -> ``s`` (the gradient's buffer), ``t <- u x dy s (1 - s) = ge u`` in place;
    ``sum ge u^2 = sum(t x) - mu sum(t)`` (a batched dot product, no temporary); then
    ``g <- dy s + 2 t / den + alpha x + beta`` in place.
    """
    b, c, n_pos = x3.shape
    t = torch.sub(x3, mu)
    g = torch.mul(t, t).div_(den).add_(0.5).sigmoid_()  # s, in the gradient's buffer
    t.mul_(x3).mul_(dy3).mul_(g)
    t.addcmul_(t, g, value=-1)  # ge * u = dy x s (1 - s) (x - mu)
    r1 = t.sum(-1, keepdim=True)
    txs = torch.matmul(t.reshape(b * c, 1, n_pos), x3.reshape(b * c, n_pos, 1)).view(b, c, 1)
    rd = txs - mu * r1  # sum ge * u^2
    g_den = -rd / (den * den)
    alpha = 2 * (4 * g_den / n)
    beta = -alpha * mu - 2 * r1 / (n_pos * den)
    g.mul_(dy3).addcmul_(t, 2 / den).addcmul_(x3, alpha).add_(beta)
    return g


class _SimAMFn(torch.autograd.Function):
    """SimAM, y = x * sigmoid(e), e = d / den + 1/2, d = (x - mu)^2, den = 4 (sum d / n + lambda).

    Backward (per (B, C); s = sigmoid(e), u = x - mu):
    ``ge = dy * x * s * (1 - s)`` (gradient wrt e), ``g_den = -sum(ge * d) / den^2``,
    ``g_d = ge / den + 4 g_den / n`` (d feeds e directly and through sum d),
    ``gu = 2 u g_d``, ``gx = dy * s + gu - mean(gu)`` with ``mean(gu) = 2 sum(ge * u) / (N den)``
    (the ``sum(u)`` term is zero). Pass 1 (in cache blocks of SCRATCH_ELEMENTS, reads dy and x) writes
    ``dy*s + 2 u ge / den`` and the two sums; pass 2 adds the affine-in-x rest ``alpha * x + beta``: the gradient
    is the only full-size allocation. An input of one block takes the whole-tensor version. Saves only x and two
    (B, C) vectors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, e_lambda: float) -> Tensor:  # type: ignore[override]
        x3 = x.flatten(2)
        out = compiled_call(_ck_simam_fwd, x3, torch.tensor(e_lambda, dtype=x.dtype, device=x.device))
        if out is not None:
            y3, mu, den = out
            n = max(x3.shape[-1] - 1, 1)
        else:
            y3, mu, den, n = _simam_eager(x3, e_lambda)
        ctx.save_for_backward(x, mu, den)
        ctx.n = n
        return unflat(y3, x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, mu, den = ctx.saved_tensors
        x3, dy3 = x.flatten(2), dy.flatten(2)
        b, c, n_pos = x3.shape
        gx3 = compiled_call(_ck_simam_bwd, x3, dy3, mu, den)
        if gx3 is not None:
            return unflat(gx3, x.shape), None
        spans = chunk_spans(n_pos, b * c, x.device, scratch=True)
        if len(spans) == 1:
            gx3 = _simam_backward_whole(x3, dy3, mu, den, ctx.n)
            return unflat(gx3, x.shape), None
        two_over_den = 2 / den
        gx3 = torch.empty_like(x3)
        r1 = torch.zeros(b, c, 1, dtype=x.dtype, device=x.device)  # sum ge * u
        rd = torch.zeros(b, c, 1, dtype=x.dtype, device=x.device)  # sum ge * u^2
        for j0, j1 in spans:
            xc, dyc = x3[..., j0:j1], dy3[..., j0:j1]
            u = xc - mu
            s = torch.mul(u, u).div_(den).add_(0.5).sigmoid_()
            gxc = gx3[..., j0:j1]
            torch.mul(dyc, s, out=gxc)
            ge = s.addcmul_(s, s, value=-1).mul_(dyc).mul_(xc)  # dy * x * s * (1 - s), in s's buffer
            geu = ge.mul_(u)
            r1 += geu.sum(-1, keepdim=True)
            gxc.addcmul_(geu, two_over_den)
            rd += geu.mul_(u).sum(-1, keepdim=True)
        g_den = -rd / (den * den)
        alpha = 2 * (4 * g_den / ctx.n)  # gu's term from sum d: 2 u * 4 g_den / n
        beta = -alpha * mu - 2 * r1 / (n_pos * den)
        for j0, j1 in spans:
            gxc = gx3[..., j0:j1]
            gxc.addcmul_(x3[..., j0:j1], alpha).add_(beta)
        return unflat(gx3, x.shape), None


def simam_attention(x: Tensor, e_lambda: float = 1e-4) -> Tensor:
    """SimAM (Yang et al., ICML 2021) with the fused forward and backward; float32/float64 inputs.

    ``n = max(N - 1, 1)`` as medse's :class:`~medse.attention.simam.SimAM` (no NaN for a single position).

    Args:
        x: input (B, C, *spatial), float32 or float64.
        e_lambda: the regulariser lambda. Defaults to 1e-4.

    Returns:
        ``x * sigmoid(e)``, shape of x.
    """
    if not needs_grad(x):
        x3 = x.flatten(2)
        out = compiled_call(_ck_simam_fwd, x3, torch.tensor(e_lambda, dtype=x.dtype, device=x.device))
        if out is not None:
            return unflat(out[0], x.shape)
        return unflat(_simam_eager(x3, e_lambda)[0], x.shape)
    return _SimAMFn.apply(x, float(e_lambda))
