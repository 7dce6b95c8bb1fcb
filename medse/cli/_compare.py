"""CLI commands of the 'compare' area: ``medse compare``, ``medse explain``, ``medse demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the medse app."""

    @app.command("compare")
    def compare_cmd(
        overrides: list[str] = typer.Argument(
            None, metavar="[KEY=VALUE]...",
            help="Pipeline overrides, e.g. 'seeds=[0,1]' table.structures=true."),
        config: Path = typer.Option(..., "--config", "-c", help="Pipeline YAML (see pipelines/)."),
        output: Path = typer.Option(None, "--output", "-o", help="Output folder. Defaults to runs/compare/<name>."),
        shard: str = typer.Option(None, "--shard", help="Run only shard i of n (0-based 'i/n'), e.g. 0/4."),
        train_set: list[str] = typer.Option(None, "--train-set", "-t",
                                            help="Training override for every cell, e.g. -t train.epochs=2."),
        table_only: bool = typer.Option(False, "--table-only",
                                        help="Only rebuild the table and figures from the records there."),
    ) -> None:
        """Train, predict and evaluate a grid of architectures x blocks x folds/seeds, then write the table.

        Finished cells (records.csv present) are skipped, so rerunning continues an interrupted grid;
        a failed cell is reported and the rest go on; the table is rebuilt from all records at the end.
        """
        from medse.compare.pipeline import load_pipeline, rebuild_outputs, run_compare

        if table_only:
            if shard:
                from medse.utils.errors import MedseError

                raise MedseError("--table-only and --shard cannot be combined")
            cfg = load_pipeline(config, list(overrides or ()))
            out = (output or Path("runs") / "compare" / cfg.name).expanduser().resolve()
            outputs, md = rebuild_outputs(cfg, out, log=typer.echo)
            typer.echo(md or "(no records yet)")
            for k, v in outputs.items():
                typer.echo(f"  {k:22s} {v}")
            return
        report = run_compare(config, output, shard=shard, overrides=list(overrides or ()),
                             train_overrides=list(train_set or ()), log=typer.echo)
        typer.echo("")
        typer.echo(report.table_markdown or "(no table: no cell finished)")
        for k, v in report.outputs.items():
            typer.echo(f"  {k:22s} {v}")
        if report.failed:
            raise typer.Exit(code=1)

    @app.command("explain")
    def explain_cmd(
        run: Path = typer.Option(..., "--run", help="Training run folder."),
        image: list[Path] = typer.Option(..., "--image", help="The scan (repeat for several channels)."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the maps."),
        layers: list[str] = typer.Option(None, "--layers",
                                         help="Gate layers by index or module name (repeatable). Default: all."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best, last or a .pt path."),
        axis: int = typer.Option(2, "--axis", help="Axis of the volume the PNGs slice along."),
        slice_index: int = typer.Option(None, "--slice", help="Slice shown in the PNGs. Default: most varied."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    ) -> None:
        """Save the spatial-gate maps (sSE, scSE, CA, SimAM, PE) of a trained run over a scan: NIfTI + PNG."""
        from medse.cli._options import check_device
        from medse.compare.explain import explain

        device = check_device(device)
        flat: list[str] = []
        for item in layers or []:
            flat += [p for p in item.split(",") if p.strip()]
        res = explain(run, list(image), output, layers=flat or None, checkpoint=checkpoint, axis=axis,
                      slice_index=slice_index, device=device)
        for name, nii, png in zip(res.layers, res.nifti, res.png, strict=True):
            typer.echo(f"{name}: {nii}  {png.name}")
        typer.echo(f"montage: {res.montage}")
        typer.echo(f"summary: {res.summary}")

    @app.command("demo")
    def demo_cmd(
        overrides: list[str] = typer.Argument(
            None, metavar="[KEY=VALUE]...", help="Pipeline overrides, e.g. synthetic.n_cases=12."),
        output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Demo folder."),
        pipeline: Path = typer.Option(None, "--pipeline", help="Grid to run. Defaults to pipelines/demo.yaml."),
        train_set: list[str] = typer.Option(None, "--train-set", "-t",
                                            help="Training override for every model, e.g. -t train.epochs=1."),
        no_explain: bool = typer.Option(False, "--no-explain", help="Skip the gate maps."),
    ) -> None:
        """Synthetic data -> 3D U-Net none / cSE / sSE / scSE -> predict -> evaluate -> table and figures."""
        from medse.compare.demo import run_demo

        run_demo(output, pipeline=pipeline, overrides=list(overrides or ()), train_overrides=list(train_set or ()),
                 explain_maps=not no_explain, log=typer.echo)
