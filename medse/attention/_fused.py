"""Fused fast paths for the memory-bound attention blocks: fewer passes over the activation, same numbers.

Attention blocks add almost no FLOPs but read and write the activation tensor many times: a textbook scSE makes
about six passes forward (mean, 1x1 conv, ``x*c``, ``x*q``, maximum) and a dozen backward, each allocating a fresh
full-size tensor (on a CPU a fresh 67 MB tensor costs more in page faults than the arithmetic on it). The functions
here compute the same outputs and gradients as the plain ``forward`` of the blocks with

- one custom :class:`torch.autograd.Function` per block, whose backward pass is derived by hand (formulas in
  each Function's docstring), saves only the input (plus per-(B, C) or per-(B, position) vectors, never another
  full-size tensor) and recomputes what it needs (which branch of the maximum won, the SimAM gate) instead of
  storing it;
- eager kernels (the default backend) written so that the output, or the input gradient, is the only full-size
  allocation wherever PyTorch's operators allow it: in-place chains, ``out=`` into the result's buffer, batched
  matrix products for weighted reductions (they read their operands once and allocate nothing full-size);
- an optional ``torch.compile`` backend (:func:`set_backend`) for the element-wise kernels of scSE, SimAM and CA,
  which fuses each pass into one loop, with dynamic shapes so that new sizes do not recompile;
- optional cache blocking on CPU (:data:`CHUNK_ELEMENTS`, off by default).

Plain vs fused on the 3D benchmark tensor (2, 32, 64, 64, 64), forward+backward as a multiple of ``x * 1.0``
(``benchmarks/results/blocks_cpu_run2.md``, 2-core CPU): scSE-max 9.9 -> 3.3 (eager) / 1.7 (compile),
SimAM 8.7 -> 3.2 / 1.6, CA 6.3 -> 1.8 / 1.6, cSE 2.2 -> 1.4. See ``docs/performance.md``.

Contract with the blocks (``medse/attention/_base.py``): each block name (``cse``, ``sse``, ``scse``, ``eca``,
``ca``, ``simam``) is a function ``fn(module, x) -> Tensor`` here, computing what the block's plain ``forward``
computes with the module's own parameters (``last_gate`` included when ``record_gate`` is set), or returning
``NotImplemented`` to fall back to the plain code. The functional forms (:func:`channel_attention`,
:func:`spatial_attention`, :func:`scse_attention`, :func:`simam_attention`, :func:`coord_attention`) take the
gate sub-networks as callables so they can be reused by other blocks.

Double backward (gradients of gradients) is not supported by the fused paths (``once_differentiable``); use
``fused=False`` for that. NOTE: not in any paper: these are implementation details with identical numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CHUNK_ELEMENTS",
    "COMPILE_MIN_ELEMENTS",
    "MIN_ELEMENTS",
    "get_backend",
    "set_backend",
    "ca",
    "channel_attention",
    "coord_attention",
    "cse",
    "eca",
    "scse",
    "scse_attention",
    "simam",
    "simam_attention",
    "spatial_attention",
    "sse",
]

#: Elements per cache block on CPU (summed over batch and channels); 0 or negative: no blocking (whole tensors).
#: Blocking keeps temporaries in cache but runs many small parallel operators, each of which waits for every
#: OpenMP thread: on a loaded machine (more runnable jobs than cores) that wait dominates (scSE-max 3D with 256k
#: element blocks: 30x the floor, whole tensors 5.8x, same load). Defaults to 0, overridable with
#: the environment variable ``MEDSE_FUSED_CHUNK`` (e.g. 262144 = 1 MiB of float32 per chunk tensor).
CHUNK_ELEMENTS: int = int(os.environ.get("MEDSE_FUSED_CHUNK", "0"))

_AGGREGATIONS = ("max", "add", "mul")
_BACKENDS = ("eager", "compile")
_backend: str = os.environ.get("MEDSE_FUSED_BACKEND", "eager")
_compiled: dict[str, Callable] = {}
_compile_failed: bool = False


def set_backend(name: str) -> None:
    """Choose how the element-wise kernels of scSE, SimAM and CA run: ``"eager"`` (PyTorch operators, no
    compilation) or ``"compile"`` (``torch.compile(dynamic=True)``: one fused loop per pass, compiled once per
    kernel, dtype and device, cached on disk by PyTorch; no recompilation for new shapes). Defaults to
    ``"eager"``, or the environment variable ``MEDSE_FUSED_BACKEND``. If compilation fails (no C++ compiler),
    medse warns once and stays on ``"eager"``.
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {_BACKENDS}, got {name!r}.")
    _backend = name


def get_backend() -> str:
    """The backend in use, ``"eager"`` or ``"compile"``; see :func:`set_backend`."""
    return _backend


def _kernel(fn: Callable) -> Callable | None:
    """The compiled twin of ``fn`` when the compile backend is on (and works), else None."""
    if _backend != "compile" or _compile_failed:
        return None
    k = _compiled.get(fn.__name__)
    if k is None:
        k = _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
    return k


#: Smallest input (elements) that the compile backend compiles for; smaller ones run the eager kernels. Small
#: tensors gain little from fusion, pay the compiled function's guard checks, and their many distinct shapes
#: (one per network level) trigger recompilations for size-dependent kernel choices (dynamo stops at its
#: recompile limit of 8 per function). Defaults to 1048576 (``MEDSE_FUSED_COMPILE_MIN``).
COMPILE_MIN_ELEMENTS: int = int(os.environ.get("MEDSE_FUSED_COMPILE_MIN", str(1 << 20)))


def _call(fn: Callable, *args):
    """Run ``fn`` compiled when the compile backend is on, falling back to eager if compilation fails."""
    global _compile_failed
    if args[0].numel() < COMPILE_MIN_ELEMENTS:
        return None
    k = _kernel(fn)
    if k is not None:
        try:
            return k(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: warn once, run eagerly
            import warnings

            _compile_failed = True
            warnings.warn(f"medse fused attention: torch.compile failed ({type(e).__name__}: {e}); using eager "
                          "kernels.", RuntimeWarning, stacklevel=3)
    return None


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _spans(n: int, rows: int, device: torch.device) -> list[tuple[int, int]]:
    """Chunks ``[j0, j1)`` of an axis of length ``n`` whose slices hold about CHUNK_ELEMENTS elements."""
    if device.type != "cpu" or CHUNK_ELEMENTS <= 0:
        return [(0, n)]
    k = max(1, min(n, CHUNK_ELEMENTS // max(rows, 1)))
    return [(j, min(n, j + k)) for j in range(0, n, k)]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the reductions: float32 for half types, else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def _unflat(t3: Tensor, shape: torch.Size) -> Tensor:
    try:
        return t3.view(shape)
    except RuntimeError:
        return t3.reshape(shape)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run_gate(gate_fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[list[Tensor], Tensor | list[Tensor]]:
    """Run a small gate network on detached leaves with autograd on, so its backward can be run later.

    The gate networks are tiny (they act on (B, C) or (B, C, L) descriptors); keeping their graph instead of
    recomputing it in backward also keeps BatchNorm running statistics updated exactly once.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = gate_fn(*leaves)
    return leaves, out


def _gate_backward(
    outputs: Sequence[Tensor], grads: Sequence[Tensor], leaves: Sequence[Tensor], params: Sequence[Tensor]
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Gradients of the gate network wrt its descriptor inputs (``leaves``) and its parameters."""
    live = [p for p in params if p.requires_grad]
    got = torch.autograd.grad(
        list(outputs),
        list(leaves) + live,
        [g.to(o.dtype) for g, o in zip(grads, outputs, strict=True)],
        allow_unused=True,
        retain_graph=True,  # the outer graph may be run again (retain_graph=True, gradcheck)
    )
    g_leaves = list(got[: len(leaves)])
    it = iter(got[len(leaves) :])
    g_params = [next(it) if p.requires_grad else None for p in params]
    return g_leaves, g_params


def _dot_spatial(a3: Tensor, b3: Tensor) -> Tensor:
    """``sum_n a*b`` over the last axis of two (B, C, N) tensors, cache-blocked; accumulates in float32+."""
    b, c, n = a3.shape
    acc = _acc_dtype(a3.dtype)
    out = torch.zeros(b, c, dtype=acc, device=a3.device)
    for j0, j1 in _spans(n, b * c, a3.device):
        out += torch.mul(a3[..., j0:j1], b3[..., j0:j1]).sum(-1, dtype=acc)
    return out


# ----------------------------------------------------------------------------------------------------------------
# kernels for the compile backend: pure functions on whole (B, C, N) tensors, fused by torch.compile
# ----------------------------------------------------------------------------------------------------------------


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
    gc = (ga * x).sum(-1, dtype=_acc_dtype(x.dtype))
    gq = (gb * x).sum(1, keepdim=True)
    gs = gq * q * (1 - q)
    gw = (x * gs).sum((0, 2), dtype=_acc_dtype(x.dtype))
    return gc, gs, gw, gs.sum(dtype=_acc_dtype(x.dtype))


def _ck_scse_bwd2(x: Tensor, dy: Tensor, c3: Tensor, q: Tensor, w: Tensor, gs: Tensor, gzn: Tensor, mode: str):
    ga, gb = _scse_grad_split(x, dy, c3, q, mode)
    if mode == "mul":
        return ga * c3 + w.view(1, -1, 1) * gs + gzn
    return ga * c3 + gb * q + w.view(1, -1, 1) * gs + gzn


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


def _ck_ca_apply(x: Tensor, a1: Tensor, r: Tensor) -> Tensor:
    return x * a1 * r


def _ck_ca_bwd1(x: Tensor, dy: Tensor, a1: Tensor, r: Tensor):
    t = dy * x
    nd = x.ndim - 2
    rest = tuple(range(3, 2 + nd))
    acc = _acc_dtype(x.dtype)
    return (t * r).sum(rest, dtype=acc), (t * a1).sum(2, dtype=acc)


def _ck_ca_bwd2(dy: Tensor, a1: Tensor, r: Tensor, e1: Tensor, e_rest: Tensor) -> Tensor:
    return dy * a1 * r + e1 + e_rest


# ----------------------------------------------------------------------------------------------------------------
# channel gate: SE, cSE, ECA   y = x * c,  c = gate_fn(mean(x))
# ----------------------------------------------------------------------------------------------------------------


class _ChannelFn(torch.autograd.Function):
    """y = x * c, c = gate_fn(mean_n x) per (B, C).

    Backward: ``gc = sum_n dy * x``; the gate network maps gc to ``gz`` (and its parameter gradients);
    ``gx = dy * c + gz / N`` in one pass (the mean's gradient is folded into the same write).
    """

    @staticmethod
    def forward(ctx, x: Tensor, gate_fn: Callable[[Tensor], Tensor], *params: Tensor) -> Tensor:  # type: ignore[override]
        x3 = x.flatten(2)
        (zl,), c = _run_gate(gate_fn, x3.mean(-1))
        y3 = x3 * c.detach().to(x.dtype).unsqueeze(-1)
        ctx.save_for_backward(x)
        ctx.gate = (zl, c)
        ctx.params = params
        return _unflat(y3, x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        zl, c = ctx.gate
        x3, dy3 = x.flatten(2), dy.flatten(2)
        b, ch, n = x3.shape
        single = len(_spans(n, b * ch, x.device)) == 1
        if single:  # the gradient's buffer doubles as the scratch of dy * x: one full-size allocation
            gx3 = torch.mul(dy3, x3)
            gc = gx3.sum(-1, dtype=_acc_dtype(x.dtype))
        else:
            gc = _dot_spatial(dy3, x3)
        (gz,), gp = _gate_backward([c], [gc], [zl], ctx.params)
        gz = torch.zeros_like(zl) if gz is None else gz
        gzn, c3 = (gz / n).to(x.dtype).unsqueeze(-1), c.detach().to(x.dtype).unsqueeze(-1)
        gx3 = torch.addcmul(gzn, dy3, c3, out=gx3) if single else torch.addcmul(gzn, dy3, c3)
        return (_unflat(gx3, x.shape), None, *gp)


def channel_attention(x: Tensor, gate_fn: Callable[[Tensor], Tensor], params: Sequence[Tensor]) -> Tensor:
    """``x * gate_fn(mean(x))`` with the fused backward (SE, Hu et al. CVPR 2018; cSE, Roy et al. MICCAI 2018).

    Args:
        x: input (B, C, *spatial).
        gate_fn: maps the (B, C) spatial mean to the (B, C) gate (after the sigmoid).
        params: every tensor requiring grad that ``gate_fn`` uses (its parameters); their gradients are
            computed by autograd through ``gate_fn``.

    Returns:
        The recalibrated tensor, shape of x.
    """
    if not _needs_grad(x, *params):
        x3 = x.flatten(2)
        c = gate_fn(x3.mean(-1))
        return _unflat(x3 * c.to(x.dtype).unsqueeze(-1), x.shape)
    return _ChannelFn.apply(x, gate_fn, *params)


# ----------------------------------------------------------------------------------------------------------------
# spatial gate: sSE   y = x * q,  q = sigmoid(w . x + b) per (B, position)
# ----------------------------------------------------------------------------------------------------------------


def _spatial_logits(x3: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``w . x + b`` over channels: (B, C, N) -> (B, 1, N), one read of x (a batched matrix product)."""
    s = torch.matmul(w.to(x3.dtype).view(1, 1, -1), x3)
    if bias is not None:
        s = s.add_(bias.to(x3.dtype).view(1, 1, 1))
    return s


class _SpatialFn(torch.autograd.Function):
    """y = x * q, q = sigmoid(w . x + b).

    Backward, one blocked pass over (dy, x): ``gq = sum_c dy * x``, ``gs = gq * q * (1 - q)``,
    ``gx = dy * q + w * gs``, ``gw = sum_{b,n} x * gs``, ``gb = sum gs``. Saves x and q (as the plain code).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x3 = x.flatten(2)
        q = _spatial_logits(x3, weight, bias).sigmoid_()
        y3 = x3 * q
        ctx.save_for_backward(x, weight, q)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(q)
        return _unflat(y3, x.shape), q

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dq: Tensor | None):  # type: ignore[override]
        x, weight, q = ctx.saved_tensors
        x3, dy3 = x.flatten(2), dy.flatten(2)
        b, c, n = x3.shape
        acc = _acc_dtype(x.dtype)
        w3 = weight.to(x.dtype).view(1, c, 1)
        gx3 = torch.empty_like(x3)
        gw = torch.zeros(c, dtype=acc, device=x.device)
        gb = torch.zeros((), dtype=acc, device=x.device)
        for j0, j1 in _spans(n, b * c, x.device):
            xc, dyc, qc = x3[..., j0:j1], dy3[..., j0:j1], q[..., j0:j1]
            gxc = gx3[..., j0:j1]
            gs = torch.mul(dyc, xc, out=gxc).sum(1, keepdim=True)  # gq (B, 1, k); gx's buffer as scratch
            gs.mul_(qc).mul_(1 - qc)
            torch.mul(dyc, qc, out=gxc)
            gxc.addcmul_(w3, gs)
            gw += torch.matmul(xc, gs.transpose(1, 2)).sum(0, dtype=acc).view(c)
            gb += gs.sum(dtype=acc)
        g_bias = gb.to(weight.dtype).view(1) if ctx.has_bias else None
        return _unflat(gx3, x.shape), gw.to(weight.dtype).view(weight.shape), g_bias


def spatial_attention(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """sSE (Roy et al., MICCAI 2018): ``x * sigmoid(w . x + b)`` with the fused backward.

    Args:
        x: input (B, C, *spatial).
        weight: the C -> 1 pointwise convolution's weights, C elements (any shape, e.g. (1, C, 1, 1)).
        bias: its bias (one element) or None.

    Returns:
        ``(y, q)``: the output (shape of x) and the gate q as (B, 1, N) (detached, N = number of positions).
    """
    w = weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    if not _needs_grad(x, weight, bias):
        x3 = x.flatten(2)
        q = _spatial_logits(x3, w, b).sigmoid_()
        return _unflat(x3 * q, x.shape), q
    return _SpatialFn.apply(x, w, b)


# ----------------------------------------------------------------------------------------------------------------
# scSE: max(x*c, x*q) | x*c + x*q | x*c*q
# ----------------------------------------------------------------------------------------------------------------


def _scse_forward(x3: Tensor, c3: Tensor, w: Tensor, bias: Tensor | None, mode: str) -> tuple[Tensor, Tensor]:
    """Blocked forward of scSE on (B, C, N): computes q chunk by chunk and writes y once."""
    b, c, n = x3.shape
    bias_t = torch.zeros(1, dtype=x3.dtype, device=x3.device) if bias is None else bias.to(x3.dtype)
    out = _call(_ck_scse_fwd, x3, c3, w.to(x3.dtype), bias_t.view(1, 1, 1), mode)
    if out is not None:
        return out
    y3 = torch.empty_like(x3)
    q = torch.empty(b, 1, n, dtype=x3.dtype, device=x3.device)
    spans = _spans(n, b * c, x3.device)
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
    """

    @staticmethod
    def forward(ctx, x, mode, gate_fn, weight, bias, *params):  # type: ignore[override]
        x3 = x.flatten(2)
        (zl,), c = _run_gate(gate_fn, x3.mean(-1))
        c3 = c.detach().to(x.dtype).unsqueeze(-1)
        y3, q = _scse_forward(x3, c3, weight, bias, mode)
        ctx.save_for_backward(x, weight, q)
        ctx.gate = (zl, c)
        ctx.params = params
        ctx.mode = mode
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(q)
        return _unflat(y3, x.shape), q

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dq):  # type: ignore[override]
        x, weight, q = ctx.saved_tensors
        zl, c = ctx.gate
        mode = ctx.mode
        x3, dy3 = x.flatten(2), dy.flatten(2)
        b, ch, n = x3.shape
        acc = _acc_dtype(x.dtype)
        c3 = c.detach().to(x.dtype).unsqueeze(-1)
        w3 = weight.to(x.dtype).view(1, ch, 1)
        out = _call(_ck_scse_bwd1, x3, dy3, c3, q, mode)
        if out is not None:
            gc, gs, gw, gb = out
            (gz,), gp = _gate_backward([c], [gc], [zl], ctx.params)
            gzn = (torch.zeros_like(c3) if gz is None else (gz / n).to(x.dtype).unsqueeze(-1))
            args = (x3, dy3, c3, q, weight.to(x.dtype), gs, gzn, mode)
            gx3 = _call(_ck_scse_bwd2, *args)
            gx3 = _ck_scse_bwd2(*args) if gx3 is None else gx3
            g_bias = gb.to(weight.dtype).view(1) if ctx.has_bias else None
            return (_unflat(gx3, x.shape), None, None, gw.to(weight.dtype).view(weight.shape), g_bias, *gp)
        gx3 = torch.empty_like(x3)
        gc = torch.zeros(b, ch, dtype=acc, device=x.device)
        gw = torch.zeros(ch, dtype=acc, device=x.device)
        gb = torch.zeros((), dtype=acc, device=x.device)
        for j0, j1 in _spans(n, b * ch, x.device):
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
        (gz,), gp = _gate_backward([c], [gc], [zl], ctx.params)
        if gz is not None:
            gx3.add_((gz / n).to(x.dtype).unsqueeze(-1))
        g_bias = gb.to(weight.dtype).view(1) if ctx.has_bias else None
        return (_unflat(gx3, x.shape), None, None, gw.to(weight.dtype).view(weight.shape), g_bias, *gp)


def scse_attention(
    x: Tensor,
    gate_fn: Callable[[Tensor], Tensor],
    params: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    aggregation: str = "max",
) -> tuple[Tensor, Tensor]:
    """scSE (Roy et al., MICCAI 2018 / IEEE TMI 2019) with the fused forward and backward.

    Args:
        x: input (B, C, *spatial).
        gate_fn: the channel branch: (B, C) spatial mean -> (B, C) gate c (after the sigmoid).
        params: the tensors requiring grad that ``gate_fn`` uses.
        weight: the spatial branch's C -> 1 pointwise convolution weights (C elements).
        bias: its bias (one element) or None.
        aggregation: ``"max"`` (authors' code), ``"add"`` (MICCAI paper) or ``"mul"``. Defaults to ``"max"``.

    Returns:
        ``(y, q)``: the output (shape of x) and the spatial gate as (B, 1, N), detached.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"scse_attention: aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}.")
    w = weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    if not _needs_grad(x, weight, bias, *params):
        x3 = x.flatten(2)
        c3 = gate_fn(x3.mean(-1)).to(x.dtype).unsqueeze(-1)
        y3, q = _scse_forward(x3, c3, w, b, aggregation)
        return _unflat(y3, x.shape), q
    return _SCSEFn.apply(x, aggregation, gate_fn, w, b, *params)


# ----------------------------------------------------------------------------------------------------------------
# SimAM
# ----------------------------------------------------------------------------------------------------------------


def _simam_stats(x3: Tensor, e_lambda: float) -> tuple[Tensor, Tensor, int]:
    """Per-(B, C) mean and energy denominator ``4 * (sum((x - mean)^2) / n + lambda)``, n = max(N - 1, 1)."""
    b, c, n_pos = x3.shape
    mu = x3.mean(-1, keepdim=True)
    dsum = torch.zeros(b, c, 1, dtype=x3.dtype, device=x3.device)
    for j0, j1 in _spans(n_pos, b * c, x3.device):
        u = x3[..., j0:j1] - mu
        dsum += u.mul_(u).sum(-1, keepdim=True)
    n = max(n_pos - 1, 1)
    den = 4 * (dsum / n + e_lambda)
    return mu, den, n


def _simam_forward(x3: Tensor, mu: Tensor, den: Tensor) -> Tensor:
    b, c, n = x3.shape
    y3 = torch.empty_like(x3)
    for j0, j1 in _spans(n, b * c, x3.device):
        xc = x3[..., j0:j1]
        u = xc - mu
        s = u.mul_(u).div_(den).add_(0.5).sigmoid_()
        torch.mul(xc, s, out=y3[..., j0:j1])
    return y3


def _simam_eager(x3: Tensor, e_lambda: float) -> tuple[Tensor, Tensor, Tensor, int]:
    """SimAM forward with eager operators: ``(y, mu, den, n)``. Whole tensors: the output's buffer is the only
    full-size allocation (it holds x - mu, whose norm gives sum d, then the gate, then y)."""
    b, c, n_pos = x3.shape
    if len(_spans(n_pos, b * c, x3.device)) > 1:
        mu, den, n = _simam_stats(x3, e_lambda)
        return _simam_forward(x3, mu, den), mu, den, n
    mu = x3.mean(-1, keepdim=True)
    y3 = torch.sub(x3, mu)
    dsum = torch.linalg.vector_norm(y3, dim=-1, keepdim=True).square_()
    n = max(n_pos - 1, 1)
    den = 4 * (dsum / n + e_lambda)
    y3.square_().div_(den).add_(0.5).sigmoid_().mul_(x3)
    return y3, mu, den, n


class _SimAMFn(torch.autograd.Function):
    """SimAM, y = x * sigmoid(e), e = d / den + 1/2, d = (x - mu)^2, den = 4 (sum d / n + lambda).

    Backward (per (B, C); s = sigmoid(e), u = x - mu):
    ``ge = dy * x * s * (1 - s)`` (gradient wrt e), ``g_den = -sum(ge * d) / den^2``,
    ``g_d = ge / den + 4 g_den / n`` (d feeds e directly and through sum d),
    ``gu = 2 u g_d``, ``gx = dy * s + gu - mean(gu)`` with ``mean(gu) = 2 sum(ge * u) / (N den)``
    (the ``sum(u)`` term is zero). Pass 1 (blocked, reads dy and x) writes ``dy*s + 2 u ge / den`` and the two
    sums; pass 2 adds the affine-in-x rest ``alpha * x + beta``. Saves only x and two (B, C) vectors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, e_lambda: float) -> Tensor:  # type: ignore[override]
        x3 = x.flatten(2)
        out = _call(_ck_simam_fwd, x3, torch.tensor(e_lambda, dtype=x.dtype, device=x.device))
        if out is not None:
            y3, mu, den = out
            n = max(x3.shape[-1] - 1, 1)
        else:
            y3, mu, den, n = _simam_eager(x3, e_lambda)
        ctx.save_for_backward(x, mu, den)
        ctx.n = n
        return _unflat(y3, x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, mu, den = ctx.saved_tensors
        x3, dy3 = x.flatten(2), dy.flatten(2)
        b, c, n_pos = x3.shape
        gx3 = _call(_ck_simam_bwd, x3, dy3, mu, den)
        if gx3 is not None:
            return _unflat(gx3, x.shape), None
        two_over_den = 2 / den
        gx3 = torch.empty_like(x3)
        r1 = torch.zeros(b, c, 1, dtype=x.dtype, device=x.device)  # sum ge * u
        rd = torch.zeros(b, c, 1, dtype=x.dtype, device=x.device)  # sum ge * u^2
        for j0, j1 in _spans(n_pos, b * c, x.device):
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
        for j0, j1 in _spans(n_pos, b * c, x.device):
            gxc = gx3[..., j0:j1]
            gxc.addcmul_(x3[..., j0:j1], alpha).add_(beta)
        return _unflat(gx3, x.shape), None


def simam_attention(x: Tensor, e_lambda: float = 1e-4) -> Tensor:
    """SimAM (Yang et al., ICML 2021) with the fused forward and backward; float32/float64 inputs.

    ``n = max(N - 1, 1)`` as medse's :class:`~medse.attention.simam.SimAM` (no NaN for a single position).

    Args:
        x: input (B, C, *spatial), float32 or float64.
        e_lambda: the regulariser lambda. Defaults to 1e-4.

    Returns:
        ``x * sigmoid(e)``, shape of x.
    """
    if not _needs_grad(x):
        x3 = x.flatten(2)
        out = _call(_ck_simam_fwd, x3, torch.tensor(e_lambda, dtype=x.dtype, device=x.device))
        if out is not None:
            return _unflat(out[0], x.shape)
        return _unflat(_simam_eager(x3, e_lambda)[0], x.shape)
    return _SimAMFn.apply(x, float(e_lambda))


# ----------------------------------------------------------------------------------------------------------------
# Coordinate attention: y = x * a_1[s1] * a_2[s2] (* a_3[s3]), strips = means over the other axes
# ----------------------------------------------------------------------------------------------------------------


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
    acc = _acc_dtype(x.dtype)
    first = torch.empty(b, c, sizes[0], dtype=acc, device=x.device)
    plane = torch.zeros(b, c, *sizes[1:], dtype=acc, device=x.device)
    rest_axes = tuple(range(3, 2 + nd))
    for j0, j1 in _spans(sizes[0], b * c * rest, x.device):
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
        leaves, gates = _run_gate(strip_fn, *_coord_pool(x))
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
        acc = _acc_dtype(x.dtype)
        gd = [g.detach().to(x.dtype) for g in gates]
        r = _coord_rest_product(gd, nd)
        a1 = gd[0]
        rest_axes = tuple(range(3, 2 + nd))
        spans = _spans(sizes[0], b * c * (n // sizes[0]), x.device)
        out = _call(_ck_ca_bwd1, x, dy, _rest_view(a1, nd, 0), r)
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
        g_strips, gp = _gate_backward(gates, g_gates, leaves, ctx.params)
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
            gx = _call(_ck_ca_bwd2, *args)
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
    out = _call(_ck_ca_apply, x, a1, r)
    if out is not None:
        return out
    y = torch.empty_like(x)
    for j0, j1 in _spans(sizes[0], b * c * (math.prod(sizes) // sizes[0]), x.device):
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
    if not _needs_grad(x, *params):
        gates = strip_fn(*_coord_pool(x))
        return _coord_apply(x, [g.to(x.dtype) for g in gates])
    return _CoordFn.apply(x, strip_fn, *params)


# ----------------------------------------------------------------------------------------------------------------
# entry points used by the blocks: fn(module, x) -> Tensor | NotImplemented
# ----------------------------------------------------------------------------------------------------------------


#: Smallest input (elements) for which the blocks take the fast path; smaller inputs run the plain code. Below
#: this size a block's cost is per-operator overhead, not memory traffic, and the custom Function's own overhead
#: made the fast path slower (single thread, 32k elements: scSE 14.7 vs 11.7 ms, SimAM 3.8 vs 1.4 ms; at 131k
#: elements the fast path was ahead). Defaults to 65536 (``MEDSE_FUSED_MIN``); the functional forms
#: (:func:`scse_attention` etc.) do not check it.
MIN_ELEMENTS: int = int(os.environ.get("MEDSE_FUSED_MIN", str(1 << 16)))


def _usable(x: Tensor) -> bool:
    # under torch.compile of a whole model, the plain formula is traced and fused by the compiler itself
    if torch.compiler.is_compiling():
        return False
    return x.is_floating_point() and x.ndim >= 3 and x.numel() >= max(MIN_ELEMENTS, 1)


def cse(module, x: Tensor):
    """Fast path of :class:`~medse.attention.se.SqueezeExcitation` / ``ChannelSE`` (fc1, act, fc2)."""
    if not _usable(x):
        return NotImplemented

    def gate(z: Tensor) -> Tensor:
        return torch.sigmoid(module.fc2(module.act(module.fc1(z))))

    return channel_attention(x, gate, tuple(module.parameters()))


def eca(module, x: Tensor):
    """Fast path of :class:`~medse.attention.eca.ECA` (1D convolution across channels)."""
    if not _usable(x):
        return NotImplemented

    def gate(z: Tensor) -> Tensor:
        return torch.sigmoid(module.conv(z.unsqueeze(1))).squeeze(1)

    return channel_attention(x, gate, tuple(module.parameters()))


def _record(module, x: Tensor, q: Tensor) -> None:
    if getattr(module, "record_gate", False):
        module.last_gate = q.detach().reshape(x.shape[0], 1, *x.shape[2:])


def sse(module, x: Tensor):
    """Fast path of :class:`~medse.attention.scse.SpatialSE` (``conv``: C -> 1, bias)."""
    if not _usable(x):
        return NotImplemented
    y, q = spatial_attention(x, module.conv.weight, module.conv.bias)
    _record(module, x, q)
    return y


def scse(module, x: Tensor):
    """Fast path of :class:`~medse.attention.scse.SCSE` (``cse`` branch fc1/act/fc2, ``sse`` branch conv)."""
    if not _usable(x):
        return NotImplemented
    ch = module.cse

    def gate(z: Tensor) -> Tensor:
        return torch.sigmoid(ch.fc2(ch.act(ch.fc1(z))))

    y, q = scse_attention(
        x, gate, tuple(ch.parameters()), module.sse.conv.weight, module.sse.conv.bias, module.aggregation
    )
    _record(module, x, q)
    return y


def simam(module, x: Tensor):
    """Fast path of :class:`~medse.attention.simam.SimAM`; float32/float64 only (half types use the plain code,
    which computes the energy in float32), and the plain code when ``record_gate`` is set."""
    if not _usable(x) or x.dtype not in (torch.float32, torch.float64) or getattr(module, "record_gate", False):
        return NotImplemented
    return simam_attention(x, module.e_lambda)


def ca(module, x: Tensor):
    """Fast path of :class:`~medse.attention.coord.CoordAttention` (2D/3D); the plain code when
    ``record_gate`` is set."""
    if not _usable(x) or x.ndim != module.spatial_dims + 2 or getattr(module, "record_gate", False):
        return NotImplemented
    nd = module.spatial_dims
    sizes = list(x.shape[2:])

    def strips_to_gates(*strips: Tensor) -> list[Tensor]:
        b, c = strips[0].shape[:2]
        ones = [1] * (nd - 1)
        cat = torch.cat([s.reshape(b, c, s.shape[2], *ones) for s in strips], dim=2)
        y = module.act(module.bn(module.conv1(cat)))
        parts = torch.split(y, sizes, dim=2)
        return [torch.sigmoid(conv(p)).reshape(b, c, -1) for p, conv in zip(parts, module.conv_gates, strict=True)]

    return coord_attention(x, strips_to_gates, tuple(module.parameters()))
