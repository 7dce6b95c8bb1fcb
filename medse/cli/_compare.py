"""The compare commands: ``medse compare``, ``medse search``, ``medse explain``, ``medse demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def _exit_if_incomplete(incomplete: list[str], allow: bool) -> None:
    """Exit 1 (with a warning on stderr) when the table does not rest on the whole grid, unless ``allow``."""
    if not incomplete:
        return
    shown = "; ".join(incomplete[:3]) + (f"; ... ({len(incomplete)} in all)" if len(incomplete) > 3 else "")
    if allow:
        typer.echo(f"warning: incomplete table (--allow-incomplete): {shown}", err=True)
        return
    typer.echo(f"error: the table is incomplete: {shown}; see the table's notes (pass --allow-incomplete to accept "
               "it)", err=True)
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add these commands to the medse app."""

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
        allow_incomplete: bool = typer.Option(False, "--allow-incomplete",
                                              help="Exit 0 even when runs or cases are unmatched or cells failed."),
        retrain_stale: bool = typer.Option(False, "--retrain-stale",
                                           help="Retrain finished cells made with other settings (else refused)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Retrain every cell, finished or not."),
    ) -> None:
        """Train, predict and evaluate a grid of architectures x blocks x folds/seeds, then write the table.

        Finished cells made with the same resolved config, data and medse version are skipped, so rerunning
        continues an interrupted grid; cells made with other settings are refused (naming the keys) until
        --retrain-stale or --overwrite. A failed cell is reported and the rest go on. Each row of the table rests
        on the runs (fold, seed) present for both it and the baseline; unmatched runs or cases and failed cells
        are listed and make the exit code 1 unless --allow-incomplete.
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
            from medse.compare.pipeline import _incomplete

            _exit_if_incomplete(_incomplete(out), allow_incomplete)
            return
        report = run_compare(config, output, shard=shard, overrides=list(overrides or ()),
                             train_overrides=list(train_set or ()), log=typer.echo, retrain_stale=retrain_stale,
                             overwrite=overwrite)
        typer.echo("")
        typer.echo(report.table_markdown or "(no table: no cell finished)")
        for k, v in report.outputs.items():
            typer.echo(f"  {k:22s} {v}")
        if report.failed and not allow_incomplete:
            raise typer.Exit(code=1)
        _exit_if_incomplete(report.incomplete, allow_incomplete)

    @app.command("search")
    def search_cmd(
        overrides: list[str] = typer.Argument(
            None, metavar="[KEY=VALUE]...", help="Search overrides, e.g. eta=2 min_budget=3."),
        config: Path = typer.Option(..., "--config", "-c", help="Search YAML (see pipelines/search_demo.yaml)."),
        output: Path = typer.Option(None, "--output", "-o", help="Output folder. Defaults to runs/search/<name>."),
        shard: str = typer.Option(None, "--shard", help="Run only shard i of n (0-based 'i/n') of every stage."),
        resume: bool = typer.Option(False, "--resume", help="Continue the search already in the output folder."),
        train_set: list[str] = typer.Option(None, "--train-set", "-t",
                                            help="Training override for every run, e.g. -t train.num_threads=1."),
        retrain_stale: bool = typer.Option(False, "--retrain-stale",
                                           help="Retrain finished runs made with other settings (else refused)."),
        allow_incomplete: bool = typer.Option(False, "--allow-incomplete",
                                              help="Exit 0 even when the test-set table has unmatched runs/cases."),
    ) -> None:
        """Choose a per-position attention assignment by successive halving on validation cases, then score the
        winner and the baseline on test cases no selection step saw (paired statistics as in compare).

        Finished candidates made with the same settings are skipped with --resume (other settings are refused,
        naming the keys, until --retrain-stale); a shard that finds a stage unfinished by the others stops (exit
        code 3) and continues when rerun; a failed cell stops the search (exit code 1); a test-set table with
        unmatched runs or cases exits 1 unless --allow-incomplete.
        """
        from medse.compare.search import run_search

        report = run_search(config, output, shard=shard, resume=resume, overrides=list(overrides or ()),
                            train_overrides=list(train_set or ()), log=typer.echo, retrain_stale=retrain_stale,
                            allow_incomplete=allow_incomplete)
        typer.echo("")
        typer.echo(f"{report.status}: {report.message}")
        if report.test_table_markdown:
            typer.echo(report.test_table_markdown)
        typer.echo(f"  report: {report.output / 'report.md'}")
        if report.status in ("failed", "incomplete"):
            raise typer.Exit(code=1)
        if report.status == "waiting":
            raise typer.Exit(code=3)

    @app.command("explain")
    def explain_cmd(
        run: Path = typer.Option(..., "--run", help="Training run folder."),
        image: list[Path] = typer.Option(..., "--image", help="The scan (repeat for several channels)."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the maps (maps an earlier explain of "
                                    "the same scan wrote there are replaced; other files are kept)."),
        layers: list[str] = typer.Option(None, "--layers",
                                         help="Gate layers by index, position (encoder.0, bottleneck, decoder.2) "
                                         "or module path (repeatable). Default: all."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best, last or a .pt path."),
        axis: int = typer.Option(2, "--axis", help="Axis of the volume the PNGs slice along (0, 1 or 2)."),
        slice_index: int = typer.Option(None, "--slice", help="Slice shown in the PNGs. Default: most varied."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    ) -> None:
        """Save the spatial-gate maps (sSE, scSE, CA, SimAM, PE) of a trained run over a scan: NIfTI + PNG.

        Layers are named by position (encoder.0, bottleneck, decoder.2). A bad --axis or --slice exits 2 before
        anything is created; into a folder of an earlier run, the earlier maps of the same scan are replaced.
        """
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
        retrain_stale: bool = typer.Option(False, "--retrain-stale",
                                           help="Retrain cells made with other settings (else refused)."),
    ) -> None:
        """Synthetic data -> 3D U-Net none / cSE / sSE / scSE -> predict -> evaluate -> table and figures."""
        from medse.compare.demo import run_demo

        run_demo(output, pipeline=pipeline, overrides=list(overrides or ()), train_overrides=list(train_set or ()),
                 explain_maps=not no_explain, log=typer.echo, retrain_stale=retrain_stale)
