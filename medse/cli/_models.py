"""The models commands: ``medse models``.

``medse models --size 64 [--dims 2 3] [--markdown]`` prints, from the registries, every segmentation network x
attention block with parameters, parameter overhead over ``none`` and multiply-adds at the given input size.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out


def _parse_dims(values: list[str]) -> list[int]:
    dims: list[int] = []
    for v in values:
        if v not in ("2", "3"):
            raise ValueError(f"--dims: expected 2 and/or 3, got '{v}'.")
        if int(v) not in dims:
            dims.append(int(v))
    return dims


def _parse_arch(values: list[str] | None) -> dict[str, dict[str, object]]:
    import yaml

    out: dict[str, dict[str, object]] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        net, dot, arg = key.partition(".")
        if not sep or not dot or not net or not arg:
            raise ValueError(f"--arch: expected NETWORK.ARGUMENT=VALUE (e.g. unet.num_res_units=1), got '{item}'.")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--arch {key}: cannot parse value '{value}' ({e}).") from e
        if isinstance(parsed, list):
            parsed = tuple(parsed)
        out.setdefault(net.strip(), {})[arg.strip()] = parsed
    return out


def register(app: typer.Typer) -> None:
    """Add these commands to the medse app."""

    @app.command("models", context_settings={"allow_extra_args": True})
    def models_cmd(
        ctx: typer.Context,
        size: int = typer.Option(64, "--size", help="Spatial size of the input along every axis."),
        dims: list[str] = typer.Option(
            None, "--dims", help="Spatial dimensions: --dims 2 3, --dims 2,3 or --dims 3. Default: 2 and 3."
        ),
        networks: list[str] = typer.Option(
            None, "--networks", help="Networks (comma-separated). Default: every segmentation network."
        ),
        attention: list[str] = typer.Option(
            None, "--attention", help="Attention blocks (comma-separated; 'none' is always shown), or a per-position "
            "assignment such as --attention encoder=cse,decoder=scse (one per option). Default: all."
        ),
        arch: list[str] = typer.Option(
            None, "--arch", help="Architecture argument for one network, e.g. --arch unet.num_res_units=1 "
            "--arch 'unet.channels=[16,32,64,128]'. Repeatable."
        ),
        in_channels: int = typer.Option(1, "--in-channels", help="Input channels."),
        out_channels: int = typer.Option(2, "--out-channels", help="Output channels (classes)."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
        output: Path = typer.Option(None, "--output", "-o", help="Also write the table to this file."),
        list_only: bool = typer.Option(False, "--list", help="Only list the registered models and defaults."),
    ) -> None:
        """Parameters, parameter overhead over 'none' and multiply-adds of every network x attention block.

        medse models --size 64 --dims 2 3 --markdown
        """
        from medse.networks.placement import cli_choices
        from medse.networks.registry import list_models
        from medse.networks.report import complexity_table, format_complexity_table

        extra = list(ctx.args)
        bad = [a for a in extra if a not in ("2", "3")]
        if bad:
            raise ValueError(f"medse models: unexpected argument(s) {' '.join(bad)} (see medse models --help).")
        if list_only:
            lines = []
            for name, info in list_models().items():
                dims_txt = "/".join(f"{d}D" for d in info.spatial_dims)
                lines.append(f"{name}  [{info.task}, {dims_txt}]  {info.description}")
                if info.defaults:
                    lines.append("    defaults: " + ", ".join(f"{k}={v!r}" for k, v in info.defaults.items()))
            typer.echo("\n".join(lines))
            return
        if size < 1:
            raise ValueError(f"--size must be a positive integer, got {size}.")
        dim_list = _parse_dims(_split(dims) + extra) or [2, 3]
        rows = complexity_table(
            size=size,
            dims=dim_list,
            networks=_split(networks) or None,
            attention=[c.format() for c in cli_choices(attention)] or None,
            in_channels=in_channels,
            out_channels=out_channels,
            arch_kwargs=_parse_arch(arch),
        )
        text = format_complexity_table(rows, markdown=markdown)
        title = (f"input (1, {in_channels}, {size}, {size}[, {size}]), {out_channels} output channels; "
                 "+params %: parameter overhead over 'none'; GMACs: conv/linear/norm multiply-adds; "
                 "elementwise: pooling and attention element-wise operations (millions).")
        typer.echo(title)
        typer.echo(text)
        if output is not None:
            from medse.utils.atomic import atomic_write_text

            atomic_write_text(output, title + "\n\n" + text + "\n")
            typer.echo(f"wrote {output}")
