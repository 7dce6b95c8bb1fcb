"""The nnunet commands: ``medse nnunet plans`` and ``medse nnunet compare``.

Both work on nnU-Net v2's folders (``$nnUNet_preprocessed``, ``$nnUNet_results``); ``plans`` needs no nnU-Net
installation, ``compare`` counts parameters only where nnunetv2 is importable.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [t.strip() for t in v.split(",") if t.strip()]
    return out


def register(app: typer.Typer) -> None:
    """Add the ``nnunet`` sub-app to the medse app."""
    nn = typer.Typer(name="nnunet", help="medse blocks inside nnU-Net v2: derived plans and Dice-gain tables.",
                     no_args_is_help=True, add_completion=False)

    @nn.command("plans")
    def plans_cmd(
        dataset: str = typer.Argument(..., help="Dataset id (501) or folder name (Dataset501_Name)."),
        attention: list[str] = typer.Option(..., "--attention", "-a",
                                            help="Blocks, one derived plans each: scse,cse,sse (compositions: eca+ca); "
                                                 "a block per position: -a encoder=eca,decoder=scse (one per option)."),
        positions: list[str] = typer.Option(None, "--positions",
                                            help="Where: encoder,bottleneck,decoder; residual (ResEnc plans: "
                                                 "inside each residual block). Default: the first three."),
        configuration: list[str] = typer.Option(["3d_fullres"], "--configuration", "-c",
                                                help="Configurations that get attention (comma-separated)."),
        plans: str = typer.Option("nnUNetPlans", "--plans", "-p",
                                  help="Source plans identifier (nnUNetPlans, nnUNetResEncUNetMPlans, ...)."),
        reduction: float = typer.Option(None, "--reduction", help="Block reduction ratio. Default: the block's."),
        preprocessed: Path = typer.Option(None, "--preprocessed", help="Default: $nnUNet_preprocessed."),
    ) -> None:
        """Write <plans>_medse_<block>.json beside the plans of DATASET and print the nnU-Net commands to run."""
        from medse.integrations.nnunet.plans import derive_plans
        from medse.networks.placement import cli_choices

        kwargs = None if reduction is None else {"reduction": int(reduction) if reduction == int(reduction)
                                                 else reduction}
        written = derive_plans(dataset, [c.choice for c in cli_choices(attention)], positions=_split(positions) or None,
                               configurations=_split(configuration), plans=plans, attention_kwargs=kwargs,
                               preprocessed=preprocessed)
        for d in written:
            typer.echo(f"wrote {d.path}  (plans {d.plans_name}: {d.attention} in {', '.join(d.configurations)})")
        typer.echo("")
        typer.echo("Run (nnU-Net must be able to import medse: same environment):")
        seen: set[str] = set()
        for d in written:
            for c in d.commands:
                if c not in seen:
                    seen.add(c)
                    typer.echo(f"  {c}")

    @nn.command("compare")
    def compare_cmd(
        dataset: str = typer.Argument(..., help="Dataset id (501) or folder name (Dataset501_Name)."),
        plans: list[str] = typer.Option(..., "--plans", "-p",
                                        help="Plans identifiers, comma-separated; one without attention (baseline)."),
        configuration: str = typer.Option("3d_fullres", "--configuration", "-c", help="nnU-Net configuration."),
        trainer: str = typer.Option("nnUNetTrainer", "--trainer", "-tr", help="nnU-Net trainer of the runs."),
        folds: str = typer.Option("0-4", "--folds", "-f", help="Folds: 0-4, or 0,1,2."),
        output: Path = typer.Option(None, "--output", "-o",
                                    help="Output folder. Default: runs/nnunet_compare/<dataset>_<configuration>."),
        results: Path = typer.Option(None, "--results", help="Default: $nnUNet_results."),
        preprocessed: Path = typer.Option(None, "--preprocessed", help="Default: $nnUNet_preprocessed."),
        n_boot: int = typer.Option(10000, "--n-boot", help="Bootstrap resamples of the CIs."),
        no_figures: bool = typer.Option(False, "--no-figures", help="Skip the box plot and gain chart."),
        allow_incomplete: bool = typer.Option(False, "--allow-incomplete",
                                              help="Exit 0 even when folds or cases are missing for some plans."),
    ) -> None:
        """Re-score nnU-Net's cross-validation predictions with medse's evaluator; write the paired Dice-gain table.

        Exactly each fold's validation cases (splits_final.json) are scored; other files there are listed as extra.
        Folds or cases missing for some plans are listed and make the exit code 1 unless --allow-incomplete.
        """
        from medse.integrations.nnunet.compare import compare_nnunet

        report = compare_nnunet(dataset, _split(plans), configuration=configuration, trainer=trainer, folds=folds,
                                output=output, results=results, preprocessed=preprocessed, figures=not no_figures,
                                n_boot=n_boot, log=typer.echo)
        typer.echo("")
        typer.echo(report.table_markdown)
        for k, v in report.outputs.items():
            typer.echo(f"  {k:24s} {v}")
        if report.incomplete:
            from medse.cli._compare import _exit_if_incomplete

            _exit_if_incomplete(report.incomplete, allow_incomplete)

    app.add_typer(nn, name="nnunet")
