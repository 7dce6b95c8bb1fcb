"""The attention registry: names -> block classes with metadata, and the factory used by every network.

``create_attention(name, spatial_dims, in_channels, **kwargs)`` builds a block by name; ``"none"`` gives
``nn.Identity``; ``"a+b"`` builds the blocks in sequence (``nn.Sequential``, the survey's "hybrid" direction).
``list_attention()`` returns the metadata; ``min_channels(name, **kwargs)`` the smallest valid width.

Blocks join the registry with the :func:`register_attention` decorator, the built-ins (below) as well as user
blocks in their own files, which the ``MEDSE_PLUGINS`` environment variable makes visible everywhere
(:mod:`medse.plugins`, loaded on the first use of the registry)::

    from medse.attention import register_attention

    @register_attention("my_gate", paper="Me et al. 2025", year=2025, params_formula="C + 1")
    class MyGate(nn.Module):
        def __init__(self, spatial_dims: int, in_channels: int, *, reduction: int = 4) -> None: ...
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from medse.attention.cbam import CBAM, CBAMChannelGate, CBAMSpatialGate
from medse.attention.coord import CoordAttention
from medse.attention.eca import ECA, eca_kernel_size
from medse.attention.ela import EfficientLocalAttention, group_count
from medse.attention.ema import EfficientMultiScaleAttention
from medse.attention.fca import FcaAttention, freq_indices
from medse.attention.grn import GlobalResponseNorm
from medse.attention.pe import ProjectExcite
from medse.attention.scse import SCSE, SpatialSE
from medse.attention.se import ChannelSE, SqueezeExcitation
from medse.attention.simam import SimAM
from medse.attention.spse import SPSE
from medse.plugins import ENV_VAR, load_plugins
from medse.utils.errors import did_you_mean, unknown_option_error

# Keywords every block accepts through create_attention even where the block has no use for them:
# ``fused`` is a performance hint (dropped for blocks without a fast path).
_HINTS = ("fused",)


@dataclass(frozen=True)
class AttentionInfo:
    """Metadata of a registered attention block.

    Attributes:
        name: registry name.
        cls: the block class (``None`` for ``"none"``, built as ``nn.Identity``).
        paper: the paper (authors, title, venue).
        year: publication year.
        repo: the authors' (or reference) repository, empty if none.
        params_formula: the learnable-parameter formula, C = in_channels, r = reduction.
        spatial_dims: supported spatial dimensions.
        defaults: the keyword defaults create_attention applies for this name.
        extension: what is medse's own (not in the paper), empty if nothing.
        spatial_gate: True when the block has a spatial gate (``record_gate`` / ``last_gate``).
        departures: where medse departs from the paper or the authors' code, empty if nowhere.
        fused: True when the block takes the ``fused`` keyword (it has a fast path).
        params_fn: ``params_fn(C, spatial_dims, **kwargs) -> int``, the formula as a function (None: not given;
            the generated tests then skip the formula check).
        channel_rule: ``channel_rule(**kwargs) -> (lower, multiple)``: the widths the block accepts with these
            keyword arguments are the multiples of ``multiple`` that are at least ``lower`` (used by
            :func:`min_channels`).
    """

    name: str
    cls: type[nn.Module] | None
    paper: str
    year: int
    repo: str
    params_formula: str
    spatial_dims: tuple[int, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    extension: str = ""
    spatial_gate: bool = False
    departures: str = ""
    fused: bool = False
    params_fn: Callable[..., int] | None = None
    channel_rule: Callable[..., tuple[int, int]] | None = field(default=None, repr=False, compare=False)


def _se_params(c: int, d: int, reduction: float = 16, **_: Any) -> int:
    h = int(c // reduction)
    return 2 * c * h + h + c


def _scse_params(c: int, d: int, reduction: float = 2, **_: Any) -> int:
    return _se_params(c, d, reduction) + c + 1


def _eca_params(c: int, d: int, kernel_size: int | None = None, gamma: float = 2, b: float = 1, **_: Any) -> int:
    return kernel_size if kernel_size is not None else eca_kernel_size(c, gamma, b)


def _fca_params(c: int, d: int, reduction: float = 16, **_: Any) -> int:
    return 2 * c * int(c // reduction)


def _ca_params(c: int, d: int, reduction: int = 32, min_mip: int = 8, **_: Any) -> int:
    mip = max(min_mip, c // reduction)
    return (d + 1) * c * mip + 3 * mip + d * c


def _spse_params(c: int, d: int, reduction: float = 16, levels: tuple[int, ...] = (1, 2, 4), **_: Any) -> int:
    h = int(c // reduction)
    return c * sum(lv**d + 1 for lv in levels) + 2 * c + 2 * c * h + h + c


def _reduction_rule(reduction: float | None = None, **_: Any) -> tuple[int, int]:
    """Blocks with a hidden layer of C // r units: C >= r."""
    return (1 if reduction is None else math.ceil(reduction)), 1


def _fca_rule(reduction: float | None = None, frequencies: Any = None, freq_method: str = "top16",
              **_: Any) -> tuple[int, int]:
    """FcaNet: C >= r and C a multiple of the number of frequencies (one DCT frequency per channel group)."""
    n = len(frequencies) if frequencies else len(freq_indices(freq_method))
    return _reduction_rule(reduction)[0], n


def _free_rule(**_: Any) -> tuple[int, int]:
    """Any width (Coordinate attention's reduction only sets mip = max(min_mip, C // r))."""
    return 1, 1


_HU = "Hu, Shen, Sun. Squeeze-and-Excitation Networks. CVPR 2018 (arXiv:1709.01507)"
_ROY = (
    "Roy, Navab, Wachinger. Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional "
    "Networks. MICCAI 2018 (arXiv:1803.02579); IEEE TMI 2019 (arXiv:1808.08127)"
)
_ROY_REPO = "https://github.com/ai-med/squeeze_and_excitation"

_REGISTRY: dict[str, AttentionInfo] = {
    "none": AttentionInfo(
        name="none",
        cls=None,
        paper="no attention (baseline)",
        year=0,
        repo="",
        params_formula="0",
        spatial_dims=(1, 2, 3),
        params_fn=lambda c, d, **_: 0,
        channel_rule=_free_rule,
    )
}


_BlockT = TypeVar("_BlockT", bound=type[nn.Module])


def _accepted(cls: type[nn.Module]) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_attention(
    name: str,
    *,
    paper: str,
    year: int,
    repo: str = "",
    params_formula: str = "",
    spatial_dims: Sequence[int] = (1, 2, 3),
    defaults: dict[str, Any] | None = None,
    extension: str = "",
    spatial_gate: bool | None = None,
    departures: str = "",
    params_fn: Callable[..., int] | None = None,
    channel_rule: Callable[..., tuple[int, int]] | None = None,
) -> Callable[[_BlockT], _BlockT]:
    """Class decorator registering an attention block under ``name`` with its :class:`AttentionInfo`.

    The block is then built by :func:`create_attention` (so by every network's ``attention=`` argument and
    every config's ``model.attention``), listed by :func:`list_attention` (``medse blocks``, ``medse compare``,
    the generated tests) and counted by :func:`min_channels`. Decorators stack: one class may be registered
    under several names with different defaults (``scse`` and ``scse_smp``).

    The class is built as ``cls(spatial_dims, in_channels, **kwargs)``; its options must be keyword-only.
    A block that records a spatial gate takes ``record_gate`` (and sets ``last_gate``); a block with a fast
    path takes ``fused``. Both are read from the signature.

    Args:
        name: registry name: lower case letters, digits and ``_``, starting with a letter; not ``none``.
        paper: the paper (authors, title, venue).
        year: publication year.
        repo: the authors' (or reference) repository. Defaults to "".
        params_formula: the learnable-parameter formula, for the docs (C = in_channels, r = reduction).
        spatial_dims: supported spatial dimensions, a subset of (1, 2, 3). Defaults to (1, 2, 3).
        defaults: keyword defaults :func:`create_attention` applies for this name (must be accepted by the
            class). Defaults to none.
        extension: what is medse's (or your) own, not in the paper. Defaults to "".
        spatial_gate: whether the block has a spatial gate. Defaults to: the class takes ``record_gate``.
        departures: where the block departs from the paper or the authors' code. Defaults to "".
        params_fn: ``params_fn(C, spatial_dims, **kwargs) -> int``, checked by the generated tests. Defaults to
            None (not checked).
        channel_rule: ``channel_rule(**kwargs) -> (lower, multiple)``; see :class:`AttentionInfo`. Defaults to:
            ``C >= ceil(reduction)`` if the class takes ``reduction``, else any width.

    Raises:
        ValueError: bad name, a name taken by another class, unsupported dimensions, a class that is not an
            ``nn.Module``, or defaults the class does not accept.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "none":
        raise ValueError(
            f"register_attention: name must be lower case letters, digits and '_' (not 'none'), got {name!r}."
        )
    dims = tuple(int(d) for d in spatial_dims)
    if not dims or not set(dims) <= {1, 2, 3}:
        raise ValueError(f"register_attention('{name}'): spatial_dims must be a non-empty subset of (1, 2, 3), "
                         f"got {tuple(spatial_dims)!r}.")
    if isinstance(year, bool) or not isinstance(year, int):
        raise ValueError(f"register_attention('{name}'): year must be an integer, got {year!r}.")

    def decorator(cls: _BlockT) -> _BlockT:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"register_attention('{name}'): expected an nn.Module subclass, got {cls!r}.")
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.cls) != _qualname(cls):
            raise ValueError(f"register_attention: '{name}' is already registered by {_qualname(old.cls)}.")
        accepted = _accepted(cls)
        unknown = sorted(set(defaults or {}) - accepted)
        if unknown:
            raise ValueError(
                f"register_attention('{name}'): default '{unknown[0]}' is not a keyword-only argument of "
                f"{cls.__name__}.{did_you_mean(unknown[0], accepted)} Accepted: {', '.join(sorted(accepted)) or 'none'}."
            )
        rule = channel_rule or (_reduction_rule if "reduction" in accepted else _free_rule)
        _REGISTRY[name] = AttentionInfo(
            name=name,
            cls=cls,
            paper=paper,
            year=year,
            repo=repo,
            params_formula=params_formula,
            spatial_dims=dims,
            defaults=dict(defaults or {}),
            extension=extension,
            spatial_gate=("record_gate" in accepted) if spatial_gate is None else bool(spatial_gate),
            departures=departures,
            fused="fused" in accepted,
            params_fn=params_fn,
            channel_rule=rule,
        )
        return cls

    return decorator


register_attention(
    "se",
    paper=_HU,
    year=2018,
    repo="https://github.com/hujie-frank/SENet",
    params_formula="2*C*(C//r) + C//r + C, r=16",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16},
    extension="1D and 3D (the paper is 2D; the formula has no spatial axis to adapt).",
    departures="Biases in both FC layers as in the authors' Caffe models (the paper's count ignores them).",
    params_fn=_se_params,
)(SqueezeExcitation)
register_attention(
    "cse",
    paper=_ROY,
    year=2018,
    repo=_ROY_REPO,
    params_formula="2*C*(C//r) + C//r + C, r=2",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 2},
    extension="1D (the authors define 2D and 3D).",
    departures="",
    params_fn=lambda c, d, reduction=2, **kw: _se_params(c, d, reduction),
)(ChannelSE)
register_attention(
    "sse",
    paper=_ROY,
    year=2018,
    repo=_ROY_REPO,
    params_formula="C + 1",
    spatial_dims=(1, 2, 3),
    extension="1D (the authors define 2D and 3D).",
    spatial_gate=True,
    params_fn=lambda c, d, **_: c + 1,
)(SpatialSE)
register_attention(
    "scse",
    paper=_ROY,
    year=2018,
    repo=_ROY_REPO,
    params_formula="2*C*(C//r) + C//r + 2C + 1, r=2",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 2, "aggregation": "max"},
    extension="1D; aggregation 'mul' (offered for comparison only).",
    spatial_gate=True,
    departures=(
        "Default aggregation is the element-wise maximum of the authors' code and TMI paper; the MICCAI "
        "paper adds the branches (aggregation='add')."
    ),
    params_fn=_scse_params,
)(SCSE)
register_attention(
    "scse_smp",
    paper=_ROY + "; preset of segmentation_models_pytorch's SCSEModule",
    year=2018,
    repo="https://github.com/qubvel-org/segmentation_models.pytorch",
    params_formula="2*C*(C//r) + C//r + 2C + 1, r=16",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "aggregation": "add"},
    extension="1D and 3D (smp's module is 2D).",
    spatial_gate=True,
    departures="smp's choices: addition of the branches and r=16.",
    params_fn=lambda c, d, reduction=16, **kw: _scse_params(c, d, reduction),
)(SCSE)
register_attention(
    "eca",
    paper="Wang, Wu, Zhu, Li, Zuo, Hu. ECA-Net: Efficient Channel Attention for Deep CNNs. CVPR 2020 "
    "(arXiv:1910.03151)",
    year=2020,
    repo="https://github.com/BangguWu/ECANet",
    params_formula="k, k = adaptive odd(int((log2(C) + 1) / 2)) or given",
    spatial_dims=(1, 2, 3),
    defaults={"kernel_size": None},
    extension="1D and 3D.",
    departures="Even kernel sizes are rejected (the authors' padding would shorten the channel axis).",
    params_fn=_eca_params,
)(ECA)
register_attention(
    "fca",
    paper="Qin, Zhang, Wu, Li. FcaNet: Frequency Channel Attention Networks. ICCV 2021 (arXiv:2012.11879)",
    year=2021,
    repo="https://github.com/cfzd/FcaNet",
    params_formula="2*C*(C//r), r=16 (DCT filters are a buffer)",
    spatial_dims=(2, 3),
    defaults={"reduction": 16, "freq_method": "top16", "dct_size": 7},
    extension=(
        "3D: a 3D DCT basis; the 2D (u, v) pair applies to the last two spatial axes, frequency 0 on the "
        "first, unless explicit 3D frequencies are given."
    ),
    departures="dct_size defaults to 7 (the frequency grid); the authors' ResNet uses 56/28/14/7 by stage.",
    params_fn=_fca_params,
    channel_rule=_fca_rule,
)(FcaAttention)
register_attention(
    "ca",
    paper="Hou, Zhou, Feng. Coordinate Attention for Efficient Mobile Network Design. CVPR 2021 (arXiv:2103.02907)",
    year=2021,
    repo="https://github.com/houqb/CoordAttention",
    params_formula="2D: 3*C*mip + 3*mip + 2C; 3D: 4*C*mip + 3*mip + 3C; mip = max(8, C//32)",
    spatial_dims=(2, 3),
    defaults={"reduction": 32, "min_mip": 8},
    extension="3D: one strip per axis (D, H, W), one shared conv/BN/h_swish, three directional gates.",
    spatial_gate=True,
    params_fn=_ca_params,
    channel_rule=_free_rule,
)(CoordAttention)
register_attention(
    "simam",
    paper="Yang, Zhang, Li, Xie. SimAM: A Simple, Parameter-Free Attention Module for CNNs. ICML 2021",
    year=2021,
    repo="https://github.com/ZjjConan/SimAM",
    params_formula="0",
    spatial_dims=(1, 2, 3),
    defaults={"e_lambda": 1e-4},
    extension="1D and 3D (the energy is defined per channel over any number of positions).",
    spatial_gate=True,
    departures=(
        "n = max(N-1, 1) so a single spatial position gives sigmoid(0.5) instead of NaN; energy in float32 "
        "for half-precision inputs. lambda=1e-4 is the module default (the authors' ImageNet/COCO runs: 0.1)."
    ),
    params_fn=lambda c, d, **_: 0,
)(SimAM)
register_attention(
    "spse",
    paper="Jin, Xie, Wang, Chen, Liang. Delving deep into spatial pooling for squeeze-and-excitation "
    "networks. Pattern Recognition 2022",
    year=2022,
    repo="",
    params_formula="C*sum_l(l^d + 1) + 2C + 2*C*(C//r) + C//r + C; 2D levels (1,2,4): 2C*(C//16) + C//16 + 27C",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "levels": (1, 2, 4)},
    extension="1D and 3D: each level pools to l cells per axis (l^d cells), depthwise kernel l per axis.",
    departures="Training with a batch of one normalises with the running statistics (BatchNorm is undefined).",
    params_fn=_spse_params,
)(SPSE)
register_attention(
    "pe",
    paper="Rickmann, Roy, Sarasua, Navab, Wachinger. 'Project & Excite' Modules for Segmentation of "
    "Volumetric Medical Scans. MICCAI 2019 (arXiv:1906.04649)",
    year=2019,
    repo=_ROY_REPO,
    params_formula="2*C*(C//r) + C//r + C, r=2",
    spatial_dims=(3,),
    defaults={"reduction": 2},
    spatial_gate=True,
    params_fn=lambda c, d, reduction=2, **kw: _se_params(c, d, reduction),
)(ProjectExcite)


# --- blocks since 2021 (REFERENCE.md "Blocks since 2021") ---------------------------------------------------


def _cbam_spatial_params(c: int, d: int, kernel_size: int = 7, **_: Any) -> int:
    return 2 * kernel_size**d + 2


def _ela_params(c: int, d: int, kernel_size: int = 7, groups: int | None = None, **_: Any) -> int:
    return c * (c // (groups or c)) * kernel_size + 2 * c


def _ela_rule(groups: int | None = None, **_: Any) -> tuple[int, int]:
    """ELA: any width (GroupNorm groups adapt), a multiple of the convolution's groups when they are given."""
    return 1, (groups or 1)


def _ema_params(c: int, d: int, factor: int = 32, **_: Any) -> int:
    cg = c // group_count(factor, c)
    return cg * cg * (1 + 3**d) + 4 * cg


_WOO_CBAM = "Woo, Park, Lee, Kweon. CBAM: Convolutional Block Attention Module. ECCV 2018 (arXiv:1807.06521)"
_CBAM_REPO = "https://github.com/Jongchan/attention-module"
_CBAM_3D = ("1D and 3D: pools over all spatial axes and a k^d spatial convolution (7x7x7 in 3D, as requested on "
            "the authors' repository, issue #46 / PR #53).")

register_attention(
    "grn",
    paper="Woo, Debnath, Hu, Chen, Liu, Kweon, Xie. ConvNeXt V2: Co-designing and Scaling ConvNets with Masked "
    "Autoencoders. CVPR 2023 (arXiv:2301.00808)",
    year=2023,
    repo="https://github.com/facebookresearch/ConvNeXt-V2",
    params_formula="2C",
    spatial_dims=(1, 2, 3),
    defaults={"eps": 1e-6},
    extension="1D (ConvNeXt V2 is 2D; 3D is MONAI's MedNeXt global_resp_norm, which medse equals).",
    departures=(
        "Channels-first (B, C, *spatial) where the authors' GRN is channels-last (same numbers); the norm is "
        "accumulated in float32 for half-precision inputs. gamma = beta = 0 at construction, as the authors': the "
        "block starts as the identity."
    ),
    params_fn=lambda c, d, **_: 2 * c,
)(GlobalResponseNorm)
register_attention(
    "cbam",
    paper=_WOO_CBAM,
    year=2018,
    repo=_CBAM_REPO,
    params_formula="2*C*(C//r) + C//r + C + 2*k^d + 2, r=16, k=7",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "pool_types": ("avg", "max"), "kernel_size": 7},
    extension=_CBAM_3D,
    departures=(
        "Training with one value per BatchNorm channel in the spatial gate (batch 1, one position) normalises "
        "with the running statistics (BatchNorm is undefined there)."
    ),
    params_fn=lambda c, d, reduction=16, kernel_size=7, **_: _se_params(c, d, reduction)
    + _cbam_spatial_params(c, d, kernel_size),
)(CBAM)
register_attention(
    "cbam_channel",
    paper=_WOO_CBAM + "; its channel attention (ChannelGate)",
    year=2018,
    repo=_CBAM_REPO,
    params_formula="2*C*(C//r) + C//r + C, r=16",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "pool_types": ("avg", "max")},
    extension="1D and 3D: average and maximum over all spatial axes.",
    params_fn=lambda c, d, reduction=16, **_: _se_params(c, d, reduction),
)(CBAMChannelGate)
register_attention(
    "cbam_spatial",
    paper=_WOO_CBAM + "; its spatial attention (SpatialGate)",
    year=2018,
    repo=_CBAM_REPO,
    params_formula="2*k^d + 2, k=7",
    spatial_dims=(1, 2, 3),
    defaults={"kernel_size": 7},
    extension=_CBAM_3D,
    departures="As cbam's spatial gate (running statistics for a single value per BatchNorm channel in training).",
    params_fn=_cbam_spatial_params,
)(CBAMSpatialGate)
register_attention(
    "ela",
    paper="Xu, Wan. ELA: Efficient Local Attention for Deep Convolutional Neural Networks. arXiv:2403.01123 (2024)",
    year=2024,
    repo="",
    params_formula="C*(C/groups)*k + 2C; default (depthwise, k=7): 9C",
    spatial_dims=(2, 3),
    defaults={"kernel_size": 7, "groups": None, "gn_groups": 16},
    extension="3D: one strip per axis (D, H, W) through the same 1D convolution and GroupNorm, three gates.",
    departures=(
        "No official code: the paper's equations and listing (kernel 7, depthwise, no bias, GroupNorm(16), "
        "convolution and GroupNorm shared by the strips, statistics per strip). GroupNorm groups are "
        "gcd(gn_groups, C) where C is not a multiple of gn_groups. timm's EfficientLocalAttn differs (one "
        "convolution per axis, one GroupNorm group)."
    ),
    params_fn=_ela_params,
    channel_rule=_ela_rule,
)(EfficientLocalAttention)
register_attention(
    "ema",
    paper="Ouyang, He, Zhang, Luo, Guo, Zhan, Huang. Efficient Multi-Scale Attention Module with Cross-Spatial "
    "Learning. ICASSP 2023 (arXiv:2305.13563)",
    year=2023,
    repo="https://github.com/YOLOonMe/EMA-attention-module",
    params_formula="c^2*(1 + 3^d) + 4c, c = C/G, G = gcd(32, C) groups",
    spatial_dims=(2, 3),
    defaults={"factor": 32},
    extension="3D: strips along D, H, W through the shared 1x1x1 conv, three gates, 3x3x3 conv, softmax weighting "
    "over all voxels.",
    departures=(
        "G = gcd(factor, C) groups, so any width works; for C a multiple of factor (32) this is the authors' "
        "grouping (their code fails for other widths)."
    ),
    params_fn=_ema_params,
    channel_rule=_free_rule,
)(EfficientMultiScaleAttention)


def list_attention() -> dict[str, AttentionInfo]:
    """All registered blocks, name -> :class:`AttentionInfo` (composition names are not listed): the built-ins in
    registration order, then the blocks of the ``MEDSE_PLUGINS`` modules."""
    load_plugins()
    return dict(_REGISTRY)


def _split_names(name: object) -> list[str]:
    load_plugins()
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"attention name must be a non-empty string, got {name!r}.")
    parts = [p.strip().lower() for p in name.split("+")]
    for p in parts:
        if p not in _REGISTRY:
            err = unknown_option_error("attention block", p, _REGISTRY)
            raise ValueError(f"{err} (Blocks of your own: name their module in {ENV_VAR}.)")
    if len(parts) > 1 and "none" in parts:
        raise ValueError(f"attention '{name}': 'none' cannot be combined with other blocks.")
    return parts


def _kwargs_for(parts: list[str], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Route keyword arguments to the parts of a (possibly composite) name.

    A keyword whose name is a part's name and whose value is a dict goes to that part only; any other keyword
    goes to every part that accepts it; a keyword no part accepts raises ValueError (``fused`` excepted).
    """
    per_part: list[dict[str, Any]] = [dict(_REGISTRY[p].defaults) for p in parts]
    shared = {k: v for k, v in kwargs.items() if not (k in parts and isinstance(v, dict))}
    for i, p in enumerate(parts):
        if p in kwargs and isinstance(kwargs[p], dict):
            per_part[i].update(kwargs[p])
    accepted = [_accepted(_REGISTRY[p].cls) for p in parts]  # type: ignore[arg-type]
    for key, value in shared.items():
        takers = [i for i, acc in enumerate(accepted) if key in acc]
        if not takers and key not in _HINTS:
            options = sorted(set().union(*accepted))
            raise ValueError(
                f"attention '{'+'.join(parts)}': unknown argument '{key}'.{did_you_mean(key, options)} "
                f"Accepted: {', '.join(options) or 'none'}."
            )
        for i in takers:
            per_part[i][key] = value
    for i, p in enumerate(parts):
        unknown = set(per_part[i]) - accepted[i]
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(
                f"attention '{p}': unknown argument '{key}'.{did_you_mean(key, accepted[i])} "
                f"Accepted: {', '.join(sorted(accepted[i])) or 'none'}."
            )
    return per_part


def create_attention(name: str, spatial_dims: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build an attention block by registry name.

    Args:
        name: a registered name (see :func:`list_attention`), or several joined by ``+`` (e.g. ``"eca+ca"``),
            built in sequence as an ``nn.Sequential``. ``"none"`` gives ``nn.Identity`` and ignores ``kwargs``.
        spatial_dims: number of spatial dimensions (1, 2 or 3; each block lists what it supports).
        in_channels: number of input (= output) channels.
        kwargs: block options. For a composition, ``{part_name: {...}}`` targets one part; other keywords go to
            every part accepting them. ``fused`` is a hint accepted by every block.

    Raises:
        ValueError: unknown name (with a suggestion), unknown option, or invalid arguments for the block.
    """
    parts = _split_names(name)
    if parts == ["none"]:
        if isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
            raise ValueError(f"attention 'none': spatial_dims must be one of {{1, 2, 3}}, got {spatial_dims!r}.")
        return nn.Identity()
    for p in parts:
        dims = _REGISTRY[p].spatial_dims
        if isinstance(spatial_dims, bool) or spatial_dims not in dims:
            sup = ", ".join(map(str, dims))
            hint = " (Project & Excite is defined for volumes only)" if p == "pe" else ""
            raise ValueError(f"attention '{p}': spatial_dims must be one of {{{sup}}}, got {spatial_dims!r}{hint}.")
    blocks = [
        _REGISTRY[p].cls(spatial_dims, in_channels, **kw)  # type: ignore[misc]
        for p, kw in zip(parts, _kwargs_for(parts, kwargs), strict=True)
    ]
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


def min_channels(name: str, **kwargs: Any) -> int:
    """The smallest ``in_channels`` for which ``create_attention(name, ..., **kwargs)`` is valid.

    From each block's ``channel_rule`` (:class:`AttentionInfo`): the reduction (C // r >= 1) and FcaNet's
    divisibility by the number of frequencies; for a composition the smallest width valid for every part.
    """
    parts = _split_names(name)
    if parts == ["none"]:
        return 1
    per_part = _kwargs_for(parts, kwargs)
    lower = 1
    multiple = 1
    for p, kw in zip(parts, per_part, strict=True):
        rule = _REGISTRY[p].channel_rule or _free_rule
        lo, mult = rule(**kw)
        lower = max(lower, int(lo))
        multiple = math.lcm(multiple, int(mult))
    return math.ceil(lower / multiple) * multiple
