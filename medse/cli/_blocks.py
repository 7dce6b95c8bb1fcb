"""The blocks commands: ``medse blocks`` (efficiency table / documentation page of the blocks)."""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_dims(values: list[str] | None, extra: list[str]) -> list[int]:
    """``--dims 2 3``, ``--dims 2 --dims 3`` and ``--dims 2,3`` all give [2, 3]."""
    tokens: list[str] = []
    for v in (values or []) + extra:
        tokens += [t for t in v.replace(",", " ").split() if t]
    if not tokens:
        return [2, 3]
    dims: list[int] = []
    for t in tokens:
        if t not in ("1", "2", "3"):
            raise ValueError(f"--dims: expected spatial dimensions among 1, 2, 3, got {t!r}.")
        if int(t) not in dims:
            dims.append(int(t))
    return dims


def register(app: typer.Typer) -> None:
    """Add these commands to the medse app."""

    @app.command(
        "blocks",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
    )
    def blocks(
        ctx: typer.Context,
        channels: int = typer.Option(64, "--channels", help="Channel width C of every block.", min=1),
        size: int = typer.Option(32, "--size", help="Input size per spatial axis: input (1, C, size^d).", min=1),
        dims: list[str] = typer.Option(
            None, "--dims", help="Spatial dimensions to tabulate, e.g. '--dims 2 3' or '--dims 2,3'. Default: 2 3."
        ),
        markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown."),
        docs: bool = typer.Option(False, "--docs", help="Print the per-block documentation page (docs/blocks.md)."),
        list_: bool = typer.Option(False, "--list", help="List the registered blocks (paper, dimensions, parameter "
                                   "formula, medse's own extension) from the registry; Markdown with --markdown."),
        output: Path | None = typer.Option(None, "--output", help="Write to this file (atomically) instead of stdout."),
    ) -> None:
        """Efficiency table of every registered attention block: params, MACs, overhead (2D and 3D)."""
        from medse.attention.report import blocks_markdown, efficiency_rows, format_table, registry_table
        from medse.utils.atomic import atomic_write_text

        extra = list(ctx.args)
        if extra and not dims:
            raise ValueError(f"unexpected arguments: {' '.join(extra)}")
        dim_list = _parse_dims(dims, extra)
        if list_:
            text = registry_table(markdown)
        elif docs:
            text = blocks_markdown(channels, size)
        else:
            text = format_table(efficiency_rows(channels, size, dim_list), markdown, channels, size)
        if output is not None:
            atomic_write_text(output, text)
            typer.echo(f"wrote {output}")
        else:
            typer.echo(text, nl=False)
