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
    ) -> None:
        """Dice, HD95 and ASSD (mm) and volume difference per case and label; metrics.csv + summary.json."""
        import json

        from medse.evaluation import evaluate
        from medse.utils.errors import MedseError

        values = None
        if labels:
            try:
                values = [int(v) for v in labels.split(",") if v.strip()]
            except ValueError:
                raise MedseError(f"--labels '{labels}' must be integers like 1,2,3") from None
        df = evaluate(pred, ref, output, labels=values, progress=progress)
        summary = json.loads((output / "summary.json").read_text())
        dice = summary.get("foreground", {}).get("dice", {})
        mean = dice.get("mean")
        typer.echo(f"{df.case_id.nunique()} cases, mean foreground Dice "
                   f"{'n/a' if mean is None else f'{mean:.4f}'}; wrote {output / 'metrics.csv'} and "
                   f"{output / 'summary.json'}")
