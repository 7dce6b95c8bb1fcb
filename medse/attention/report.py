"""Efficiency table and documentation page of the attention blocks, generated from the registry.

Used by ``medse blocks`` and by the paper-count tests:

- :func:`efficiency_rows` -- per block and spatial dimension: learnable parameters, multiply-adds at
  (1, C, size^d), element-wise operations, and the overhead relative to a reference 3x3 (2D) / 3x3x3 (3D)
  convolution C -> C (with bias, padding 1) of the same width at the same input size, plus the parameters the
  block adds to a ResNet-50 (one block per bottleneck, stage widths 256x3, 512x4, 1024x6, 2048x3).
- :func:`resnet50_params` -- the parameters added to ResNet-50 by one block per bottleneck (SE: +2,530,992).
- :func:`format_table` -- plain text or Markdown; :func:`blocks_markdown` -- the ``docs/blocks.md`` page.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from medse.attention.registry import create_attention, list_attention, min_channels
from medse.utils.complexity import count_ops, count_params

#: ResNet-50 bottleneck output widths and block counts per stage (He et al. 2016).
RESNET50_STAGES: tuple[tuple[int, int], ...] = ((256, 3), (512, 4), (1024, 6), (2048, 3))
#: Learnable parameters of ResNet-50 with a 1000-class head (torchvision's resnet50).
RESNET50_PARAMS = 25_557_032


def resnet50_params(
    name: str, spatial_dims: int = 2, stage_kwargs: Sequence[dict[str, Any]] | None = None, **kwargs: Any
) -> int:
    """Parameters added to ResNet-50 by one ``name`` block after every bottleneck (widths 256x3 ... 2048x3).

    Args:
        name: registry name (compositions allowed).
        spatial_dims: dimension of the blocks. Defaults to 2.
        stage_kwargs: per-stage keyword arguments (4 dicts), e.g. ECA's ``kernel_size`` 3, 5, 5, 7.
            Defaults to None (the same ``kwargs`` in every stage).
        kwargs: keyword arguments for every block.
    """
    if stage_kwargs is not None and len(stage_kwargs) != len(RESNET50_STAGES):
        raise ValueError(f"resnet50_params: stage_kwargs needs {len(RESNET50_STAGES)} dicts, got {len(stage_kwargs)}.")
    total = 0
    for i, (width, blocks) in enumerate(RESNET50_STAGES):
        kw = {**kwargs, **(stage_kwargs[i] if stage_kwargs is not None else {})}
        total += blocks * count_params(create_attention(name, spatial_dims, width, **kw))
    return total


@functools.lru_cache(maxsize=64)
def _resnet50_default(name: str, spatial_dims: int) -> int:
    """:func:`resnet50_params` with default options, cached (the table asks for it once per block and dim)."""
    return resnet50_params(name, spatial_dims)


def reference_conv(channels: int, size: int, spatial_dims: int) -> tuple[int, int]:
    """(params, MACs) of the reference conv: kernel 3 per axis, C -> C, bias, padding 1, input (1, C, size^d)."""
    k = 3**spatial_dims
    return channels * channels * k + channels, channels * channels * k * size**spatial_dims


def efficiency_rows(channels: int = 64, size: int = 32, dims: Sequence[int] = (2, 3)) -> list[dict[str, Any]]:
    """One row per registered block and supported spatial dimension in ``dims``.

    Row keys: ``block, dims, params, macs, elementwise, params_pct_conv, macs_pct_conv, ops_pct_conv,
    resnet50_params, resnet50_pct, note`` (``note`` is set, and the numbers are None, when the block cannot be
    built at this width or dimension).
    """
    if channels < 1 or size < 1:
        raise ValueError(f"channels and size must be positive, got channels={channels}, size={size}.")
    rows: list[dict[str, Any]] = []
    for name, info in list_attention().items():
        for d in dims:
            row: dict[str, Any] = {"block": name, "dims": d}
            if d not in info.spatial_dims:
                row["note"] = f"{d}D not supported"
                rows.append(row)
                continue
            need = min_channels(name)
            if channels < need or (channels % need and name == "fca"):
                row["note"] = f"needs C >= {need}" + (" and a multiple of it" if name == "fca" else "")
                rows.append(row)
                continue
            block = create_attention(name, d, channels)
            ops = count_ops(block, (1, channels, *([size] * d)))
            conv_p, conv_m = reference_conv(channels, size, d)
            r50 = _resnet50_default(name, d)
            row.update(
                params=count_params(block),
                macs=ops["macs"],
                elementwise=ops["elementwise"],
                params_pct_conv=100.0 * count_params(block) / conv_p,
                macs_pct_conv=100.0 * ops["macs"] / conv_m,
                ops_pct_conv=100.0 * (ops["macs"] + ops["elementwise"]) / conv_m,
                resnet50_params=r50,
                resnet50_pct=100.0 * r50 / RESNET50_PARAMS,
                note="",
            )
            rows.append(row)
    return rows


_COLUMNS = (
    ("block", "block"),
    ("dims", "dims"),
    ("params", "params"),
    ("macs", "MACs"),
    ("elementwise", "elementwise ops"),
    ("params_pct_conv", "params % conv"),
    ("macs_pct_conv", "MACs % conv"),
    ("ops_pct_conv", "MACs+elem % conv"),
    ("resnet50_params", "+params ResNet-50"),
    ("resnet50_pct", "% ResNet-50"),
)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("pct") or "_pct_" in key:
        return f"{value:.2f}"
    if isinstance(value, int) and key != "dims":
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict[str, Any]], markdown: bool = False, channels: int = 64, size: int = 32) -> str:
    """Render :func:`efficiency_rows` as aligned text or a Markdown table, with a caption line."""
    header = [title for _, title in _COLUMNS] + ["note"]
    body = [[_fmt(k, r.get(k)) for k, _ in _COLUMNS] + [r.get("note", "")] for r in rows]
    caption = (
        f"Attention blocks at C={channels}, input (1, C, {size}^d). MACs: conv/linear/norm layers; elementwise: "
        f"means, pools and gate products. Reference conv: 3^d kernel, C->C, bias, same input "
        f"(2D: {reference_conv(channels, size, 2)[0]:,} params, {reference_conv(channels, size, 2)[1]:,} MACs; "
        f"3D: {reference_conv(channels, size, 3)[0]:,} params, {reference_conv(channels, size, 3)[1]:,} MACs). "
        f"ResNet-50: one block per bottleneck (256x3, 512x4, 1024x6, 2048x3), % of {RESNET50_PARAMS:,} params."
    )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return caption + "\n\n" + "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

    def fmt_row(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if 1 < i < len(cells) - 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(row) for row in body]
    return caption + "\n\n" + "\n".join(line.rstrip() for line in lines) + "\n"


def _defaults_text(defaults: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in defaults.items()) or "none"


def _param_names(name: str, spatial_dims: int, channels: int) -> str:
    block = create_attention(name, spatial_dims, channels)
    names = [f"`{n}` {tuple(p.shape)}" for n, p in block.named_parameters()]
    buffers = [
        f"`{n}` {tuple(b.shape)} (buffer)"
        for n, b in block.named_buffers()
        if "running" not in n and "num_batches" not in n
    ]
    return ", ".join(names + buffers) or "none"


def blocks_markdown(channels: int = 64, size: int = 32) -> str:
    """The per-block documentation page (``docs/blocks.md``): paper, defaults, departures, 3D extension,
    parameter formula and names, then the efficiency table."""
    out = [
        "# Attention blocks",
        "",
        "Generated by `medse blocks --docs --output docs/blocks.md` from `medse.attention.list_attention()`;",
        "do not edit by hand. Every block: `create_attention(name, spatial_dims, in_channels, **kwargs)` or the",
        "class `Block(spatial_dims, in_channels, *, ...)`; output shape = input shape. Compositions such as",
        "`eca+ca` build the blocks in sequence (`nn.Sequential`); `{part: {...}}` keywords target one part.",
        "Blocks with a spatial gate take `record_gate=True` and then keep the detached gate in `last_gate`.",
        "Blocks with a fast path take `fused` (a hint: the same numbers either way; each block calls its family's",
        "fused kernel in `medse/attention/kernels/` itself, see `docs/performance.md`).",
        "",
        "Counting conventions (`medse.utils.complexity`): `count_params` counts learnable parameters once each",
        "(BatchNorm running statistics and FcaNet's DCT filters are buffers, not counted). `count_macs` counts",
        "multiply-adds of convolutions / linear layers (biases not counted) and one per element for normalisation",
        "layers; with `elementwise=True` (the table's `elementwise ops` column) also pooling and each block's own",
        "element-wise work (spatial means, gate products, SimAM's energy) as declared by its `extra_macs` method.",
        "Activations are not counted. Reproduce the table with `medse blocks --channels 64 --size 32`.",
        "",
        "## Adding a block",
        "",
        "Register a class with the decorator that registers the built-ins; it takes the metadata shown below",
        "for every block (`fused` and `spatial_gate` are read from the signature: a `fused` / `record_gate`",
        "keyword):",
        "",
        "```python",
        "# my_block.py",
        "import torch",
        "from torch import nn",
        "from medse.attention import register_attention",
        "",
        "@register_attention(\"my_gate\", paper=\"Doe et al. A gate. 2025\", year=2025, params_formula=\"C + 1\",",
        "                    spatial_dims=(2, 3), params_fn=lambda c, d, **_: c + 1)",
        "class MyGate(nn.Module):",
        "    def __init__(self, spatial_dims: int, in_channels: int, *, scale: float = 1.0) -> None:",
        "        super().__init__()",
        "        self.w, self.b, self.scale = nn.Parameter(torch.ones(in_channels)), nn.Parameter(torch.zeros(1)), scale",
        "",
        "    def forward(self, x):",
        "        g = torch.sigmoid(self.scale * self.w * x.mean(dim=tuple(range(2, x.ndim))) + self.b)",
        "        return x * g.reshape(*g.shape, *([1] * (x.ndim - 2)))",
        "```",
        "",
        "`MEDSE_PLUGINS` (module names or `.py` paths separated by `os.pathsep`) makes it visible to every",
        "command: `MEDSE_PLUGINS=$PWD/my_block.py medse blocks`, `... medse train ... model.attention=my_gate`,",
        "`medse compare` grids, and the generated contract tests (`MEDSE_PLUGINS=$PWD/my_block.py pytest",
        "tests/test_contract_blocks.py`). Networks register the same way with",
        "`medse.networks.register_model`. Details: `medse/utils/plugins.py`. A built-in block is the block file",
        "(its `@register_attention(...)` decorator and parameter formula included), its import in",
        "`medse/attention/__init__.py` (the listing order) and its reference transcription in",
        "`tests/test_attention_reference.py`; regenerate this page with `medse blocks --docs --output docs/blocks.md`.",
        "",
    ]
    for name, info in list_attention().items():
        out.append(f"## `{name}`")
        out.append("")
        if info.cls is None:
            out += ["`nn.Identity()`: the baseline without attention; any keyword arguments are ignored.", ""]
            continue
        d_show = 3 if 3 in info.spatial_dims else info.spatial_dims[-1]
        c_show = max(channels, min_channels(name))
        out += [
            f"- class: `{info.cls.__module__}.{info.cls.__name__}`",
            f"- paper: {info.paper}" + (f" ({info.year})" if info.year and str(info.year) not in info.paper else ""),
            f"- reference code: {info.repo or 'none pinned'}",
            f"- spatial dims: {', '.join(map(str, info.spatial_dims))}",
            f"- defaults: {_defaults_text(info.defaults)}",
            f"- learnable parameters: `{info.params_formula}`",
            f"- parameter names ({d_show}D, C={c_show}): {_param_names(name, d_show, c_show)}",
            f"- spatial gate (`record_gate`): {'yes' if info.spatial_gate else 'no'}; `fused` fast path: "
            f"{'yes' if info.fused else 'no'}",
            f"- medse's extension (NOTE: not in paper): {info.extension or 'none'}",
            f"- departures: {info.departures or 'none'}",
            f"- minimum channels: {min_channels(name)}",
            "",
        ]
        doc = (info.cls.__doc__ or "").strip().split("\n\n")[0]
        if doc:
            out += [" ".join(line.strip() for line in doc.splitlines()), ""]
    out += ["## Efficiency table", "", format_table(efficiency_rows(channels, size), True, channels, size)]
    out += [
        "## Reproduced paper counts (tests/test_complexity.py)",
        "",
        f"- SE on ResNet-50, r=16: +{resnet50_params('se'):,} parameters (paper: +2,530,992 with biases).",
        "- ECA on ResNet-50, k = [3, 5, 5, 7] per stage: "
        f"+{resnet50_params('eca', stage_kwargs=[{'kernel_size': k} for k in (3, 5, 5, 7)])} parameters "
        "(paper: 80).",
        "- cSE, r=2: equal to `monai.networks.blocks.ChannelSELayer(spatial_dims, C, r=2)` to 1e-6 with copied "
        "weights in 1D, 2D and 3D.",
        f"- CBAM on ResNet-50, r=16, 7x7 spatial gate: +{resnet50_params('cbam'):,} parameters, "
        f"{(RESNET50_PARAMS + resnet50_params('cbam')) / 1e6:.2f}M in all (paper: 28.09M).",
        "",
    ]
    return "\n".join(out)


def registry_table(markdown: bool = True) -> str:
    """One row per registered block, straight from :func:`list_attention` (so it is never stale): name, paper,
    supported dimensions, learnable-parameter formula, defaults, and what is medse's own."""
    from medse.attention.registry import list_attention

    head = ["name", "paper", "dims", "params", "defaults", "medse's own"]
    rows = []
    for name, info in list_attention().items():
        if name == "none":
            continue
        dims = "/".join(f"{d}D" for d in info.spatial_dims)
        defaults = ", ".join(f"{k}={v}" for k, v in info.defaults.items()) or "-"
        rows.append([f"`{name}`", info.paper, dims, info.params_formula or "-", defaults, info.extension or "-"])
    if not markdown:
        return "\n".join("  ".join(r) for r in [head, *rows]) + "\n"
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines) + "\n"
