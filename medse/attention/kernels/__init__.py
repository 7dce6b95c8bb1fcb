"""Fused kernels of the memory-bound attention blocks: fewer passes over the activation, same numbers.

Attention blocks add almost no FLOPs but read and write the activation tensor many times: a textbook scSE makes
about six passes forward (mean, 1x1 conv, ``x*c``, ``x*q``, maximum) and a dozen backward, each allocating a fresh
full-size tensor (on a CPU a fresh 67 MB tensor costs more in page faults than the arithmetic on it). The kernels
here compute the same outputs and gradients as the plain formulas with

- one custom :class:`torch.autograd.Function` per family, whose backward pass is derived by hand (formulas in
  each Function's docstring), saves only the input or the output (plus per-(B, C) or per-(B, position) vectors,
  never another full-size tensor) and recomputes what it needs (which branch of the maximum won, the SimAM gate) instead of
  storing it;
- eager kernels (the default backend) written so that the output, or the input gradient, is the only full-size
  allocation wherever PyTorch's operators allow it: in-place chains, ``out=`` into the result's buffer, batched
  matrix products for weighted reductions (they read their operands once and allocate nothing full-size);
- an optional ``torch.compile`` backend (:func:`set_backend`) for the element-wise kernels of scSE, SimAM and CA,
  which fuses each pass into one loop, with dynamic shapes so that new sizes do not recompile;
- cache blocking on CPU for the kernels with many passes (scSE, SimAM's backward: ``core.SCRATCH_ELEMENTS``,
  on by default) and optionally for the others (``core.CHUNK_ELEMENTS``, off by default).

Plain vs fused vs the memory floor on the benchmark tensors: ``benchmarks/results/blocks_cpu_issue14.md``
(``python benchmarks/bench_blocks.py --whole``; the compile backend in ``blocks_cpu_run2.md``). See
``docs/performance.md``.

One module per family, each called directly by its blocks with the blocks' own layers:

=========================  ==================================================  ===============================
module                     functional form                                     blocks
=========================  ==================================================  ===============================
:mod:`.channel`            ``channel_attention(x, gate_fn, params)``           ``se``, ``cse``, ``eca``
:mod:`.spatial`            ``spatial_attention``, ``scse_attention``           ``sse``, ``scse``, ``scse_smp``
:mod:`.simam`              ``simam_attention(x, e_lambda)``                    ``simam``
:mod:`.coord`              ``coord_attention(x, strip_fn, params)``            ``ca``
=========================  ==================================================  ===============================

:mod:`.core` holds what they share: :func:`~.core.fast_path_applies` (the size/dtype/capture test every block
asks first), the thresholds ``MIN_ELEMENTS``, ``CHUNK_ELEMENTS``, ``SCRATCH_ELEMENTS``, ``COMPILE_MIN_ELEMENTS``,
and the backend switch. The gate sub-networks are passed in as callables, so a block with another activation or gate network
(or a user block of the same family) reuses the kernel unchanged.

``channel_attention``, ``spatial_attention`` and ``scse_attention`` take ``skip=``: they then return
``torch.cat([skip, y], 1)``, written once, and save that instead of y (:func:`~.core.output_buffer`; the blocks'
``forward_cat``), for a block whose output a network concatenates with a skip connection.

Graph captures: the blocks run these kernels only in eager execution. Under ``torch.compile``, ``torch.export``,
ONNX export of either kind, ``torch.jit.trace`` and ``torch.func`` transforms (:func:`~.core.capturing`, asked by
:func:`~.core.fast_path_applies`) they record their plain formula instead, and ``torch.jit.script`` compiles only
the plain formula (:mod:`medse.attention._base`). Stepping aside was chosen over custom ops with export rules: the
plain formula has the same numbers and every exporter knows its operators, while the kernels' ``out=`` writes
into preallocated buffers are invisible to a trace (the legacy ONNX exporter wrote graphs that ignored their
input) and their loops over cache blocks freeze the traced sizes.

Double backward (gradients of gradients) is not supported by the fused paths (``once_differentiable``); use
``fused=False`` for that. NOTE: not in any paper: these are implementation details with identical numbers.
"""

from __future__ import annotations

from medse.attention.kernels.channel import channel_attention
from medse.attention.kernels.coord import coord_attention
from medse.attention.kernels.core import fast_path_applies, get_backend, set_backend
from medse.attention.kernels.simam import simam_attention
from medse.attention.kernels.spatial import scse_attention, spatial_attention

__all__ = [
    "channel_attention",
    "coord_attention",
    "fast_path_applies",
    "get_backend",
    "scse_attention",
    "set_backend",
    "simam_attention",
    "spatial_attention",
]
