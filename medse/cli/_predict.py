"""CLI commands of the 'predict' area: ``medse predict`` and ``medse evaluate``."""

from __future__ import annotations

from pathlib import Path

import typer

from medse.cli._options import check_device, check_overlap, parse_roi_size


def register(app: typer.Typer) -> None:
    """Add this area's commands to the medse app."""

    @app.command("predict")
    def predict_cmd(
        run: Path = typer.Option(..., "--run", "--run-dir", help="Training run folder (config.yaml, dataset.json, "
                                 "checkpoints/); spell it --run-dir under torchrun, whose own parser takes --run "
                                 "for its --run-path."),
        input: Path = typer.Option(..., "--input", "-i", help="Folder of scans (nnU-Net _0000 naming for "
                                   "channels), a single scan, or a dataset manifest."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the masks (created)."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a path to a .pt file."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo cases whose mask already exists."),
        roi_size: str = typer.Option(None, "--roi-size", callback=parse_roi_size,
                                     help="Window size, e.g. 96,96,96, each >= 1 (default: the run's)."),
        overlap: float = typer.Option(None, "--overlap", callback=check_overlap,
                                      help="Window overlap in [0, 1) (default: the run's)."),
        blend: str = typer.Option(None, "--blend", help="gaussian or constant (default: the run's)."),
        sw_batch_size: int = typer.Option(None, "--sw-batch-size", min=1, help="Windows per forward pass (>= 1)."),
        tta: bool = typer.Option(None, "--tta/--no-tta", help="Flip test-time augmentation (default: the run's)."),
        largest_component: bool = typer.Option(None, "--largest-component/--no-largest-component",
                                                help="Keep each label's largest connected component."),
        save_probabilities: bool = typer.Option(False, "--save-probabilities",
                                                help="Also write class probabilities to OUTPUT/probabilities/."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the cases."),
        strict_nonfinite: bool = typer.Option(None, "--strict-nonfinite/--replace-nonfinite",
                                              help="Refuse scans with NaN/Inf voxels instead of replacing them "
                                              "by the channel's finite minimum (default: the run's setting)."),
    ) -> None:
        """Predict a mask for every scan, aligned with it (same shape, affine, qform/sform).

        Failed cases are listed one per line and in OUTPUT/failures.csv; the exit code is 1 when any
        failed. Under torchrun the cases are shared across ranks.
        """
        import os

        from medse.inference import predict_folder

        device = check_device(device)  # before the model is loaded: one line, not a CUDA traceback
        report = predict_folder(
            run, input, output, overwrite=overwrite, checkpoint=checkpoint, device=device,
            save_probabilities=save_probabilities, progress=progress, roi_size=roi_size, overlap=overlap, blend=blend,
            sw_batch_size=sw_batch_size, tta_flips=tta, largest_component=largest_component,
            strict_nonfinite=strict_nonfinite,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(report.summary() + (f"; failures in {report.failures_csv}" if report.failures_csv else ""))
        if report.failed:
            raise typer.Exit(1)

    @app.command("evaluate")
    def evaluate_cmd(
        pred: Path = typer.Option(..., "--pred", help="Folder of predicted masks."),
        ref: Path = typer.Option(..., "--ref", help="Folder of reference masks, or a dataset root / manifest."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for metrics.csv and summary.json."),
        labels: str = typer.Option(None, "--labels", help="Label values to evaluate, e.g. 1,2,3 (default: all "
                                   "declared or found)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the cases."),
        allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0 although some references have "
                                           "no prediction (they are scored as failures, Dice 0, either way)."),
        hd95_mode: str = typer.Option("max", "--hd95-mode", help="max: the larger directed 95th percentile "
                                      "(MONAI); pooled: the 95th percentile of both directions pooled (medpy)."),
    ) -> None:
        """Dice, HD95 and ASSD (mm) and volume difference per case and label; metrics.csv + summary.json.

        A reference without a prediction is a failure (Dice 0, worst HD95/ASSD), listed, exit code 1 unless
        --allow-missing; predictions without a reference are listed as warnings.
        """
        import json
        import warnings

        from medse.evaluation import evaluate
        from medse.utils.errors import MedseError

        values = None
        if labels:
            try:
                values = [int(v) for v in labels.split(",") if v.strip()]
            except ValueError:
                raise MedseError(f"--labels '{labels}' must be integers like 1,2,3") from None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            df = evaluate(pred, ref, output, labels=values, progress=progress, strict=False, allow_missing=True,
                          hd95_mode=hd95_mode)
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        summary = json.loads((output / "summary.json").read_text())
        dice = summary.get("foreground", {}).get("dice", {})
        mean = dice.get("mean")
        missing, errors = summary.get("missing_predictions", []), summary.get("errors", [])
        typer.echo(f"{df.case_id.nunique()} cases ({len(missing)} without prediction, scored Dice 0), mean "
                   f"foreground Dice {'n/a' if mean is None else f'{mean:.4f}'}; wrote {output / 'metrics.csv'} "
                   f"and {output / 'summary.json'}")
        for cid in missing:
            typer.echo(f"missing prediction: {cid} (no {cid} in {pred})", err=True)
        for e in errors:
            typer.echo(f"failed: {e}", err=True)
        if errors or (missing and not allow_missing):
            raise SystemExit(1)  # as predict: click would swallow typer.Exit's code under main()
