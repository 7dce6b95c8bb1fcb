"""Complexity table of the networks x attention blocks, generated from the registries (``medse models``).

- :func:`complexity_table` -- per network, spatial dimension and block: learnable parameters, multiply-adds and
  element-wise operations at (1, C, size^d), and the overhead over ``"none"``; a block or network that does not
  fit is a row with ``error`` set, never an aborted table.
- :func:`format_complexity_table` -- the rows as aligned plain text or Markdown (``docs/results/networks_*.md``).

The blocks' own table is :mod:`medse.attention.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medse.networks.registry import create_model, format_assignment, list_models, run_context_kwargs
from medse.utils.errors import unknown_option_error

__all__ = ["complexity_table", "format_complexity_table"]


def _count(name: str, spatial_dims: int, in_channels: int, out_channels: int, attention: str,
           arch_kwargs: dict[str, Any], size: int) -> tuple[int, dict[str, int]]:
    """(parameters, count_ops result); built and run on the meta device (no memory, no compute) when every
    operation supports it, else on the CPU."""
    import torch

    from medse.utils.complexity import count_ops, count_params

    shape = (1, in_channels, *([size] * spatial_dims))
    arch_kwargs = {**run_context_kwargs(name, (size,) * spatial_dims), **arch_kwargs}
    try:
        with torch.device("meta"):
            model = create_model(name, spatial_dims, in_channels, out_channels, attention=attention, **arch_kwargs)
        return count_params(model), count_ops(model, shape)
    except (NotImplementedError, RuntimeError):  # e.g. SwinUNETR calls .item() while building
        model = create_model(name, spatial_dims, in_channels, out_channels, attention=attention, **arch_kwargs)
        params = count_params(model)
        try:  # count on the meta device all the same: no arithmetic
            return params, count_ops(model.to("meta"), shape)
        except (NotImplementedError, RuntimeError):
            model = create_model(name, spatial_dims, in_channels, out_channels, attention=attention, **arch_kwargs)
            return params, count_ops(model, shape)


def complexity_table(
    size: int = 64,
    dims: Sequence[int] = (2, 3),
    networks: Sequence[str] | None = None,
    attention: Sequence[str] | None = None,
    in_channels: int = 1,
    out_channels: int = 2,
    arch_kwargs: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Parameters and multiply-adds of every network x attention block, with the overhead over ``"none"``.

    One row per (network, spatial_dims, block): ``network, dims, attention, params, params_overhead,
    params_overhead_pct, macs, macs_overhead_pct, elementwise, error``. MACs are those of
    ``medse.utils.complexity.count_ops`` for one input of shape ``(1, in_channels, size, ..., size)``
    (conv, linear and norm layers; ``elementwise`` counts pooling and the blocks' own element-wise work). A
    block that does not fit a network (unsupported ``spatial_dims``, a width the block cannot take) gets a
    row with ``error`` set and no numbers; so does a network that cannot run at this size (SwinUNETR below 64
    voxels per side) or fails otherwise: one network never aborts the table. Models are built on the meta
    device where they can be, so nothing is computed; the +params/+MACs columns stay empty when ``none`` failed.

    Args:
        size: spatial size of the input along every axis. Defaults to 64.
        dims: spatial dimensions to tabulate. Defaults to ``(2, 3)``.
        networks: model names. Defaults to every segmentation model.
        attention: block names (``"none"`` is always added first). Defaults to every registered block.
        in_channels: input channels. Defaults to 1.
        out_channels: output channels. Defaults to 2.
        arch_kwargs: per-network architecture arguments, e.g. ``{"unet": {"num_res_units": 1}}``. Defaults to
            None (the registry defaults).
    """
    models = list_models()
    if networks is None:
        networks = [k for k, v in models.items() if v.task == "segmentation"]
    for n in networks:
        if n not in models:
            raise unknown_option_error("model", n, models)
    if attention is None:
        from medse.attention import list_attention

        attention = [b for b in list_attention() if b != "none"]
    blocks = ["none", *dict.fromkeys(format_assignment(b) for b in attention if b != "none")]
    arch_kwargs = arch_kwargs or {}
    for n in arch_kwargs:
        if n not in models:
            raise unknown_option_error("model", n, models)
    rows: list[dict[str, Any]] = []
    for net in networks:
        kwargs = dict(arch_kwargs.get(net, {}))
        for d in dims:
            if d not in models[net].spatial_dims:
                continue
            base: dict[str, int] | None = None
            for block in blocks:
                row: dict[str, Any] = {"network": net, "dims": d, "attention": block, "params": None,
                                       "params_overhead": None, "params_overhead_pct": None, "macs": None,
                                       "macs_overhead_pct": None, "elementwise": None, "error": ""}
                try:
                    params, ops = _count(net, d, in_channels, out_channels, block, kwargs, size)
                except Exception as e:  # noqa: BLE001 - any failure of one network is its n/a row, not the table's
                    first = (str(e).strip().splitlines() or [""])[0]
                    row["error"] = first if isinstance(e, ValueError) and first else f"{type(e).__name__}: {first}"
                    rows.append(row)
                    continue
                row.update(params=params, macs=ops["macs"], elementwise=ops["elementwise"])
                if block == "none":
                    base = {"params": params, "macs": ops["macs"]}
                if base is not None:
                    row["params_overhead"] = params - base["params"]
                    row["params_overhead_pct"] = 100.0 * (params - base["params"]) / base["params"]
                    row["macs_overhead_pct"] = 100.0 * (ops["macs"] - base["macs"]) / max(base["macs"], 1)
                rows.append(row)
    return rows


def format_complexity_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Render :func:`complexity_table` rows as a Markdown table or aligned plain text."""
    header = ["network", "dims", "attention", "params", "+params", "+params %", "GMACs", "+MACs %",
              "elementwise (M)"]
    lines: list[list[str]] = []
    notes: list[str] = []
    for r in rows:
        if r["error"]:
            notes.append(f"{r['network']} {r['dims']}D {r['attention']}: {r['error']}")
            lines.append([r["network"], f"{r['dims']}D", r["attention"], "n/a", "", "", "", "", ""])
            continue
        def fmt(spec: str, key: str, scale: float = 1.0, r: dict[str, Any] = r) -> str:
            return "" if r[key] is None else format(r[key] / scale if scale != 1.0 else r[key], spec)

        lines.append([
            r["network"],
            f"{r['dims']}D",
            r["attention"],
            fmt(",", "params"),
            fmt("+,", "params_overhead"),
            fmt("+.2f", "params_overhead_pct"),
            fmt(".3f", "macs", 1e9),
            fmt("+.2f", "macs_overhead_pct"),
            fmt(".1f", "elementwise", 1e6),
        ])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i >= 3 else "---"
                                                              for i in range(len(header))) + "|"]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]
    if notes:
        out += ["", "n/a:"] + [f"- {n}" for n in notes]
    return "\n".join(out)
