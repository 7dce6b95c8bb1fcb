"""Parameter and multiply-add counts of any ``nn.Module`` (forward hooks, no third-party profiler).

What :func:`count_macs` counts, per forward pass at the given input shape (batch included):

- convolutions (1D/2D/3D): ``out.numel() * in_channels / groups * prod(kernel)``; transposed convolutions
  ``in.numel() * out_channels / groups * prod(kernel)``; ``nn.Linear``: ``out.numel() * in_features``.
  Biases are not counted (an addition, not a multiply-add).
- normalisation layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm): one multiply-add per output element
  (the affine scale and shift folded into the normalisation).
- only with ``elementwise=True``: pooling layers (one operation per input element) and the element-wise work
  that attention blocks declare through an ``extra_macs(input_shape) -> int`` method (spatial means, gate
  multiplies, SimAM's energy, ...). Activations are never counted.

The first two items are what papers usually call FLOPs/MACs (e.g. SE-ResNet-50's 3.87 vs 3.86 GFLOPs); the
element-wise work is what dominates an attention block's run time on memory-bound hardware.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_POOLS = (
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of learnable parameters (shared tensors counted once); buffers (BN running stats) excluded.

    Args:
        module: any module.
        trainable_only: count only parameters with ``requires_grad``. Defaults to True.
    """
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_ops(module: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Run one forward pass on zeros of ``input_shape`` and return ``{"macs": ..., "elementwise": ...}``.

    ``macs`` covers convolutions, linear and normalisation layers; ``elementwise`` pooling layers and the
    blocks' declared element-wise work (see the module docstring). The module's training flags and any
    ``fused`` attributes are restored afterwards; fast paths are switched off during the count so that every
    layer's hook fires. BatchNorm statistics are not updated (the pass runs in eval mode, without gradients).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"count_macs: input_shape must be (B, C, *spatial) with positive sizes, got {input_shape!r}.")
    counts = {"macs": 0, "elementwise": 0}

    def hook(mod: nn.Module, inputs: tuple, output: object) -> None:
        inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        out = output if isinstance(output, torch.Tensor) else None
        if isinstance(mod, nn.modules.conv._ConvTransposeNd) and inp is not None:
            k = math.prod(mod.kernel_size)
            counts["macs"] += inp.numel() * (mod.out_channels // mod.groups) * k
        elif isinstance(mod, nn.modules.conv._ConvNd) and out is not None:
            k = math.prod(mod.kernel_size)
            counts["macs"] += out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, nn.Linear) and out is not None:
            counts["macs"] += out.numel() * mod.in_features
        elif isinstance(mod, _NORMS) and out is not None:
            counts["macs"] += out.numel()
        elif isinstance(mod, _POOLS) and inp is not None:
            counts["elementwise"] += inp.numel()
        extra = getattr(mod, "extra_macs", None)
        if callable(extra) and inp is not None:
            counts["elementwise"] += int(extra(tuple(inp.shape)))

    modes = {m: m.training for m in module.modules()}
    fused = {m: m.fused for m in module.modules() if isinstance(getattr(m, "fused", None), bool)}
    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        for m in fused:
            m.fused = False
        module.eval()
        ref = next(iter(module.parameters()), None)
        if ref is None:
            ref = next(iter(module.buffers()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        with torch.no_grad():
            module(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, flag in fused.items():
            m.fused = flag
    return counts


def count_macs(module: nn.Module, input_shape: Sequence[int], *, elementwise: bool = False) -> int:
    """Multiply-adds of one forward pass at ``input_shape`` (B, C, *spatial).

    Args:
        module: any module taking one tensor.
        input_shape: the full input shape, batch included.
        elementwise: also count pooling and the attention blocks' element-wise work. Defaults to False
            (conv/linear/norm layers only, the usual FLOP/MAC convention of papers).
    """
    counts = count_ops(module, input_shape)
    return counts["macs"] + (counts["elementwise"] if elementwise else 0)
