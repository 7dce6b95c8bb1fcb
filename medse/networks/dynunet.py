"""MONAI's DynUNet (nnU-Net's U-Net) with attention after every encoder stage, the bottleneck and decoder stage.

Base network: ``monai.networks.nets.DynUNet`` (Isensee et al., "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nature Methods 2021, arXiv 1809.10486; MONAI's re-implementation).
Kernel sizes and strides are derived from the patch size and the voxel spacing by :func:`get_kernels_strides`,
the rule of MONAI's DynUNet tutorial (``modules/dynunet_pipeline``), which follows nnU-Net's planning: halve an
axis while its spacing is at most twice the finest and it still has at least 8 voxels; a 3-kernel on axes
within twice the finest spacing, else 1. Pass ``kernel_size`` and ``strides`` to override.

Attention placement as in :mod:`medse.networks.unet` (Roy et al., IEEE TMI 2019): after the input block and
every down-sampling block (``encoder.0`` .. ``encoder.n``; each output feeds both the deeper path and the skip),
after the bottleneck, and after every up-sampling block (``decoder.0`` is the deepest, the first one run; the
deep-supervision heads read the recalibrated maps); never on the 1x1 output block. The blocks are attached to
MONAI's modules after MONAI built and initialised them (:meth:`medse.networks.placement.AttentionPlan.attach`), so
MONAI's ``kaiming_normal_`` initialisation is not applied to the attention blocks, every MONAI state-dict key is
kept, and with ``attention="none"`` the network is MONAI's (same state dict, same outputs for the same seed).

Deep supervision (``deep_supervision=True``): in training mode the forward pass returns MONAI's stack
``(B, 1 + deep_supr_num, C, *spatial)``; medse's trainer then sums the losses of the heads with weights 1, 1/2,
1/4, ... (``monai.losses.DeepSupervisionLoss``, mode ``"exp"``). In eval mode the output is the logits only.

NOTE: medse's: inputs are padded to a multiple of the product of the strides (per axis) and the output cropped
back, so any size works; ``strides[0]`` must be 1 so that the logits have the input's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import DynUNet

from medse.networks._common import check_int, check_pad_mode, check_spatial_dims, class_builder
from medse.networks.layers import PadCropMixin, divisor_of, lcm
from medse.networks.placement import POSITIONS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model

__all__ = ["DEFAULT_PATCH_SIZE", "DynUNetWithAttention", "dynunet", "get_kernels_strides"]

#: Patch size the kernels and strides are derived from when neither they nor ``patch_size`` are given.
DEFAULT_PATCH_SIZE: dict[int, tuple[int, ...]] = {2: (256, 256), 3: (128, 128, 128)}


def get_kernels_strides(
    patch_size: Sequence[int], spacing: Sequence[float] | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides of a DynUNet for a patch size and voxel spacing (MONAI's DynUNet tutorial rule).

    Repeatedly: an axis is down-sampled (stride 2) while its spacing is at most twice the finest spacing and it
    has at least 8 voxels left; its kernel is 3 when its spacing is at most twice the finest, else 1 (thick
    slices are not convolved across until they are down-sampled to comparable spacing). Stops when no axis can
    be halved. The first stride is 1 (the input block) and the bottleneck kernel is 3.

    Args:
        patch_size: training patch size, one value per axis.
        spacing: voxel spacing per axis. Defaults to isotropic 1.0.

    Returns:
        ``(kernels, strides)``, lists of per-axis lists, ``len(kernels) == len(strides)``.

    Raises:
        ValueError: the patch size is not divisible by the strides it leads to (naming the axis), or the
            lengths differ.
    """
    sizes = [int(s) for s in patch_size]
    spacings = [1.0] * len(sizes) if spacing is None else [float(s) for s in spacing]
    if len(spacings) != len(sizes):
        raise ValueError(f"get_kernels_strides: spacing {tuple(spacings)} must have one value per patch axis "
                         f"{tuple(sizes)}.")
    if any(s < 1 for s in sizes) or any(s <= 0 for s in spacings):
        raise ValueError(f"get_kernels_strides: patch size {tuple(sizes)} and spacing {tuple(spacings)} must be "
                         "positive.")
    original = list(sizes)
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    current = [float(s) for s in sizes]
    while True:
        ratios = [sp / min(spacings) for sp in spacings]
        stride = [2 if r <= 2 and size >= 8 else 1 for r, size in zip(ratios, current, strict=True)]
        kernel = [3 if r <= 2 else 1 for r in ratios]
        if all(s == 1 for s in stride):
            break
        for axis, (size, s) in enumerate(zip(current, stride, strict=True)):
            if size % s != 0:
                raise ValueError(f"dynunet: patch size {tuple(original)} is not supported: axis {axis} "
                                 f"({original[axis]} voxels) is not divisible by the strides it needs; use a "
                                 "multiple of a power of 2.")
        current = [size / s for size, s in zip(current, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        kernels.append(kernel)
        strides.append(stride)
    strides.insert(0, [1] * len(sizes))
    kernels.append([3] * len(sizes))
    return kernels, strides


def _per_axis(name: str, values: object, d: int) -> list[int | list[int]]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"dynunet: {name} must be a sequence with one entry per block, got {values!r}.")
    out: list[int | list[int]] = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(int(v))
        elif isinstance(v, Sequence) and len(v) == d and all(isinstance(a, int) for a in v):
            out.append([int(a) for a in v])
        else:
            raise ValueError(f"dynunet: every entry of {name} must be an int or {d} ints, got {v!r}.")
    return out


class DynUNetWithAttention(PadCropMixin, DynUNet):
    """MONAI ``DynUNet`` with attention blocks attached to its encoder, bottleneck and decoder blocks.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits).
        kernel_size: kernel size per block (an int or one per axis). Defaults to :func:`get_kernels_strides`
            of ``patch_size`` and ``spacing``.
        strides: stride per block, the first 1. Defaults to :func:`get_kernels_strides`.
        upsample_kernel_size: transposed-convolution kernels. Defaults to ``strides[1:]`` (MONAI's advice).
        filters: channels per block. Defaults to MONAI's nnU-Net rule ``min(2 ** (5 + i), 320 in 3D / 512 in 2D)``.
        dropout: dropout. Defaults to None (MONAI).
        norm_name: normalisation. Defaults to instance norm with affine (MONAI).
        act_name: activation. Defaults to leaky ReLU 0.01 (MONAI).
        deep_supervision: return the deep-supervision stack in training mode. Defaults to False (MONAI).
        deep_supr_num: number of deep-supervision heads. Defaults to 1 (MONAI).
        res_block: residual blocks. Defaults to False (MONAI).
        trans_bias: biases in the transposed convolutions. Defaults to False (MONAI).
        patch_size: patch size the kernels and strides are derived from (medse's trainer passes
            ``train.patch_size``). Defaults to 128^3 in 3D and 256^2 in 2D.
        spacing: voxel spacing for the derivation (the trainer passes ``data.preprocess.target_spacing``).
            Defaults to isotropic.
        attention: block name, "none", or a mapping position -> block. Defaults to "none".
        attention_positions: subset of ``("encoder", "bottleneck", "decoder")`` or stages. Defaults to all three.
        attention_kwargs: keyword arguments for the blocks. Defaults to None.
        pad_mode: padding of inputs that are not multiples of the strides' product. Defaults to "constant".
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Sequence[int] | int] | None = None,
        strides: Sequence[Sequence[int] | int] | None = None,
        upsample_kernel_size: Sequence[Sequence[int] | int] | None = None,
        filters: Sequence[int] | None = None,
        dropout: tuple | str | float | None = None,
        norm_name: tuple | str = ("INSTANCE", {"affine": True}),
        act_name: tuple | str = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        res_block: bool = False,
        trans_bias: bool = False,
        *,
        patch_size: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        owner = "dynunet"
        d = check_spatial_dims(owner, spatial_dims)
        check_int("in_channels", in_channels, 1, owner)
        check_int("out_channels", out_channels, 1, owner)
        if kernel_size is None or strides is None:
            patch = tuple(patch_size) if patch_size is not None else DEFAULT_PATCH_SIZE[d]
            if len(patch) != d:
                raise ValueError(f"dynunet: patch_size {patch!r} must have {d} values for spatial_dims={d}.")
            if spacing is not None and len(spacing) != d:
                raise ValueError(f"dynunet: spacing {tuple(spacing)!r} must have {d} values for spatial_dims={d}.")
            k, s = get_kernels_strides(patch, spacing)
            kernel_size = k if kernel_size is None else kernel_size
            strides = s if strides is None else strides
        kernel_size = _per_axis("kernel_size", kernel_size, d)
        strides = _per_axis("strides", strides, d)
        if len(kernel_size) != len(strides) or len(strides) < 3:
            raise ValueError(f"dynunet: kernel_size and strides must have the same length, at least 3 (input block, "
                             f"one down-sampling block, bottleneck); got {len(kernel_size)} and {len(strides)}.")
        first = strides[0]
        if any(v != 1 for v in ([first] if isinstance(first, int) else first)):
            raise ValueError(f"dynunet: strides[0] must be 1 so that the logits have the input's size, got {first!r}.")
        if upsample_kernel_size is None:
            upsample_kernel_size = strides[1:]
        upsample_kernel_size = _per_axis("upsample_kernel_size", upsample_kernel_size, d)
        check_int("deep_supr_num", deep_supr_num, 1, owner)
        super().__init__(
            d, in_channels, out_channels, kernel_size, strides, upsample_kernel_size, filters=filters,
            dropout=dropout, norm_name=norm_name, act_name=act_name, deep_supervision=bool(deep_supervision),
            deep_supr_num=deep_supr_num, res_block=res_block, trans_bias=trans_bias,
        )
        self.pad_mode = check_pad_mode(owner, pad_mode)
        self._divisors = divisor_of(strides, d)
        self.size_divisor = lcm(self._divisors)
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, d)
        f = list(self.filters)
        for i, block in enumerate([self.input_block, *self.downsamples]):
            plan.attach(block, "encoder", f[i], f"encoder stage {i}")
        plan.attach(self.bottleneck, "bottleneck", f[-1], "bottleneck")
        for i, block in enumerate(self.upsamples):  # MONAI lists them deepest first, the order they run
            plan.attach(block, "decoder", f[-2 - i], f"decoder stage {i}")
        plan.install(self)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return DynUNet.forward(self, x)


#: Builder registered as ``dynunet``.
dynunet = register_model(
    "dynunet",
    task="segmentation",
    spatial_dims=(2, 3),
    description="MONAI DynUNet (nnU-Net U-Net; kernels/strides from patch size and spacing, deep supervision); "
    "attention after encoder stages, bottleneck, decoder stages",
    defaults={
        "kernel_size": "from patch_size and spacing",
        "strides": "from patch_size and spacing",
        "upsample_kernel_size": "strides[1:]",
        "filters": "min(2 ** (5 + i), 320 in 3D / 512 in 2D)",
        "dropout": None,
        "norm_name": ("INSTANCE", {"affine": True}),
        "act_name": ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        "deep_supervision": False,
        "deep_supr_num": 1,
        "res_block": False,
        "trans_bias": False,
        "patch_size": "train.patch_size (128^3 / 256^2 without a run)",
        "spacing": "data.preprocess.target_spacing (isotropic when null)",
        "pad_mode": "constant",
    },
    run_context=("patch_size", "spacing"),
    paper="Isensee et al., Nature Methods 2021 (nnU-Net; MONAI DynUNet); attention placement: Roy et al., "
    "IEEE TMI 2019",
)(class_builder(DynUNetWithAttention, "dynunet"))


