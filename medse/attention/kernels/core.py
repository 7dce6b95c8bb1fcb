"""What every fused kernel shares: size thresholds, the backend switch, cache blocking and the gate-graph helpers.

The family modules (:mod:`~medse.attention.kernels.channel`, :mod:`~medse.attention.kernels.spatial`,
:mod:`~medse.attention.kernels.simam`, :mod:`~medse.attention.kernels.coord`) read the settings below at call
time (``core.CHUNK_ELEMENTS``, ...), so changing them here (or with the environment variables) applies everywhere.
A block asks :func:`fast_path_applies` before calling its family's kernel.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Smallest input (elements) for which the blocks take the fast path; smaller inputs run the plain code. Below
#: this size a block's cost is per-operator overhead, not memory traffic, and the custom Function's own overhead
#: made the fast path slower (single thread, 32k elements: scSE 14.7 vs 11.7 ms, SimAM 3.8 vs 1.4 ms; at 131k
#: elements the fast path was ahead). Defaults to 65536 (``MEDSE_FUSED_MIN``); the functional forms
#: (:func:`~medse.attention.kernels.scse_attention` etc.) do not check it.
MIN_ELEMENTS: int = int(os.environ.get("MEDSE_FUSED_MIN", str(1 << 16)))

#: Elements per cache block on CPU for the other kernels (cSE, ECA, sSE, CA, SimAM's forward), summed over batch
#: and channels; 0 or negative: no blocking (whole tensors), the default: blocking did not make them faster
#: (their passes are few) and, on a loaded machine, made them much slower (see SCRATCH_ELEMENTS). Overridable
#: with the environment variable ``MEDSE_FUSED_CHUNK`` (e.g. 262144 = 1 MiB of float32 per chunk tensor).
CHUNK_ELEMENTS: int = int(os.environ.get("MEDSE_FUSED_CHUNK", "0"))

#: Elements of one cache block (summed over batch and channels) of the kernels that work in blocks by default:
#: scSE's forward and backward and SimAM's backward. None (the default) chooses per call: on CPU with one torch
#: thread 524288 (2 MiB of float32 per temporary, in L2/L3), with several threads 4194304, on CUDA 4194304 (fewer
#: launches). Small blocks were much faster than whole tensors with one thread, and with two threads on a quiet
#: machine, but several times *slower* with two threads on an oversubscribed CPU (each small operator is an
#: OpenMP region that waits for descheduled threads); 4M-element blocks lose less there. Measured with
#: ``python benchmarks/bench_blocks.py --whole [--busy 4]`` (docs/performance.md). 0: whole tensors (scSE-max's
#: backward then allocates a full-size scratch). Environment variable ``MEDSE_FUSED_BLOCK``.
SCRATCH_ELEMENTS: int | None = int(os.environ["MEDSE_FUSED_BLOCK"]) if os.environ.get("MEDSE_FUSED_BLOCK") else None

#: Smallest input (elements) that the compile backend compiles for; smaller ones run the eager kernels. Small
#: tensors gain little from fusion, pay the compiled function's guard checks, and their many distinct shapes
#: (one per network level) trigger recompilations for size-dependent kernel choices (dynamo stops at its
#: recompile limit of 8 per function). Defaults to 1048576 (``MEDSE_FUSED_COMPILE_MIN``).
COMPILE_MIN_ELEMENTS: int = int(os.environ.get("MEDSE_FUSED_COMPILE_MIN", str(1 << 20)))

BACKENDS = ("eager", "compile")
_backend: str = os.environ.get("MEDSE_FUSED_BACKEND", "eager")
_compiled: dict[str, Callable] = {}
_compile_failed: bool = False


def capturing(x: Tensor | None = None) -> bool:
    """Whether the current call is being recorded into a graph rather than just run: ``torch.compile``,
    ``torch.export`` and the dynamo ONNX exporter (``torch.compiler.is_compiling()``), ``torch.jit.trace`` and the
    legacy ONNX exporter (``torch.jit.is_tracing()``, ``torch.onnx.is_in_onnx_export()``), ``torch.func``
    transforms (a functorch level is active) or an input that is not a plain tensor (an FX proxy, a fake or
    functional tensor).

    The fused kernels must then step aside: their ``out=`` writes into preallocated buffers are side effects a
    trace does not connect to the output (the legacy ONNX exporter wrote a graph without inputs), their Python
    loops over cache blocks freeze the traced shape, and their ``autograd.Function`` has no ``setup_context`` for
    ``torch.func``. The plain formulas compute the same numbers with operators every capture understands.
    ``torch.jit.script`` never reaches this test: the blocks guard their fast path with
    ``torch.jit.is_scripting()``, which TorchScript resolves at compile time.
    """
    if torch.compiler.is_compiling():  # first: the checks below would break dynamo's graph
        return True
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    if torch._C._functorch.maybe_current_level() is not None:  # inside torch.func.grad / vmap / jacrev ...
        return True
    if x is None:
        return False
    if not isinstance(x, Tensor):  # an FX Proxy (torch.fx.symbolic_trace)
        return True
    return bool(
        torch._C._functorch.is_functorch_wrapped_tensor(x)
        or torch._is_functional_tensor(x)
        or torch._subclasses.fake_tensor.is_fake(x)
    )


def fast_path_applies(x: Tensor) -> bool:
    """Whether a block should run its fused kernel on ``x``: a floating-point (B, C, *spatial) tensor of at least
    :data:`MIN_ELEMENTS` elements, outside any graph capture (:func:`capturing`: ``torch.compile``, ``torch.export``,
    ONNX export, ``torch.jit.trace``, ``torch.func``). Under a capture the plain formula is recorded instead
    (a compiler fuses it itself; an exported graph stays valid at every batch and spatial size)."""
    if capturing(x):
        return False
    return x.is_floating_point() and x.ndim >= 3 and x.numel() >= max(MIN_ELEMENTS, 1)


def set_backend(name: str) -> None:
    """Choose how the element-wise kernels of scSE, SimAM and CA run: ``"eager"`` (PyTorch operators, no
    compilation) or ``"compile"`` (``torch.compile(dynamic=True)``: one fused loop per pass, compiled once per
    kernel, dtype and device, cached on disk by PyTorch; no recompilation for new shapes). Defaults to
    ``"eager"``, or the environment variable ``MEDSE_FUSED_BACKEND``. If compilation fails (no C++ compiler),
    medse warns once and stays on ``"eager"``.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {BACKENDS}, got {name!r}.")
    _backend = name


def get_backend() -> str:
    """The backend in use, ``"eager"`` or ``"compile"``; see :func:`set_backend`."""
    return _backend


def compiled_kernel(fn: Callable) -> Callable | None:
    """The compiled twin of ``fn`` when the compile backend is on (and works), else None."""
    if _backend != "compile" or _compile_failed:
        return None
    k = _compiled.get(fn.__name__)
    if k is None:
        k = _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
    return k


def compiled_call(fn: Callable, *args):
    """``fn(*args)`` compiled when the compile backend is on and ``args[0]`` is large enough; None means: run the
    eager kernel. A compiler failure warns once and switches the compile backend off for the process."""
    global _compile_failed
    if args[0].numel() < COMPILE_MIN_ELEMENTS:
        return None
    k = compiled_kernel(fn)
    if k is not None:
        try:
            return k(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: warn once, run eagerly
            _compile_failed = True
            warnings.warn(f"medse fused attention: torch.compile failed ({type(e).__name__}: {e}); using eager "
                          "kernels.", RuntimeWarning, stacklevel=3)
    return None


def chunk_spans(n: int, rows: int, device: torch.device, scratch: bool = False) -> list[tuple[int, int]]:
    """Chunks ``[j0, j1)`` of an axis of length ``n`` whose slices hold about CHUNK_ELEMENTS elements (with
    ``scratch``: SCRATCH_ELEMENTS, the size of a scratch buffer for one slice)."""
    if scratch:
        elements = SCRATCH_ELEMENTS
        if elements is None:
            elements = 1 << 19 if device.type == "cpu" and torch.get_num_threads() == 1 else 1 << 22
        if elements <= 0:
            return [(0, n)]
        if device.type != "cpu":
            elements = max(elements, 1 << 22)  # fewer launches
    elif device.type != "cpu" or CHUNK_ELEMENTS <= 0:
        return [(0, n)]
    else:
        elements = CHUNK_ELEMENTS
    k = max(1, min(n, elements // max(rows, 1)))
    return [(j, min(n, j + k)) for j in range(0, n, k)]


def compiles(fn: Callable, x: Tensor) -> bool:
    """Whether :func:`compiled_call` would run the compiled twin of ``fn`` on ``x`` (as far as known now)."""
    return x.numel() >= COMPILE_MIN_ELEMENTS and compiled_kernel(fn) is not None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the reductions: float32 for half types, else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def unflat(t3: Tensor, shape: torch.Size) -> Tensor:
    """A flattened (B, C, N) tensor back to ``shape`` (a view when the strides allow it)."""
    try:
        return t3.view(shape)
    except RuntimeError:
        return t3.reshape(shape)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records an operation on these tensors (else the kernels run without a Function)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_gate(gate_fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[list[Tensor], Tensor | list[Tensor]]:
    """Run a small gate network on detached leaves with autograd on, so its backward can be run later.

    The gate networks are tiny (they act on (B, C) or (B, C, L) descriptors); keeping their graph instead of
    recomputing it in backward also keeps BatchNorm running statistics updated exactly once.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = gate_fn(*leaves)
    return leaves, out


def gate_backward(
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


def skip_fits(x: Tensor, skip: Tensor | None) -> bool:
    """Whether a kernel can write its output straight into ``torch.cat([skip, y], 1)``: ``skip`` has x's batch
    size, spatial shape, dtype and device (otherwise the caller concatenates after the block, as ``torch.cat``
    would, type promotion and errors included)."""
    return (
        skip is not None
        and skip.ndim == x.ndim
        and skip.shape[0] == x.shape[0]
        and skip.shape[2:] == x.shape[2:]
        and skip.dtype == x.dtype
        and skip.device == x.device
    )


def check_skip(owner: str, x: Tensor, skip: Tensor | None) -> None:
    """``ValueError`` naming ``owner`` and both tensors when a ``skip`` is given that :func:`skip_fits` refuses."""
    if skip is not None and not skip_fits(x, skip):
        raise ValueError(f"{owner}: skip {tuple(skip.shape)} {skip.dtype} does not fit x {tuple(x.shape)} "
                         f"{x.dtype} (same batch, spatial shape, dtype and device needed).")


def output_buffer(x: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(out, y)``: the tensor a kernel returns and the (B, C, *spatial) part of it the kernel writes its result
    into (C-contiguous spatial axes, so ``y.flatten(2)`` is a view).

    Without ``skip`` both are one new tensor. With ``skip`` (B, Cs, *spatial), ``out`` is ``torch.cat([skip, y],
    1)`` allocated once, ``skip`` already copied in and ``y = out[:, Cs:]``: the block's output is never a tensor
    of its own. Where a decoder stage's block feeds a concatenation with the skip connection (MONAI's U-Net), the
    kernel saves ``out``, which the next convolution saves anyway, instead of a separate copy of ``y``, and the
    concatenation's copy of ``y`` disappears (:func:`medse.networks.layers.forward_then_cat`).
    """
    if skip is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return y, y
    cs = skip.shape[1]
    out = torch.empty((x.shape[0], cs + x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
    out[:, :cs].copy_(skip)
    return out, out[:, cs:]


def split_output(out: Tensor, skip_channels: int | None) -> tuple[Tensor | None, Tensor]:
    """``(skip part, y part)`` of a kernel's output or of its gradient (see :func:`output_buffer`); ``skip_channels``
    None: the output is y alone."""
    if skip_channels is None:
        return None, out
    return out[:, :skip_channels], out[:, skip_channels:]


def dot_spatial(a3: Tensor, b3: Tensor) -> Tensor:
    """``sum_n a*b`` over the last axis of two (B, C, N) tensors, cache-blocked; accumulates in float32+."""
    b, c, n = a3.shape
    acc = acc_dtype(a3.dtype)
    out = torch.zeros(b, c, dtype=acc, device=a3.device)
    for j0, j1 in chunk_spans(n, b * c, a3.device):
        out += torch.mul(a3[..., j0:j1], b3[..., j0:j1]).sum(-1, dtype=acc)
    return out
