"""The predict commands: ``medse predict`` and ``medse evaluate``."""

from __future__ import annotations

from pathlib import Path

import typer

from medse.cli._options import check_device, check_overlap, parse_roi_size


def _either(short: bool | None, long: bool | None, short_name: str, long_name: str) -> bool | None:
    """The value of a flag given under its short or its (hidden, older) long name; both must agree."""
    if short is not None and long is not None and short != long:
        from medse.utils.errors import MedseError

        raise MedseError(f"{short_name} and {long_name} are the same option; give it once")
    return short if short is not None else long


def _resume_command(run: Path, input: Path, output: Path, **opts: object) -> str:
    """The ``medse predict`` command that continues a stopped batch: the same run, inputs, output and settings
    (finished cases are then skipped); without ``--overwrite``, which would redo them."""
    import shlex

    parts = ["medse", "predict", "--run", str(run), "--input", str(input), "--output", str(output)]
    defaults = {"checkpoint": "best", "device": "auto", "save_probs": False, "progress": True}
    negative = {"strict_nan": "--replace-nan"}
    for key, value in opts.items():
        if value is None or defaults.get(key, None) == value:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else negative.get(key, f"--no-{flag[2:]}"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def register(app: typer.Typer) -> None:
    """Add these commands to the medse app."""

    @app.command("predict")
    def predict_cmd(
        run: Path = typer.Option(..., "--run", "--run-dir", help="Training run folder (config.yaml, dataset.json, "
                                 "checkpoints/); spell it --run-dir under torchrun, whose own parser takes --run "
                                 "for its --run-path."),
        input: Path = typer.Option(..., "--input", "-i", help="Folder of scans (nnU-Net _0000 naming for "
                                   "channels), a DICOM series folder or a folder of them, a single scan, or a "
                                   "dataset manifest."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the masks (created)."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a path to a .pt file (best: "
                                       "last.pt, with a note, when the run has no best.pt)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo cases whose mask already exists."),
        roi_size: str = typer.Option(None, "--roi-size", callback=parse_roi_size,
                                     help="Window size, e.g. 96,96,96, each >= 1 (default: the run's)."),
        overlap: float = typer.Option(None, "--overlap", callback=check_overlap,
                                      help="Window overlap in [0, 1) (default: the run's)."),
        blend: str = typer.Option(None, "--blend", help="gaussian or constant (default: the run's)."),
        sw_batch_size: int = typer.Option(None, "--sw-batch-size", min=1, help="Windows per forward pass (>= 1)."),
        tta: bool = typer.Option(None, "--tta/--no-tta", help="Flip test-time augmentation (default: the run's)."),
        # short names, so that `--help` at 80 columns shows them whole; the older long names stay accepted
        # (hidden): --largest-component, --save-probabilities, --strict-nonfinite/--replace-nonfinite
        largest_component: bool = typer.Option(None, "--largest/--no-largest",
                                                help="Keep each label's largest connected component "
                                                "(default: the run's)."),
        largest_component_long: bool = typer.Option(None, "--largest-component/--no-largest-component",
                                                     hidden=True),
        save_probabilities: bool = typer.Option(False, "--save-probs",
                                                help="Also write class probabilities to the probabilities "
                                                "folder in OUTPUT."),
        save_probabilities_long: bool = typer.Option(False, "--save-probabilities", hidden=True),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the cases."),
        strict_nonfinite: bool = typer.Option(None, "--strict-nan/--replace-nan",
                                              help="Refuse scans with NaN/Inf voxels instead of replacing them "
                                              "by the channel's finite minimum (default: the run's setting)."),
        strict_nonfinite_long: bool = typer.Option(None, "--strict-nonfinite/--replace-nonfinite", hidden=True),
        model: Path = typer.Option(None, "--model", help="An exported network (model.onnx: onnxruntime on the "
                                   "CPU; model.ts: TorchScript; medse export) in place of --checkpoint; the run "
                                   "still gives preprocessing, windows and labels."),
    ) -> None:
        """Predict a mask for every scan, aligned with it (same shape, affine, qform/sform).

        Failed cases are listed one per line and in OUTPUT/failures.csv; the exit code is 1 when any
        failed. Under torchrun the cases are shared across ranks.
        """
        import os

        from medse.inference import predict_folder
        from medse.utils.interrupt import Interrupted, stop_on_signals

        largest_component = _either(largest_component, largest_component_long, "--largest", "--largest-component")
        strict_nonfinite = _either(strict_nonfinite, strict_nonfinite_long, "--strict-nan", "--strict-nonfinite")
        save_probabilities = save_probabilities or save_probabilities_long
        device = check_device(device)  # before the model is loaded: one line, not a CUDA traceback
        resume = _resume_command(run, input, output, checkpoint=checkpoint, device=device, roi_size=roi_size,
                                 overlap=overlap, blend=blend, sw_batch_size=sw_batch_size, tta=tta,
                                 largest=largest_component, save_probs=save_probabilities, progress=progress,
                                 strict_nan=strict_nonfinite, model=model)
        with stop_on_signals():
            try:
                report = predict_folder(
                    run, input, output, overwrite=overwrite, checkpoint=checkpoint, device=device,
                    save_probabilities=save_probabilities, progress=progress, roi_size=roi_size, overlap=overlap,
                    blend=blend, sw_batch_size=sw_batch_size, tta_flips=tta, largest_component=largest_component,
                    strict_nonfinite=strict_nonfinite, resume=resume, model_file=model,
                )
            except Interrupted:
                raise
            except KeyboardInterrupt:  # before the first case (reading the run, loading the model)
                raise Interrupted(f"the start, before any case was predicted, output folder {output}",
                                  resume=resume) from None
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
                                   "declared or found). A value found in no reference and no prediction is an "
                                   "error (it would score Dice 1 in every case)."),
        allow_unscored: bool = typer.Option(False, "--allow-unscored-labels", help="Exit 0 although references "
                                            "hold label values that are not scored (listed with voxel counts "
                                            "either way)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the cases."),
        allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0 although some references have "
                                           "no prediction (they are scored as failures, Dice 0, either way)."),
        hd95_mode: str = typer.Option("max", "--hd95-mode", help="max: the larger directed 95th percentile "
                                      "(MONAI); pooled: the 95th percentile of both directions pooled (medpy)."),
    ) -> None:
        """Dice, HD95 and ASSD (mm) and volume difference per case and label; metrics.csv + summary.json.

        A reference without a prediction is a failure (Dice 0, worst HD95/ASSD), listed, exit code 1 unless
        --allow-missing; predictions without a reference are listed as warnings. A --labels value that occurs in no
        reference and no prediction is an error (exit 2, nothing written); label values in references that are
        not scored are listed with voxel counts, exit code 1 unless --allow-unscored-labels. Per label, the cases
        absent from both masks (Dice 1 by convention) are counted.
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
                          hd95_mode=hd95_mode, allow_unscored=True)
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        summary = json.loads((output / "summary.json").read_text())
        dice = summary.get("foreground", {}).get("dice", {})
        mean = dice.get("mean")
        missing, errors = summary.get("missing_predictions", []), summary.get("errors", [])
        typer.echo(f"{df.case_id.nunique()} cases ({len(missing)} without prediction, scored Dice 0), mean "
                   f"foreground Dice {'n/a' if mean is None else f'{mean:.4f}'}; wrote {output / 'metrics.csv'} "
                   f"and {output / 'summary.json'}")
        for name, entry in summary.get("labels", {}).items():
            d = entry.get("dice", {}).get("mean")
            both = entry.get("n_both_empty", 0)
            typer.echo(f"  label {entry.get('label_value')} ({name}): mean Dice {'n/a' if d is None else f'{d:.4f}'} "
                       f"over {entry.get('n_cases', 0)} cases; absent from both masks in {both} (Dice 1 by "
                       f"convention)")
        for cid in missing:
            typer.echo(f"missing prediction: {cid} (no {cid} in {pred})", err=True)
        for e in errors:
            typer.echo(f"failed: {e}", err=True)
        unscored = summary.get("unscored_labels") or {}
        if unscored:
            from medse.evaluation.runner import format_unscored

            typer.echo(f"{'warning' if allow_unscored else 'error'}: references hold label value(s) that are not "
                       f"scored: {format_unscored(unscored)}"
                       f"{'' if allow_unscored else ' (pass them in --labels, or --allow-unscored-labels)'}", err=True)
        if errors or (missing and not allow_missing) or (unscored and not allow_unscored):
            raise SystemExit(1)  # as predict: click would swallow typer.Exit's code under main()
