"""The export command: ``medse export RUN --format onnx|torchscript|bundle --output DIR``, for a medse training run
or (``--fold F``) an nnU-Net results folder."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this command to the medse app."""

    @app.command("export")
    def export_cmd(
        run: Path = typer.Argument(..., help="Training run folder (config.yaml, dataset.json, checkpoints/), or an "
                                   "nnU-Net results folder <Trainer>__<Plans>__<configuration> with --fold."),
        fmt: str = typer.Option(..., "--format", "-f", help="onnx (model.onnx, onnxruntime/TensorRT), "
                                "torchscript (model.ts, torch.jit.load without medse) or bundle (a MONAI bundle "
                                "folder: MONAI Label, monai.bundle run)."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the model file and export.json "
                                    "(created); for bundle, the bundle folder itself (new or empty)."),
        checkpoint: str = typer.Option(None, "--checkpoint", help="best (default), last, or a path to a .pt file; "
                                       "for nnU-Net a file in the fold folder (default checkpoint_final.pth)."),
        fold: str = typer.Option(None, "--fold", help="nnU-Net results folder: the fold to export (0-4 or all)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model file and export.json."),
        opset: int = typer.Option(None, "--opset", min=7, help="ONNX opset (default 17)."),
        tolerance: float = typer.Option(None, "--tolerance", help="Largest absolute logit difference to torch "
                                        "accepted (default 1e-4); above it nothing is written, exit 2."),
    ) -> None:
        """Export a run's network (or an nnU-Net results folder's fold, --fold) and check the written file against torch at batch 1 and 2 and two spatial
        sizes (onnxruntime for ONNX, torch.jit.load for TorchScript and the bundle's model.ts); writes
        export.json beside it. Above --tolerance nothing is written (exit 2)."""
        from medse.export import DEFAULT_OPSET, DEFAULT_TOLERANCE, export_run, model_file_name
        from medse.utils.errors import MedseError

        fmt = fmt.strip().lower()
        model_file_name(fmt)  # an unknown format: one line before the run is read
        if opset is not None and fmt != "onnx":
            raise MedseError(f"--opset applies to --format onnx, not {fmt}")
        settings = {"overwrite": overwrite, "opset": DEFAULT_OPSET if opset is None else opset,
                    "tolerance": DEFAULT_TOLERANCE if tolerance is None else tolerance}
        if (run / "plans.json").is_file():  # nnU-Net's results folder: plans.json, dataset.json, fold_N/
            if fold is None:
                raise MedseError("an nnU-Net results folder: name the fold to export with --fold (0-4 or all)", run)
            from medse.export import export_nnunet

            result = export_nnunet(run, int(fold) if fold.isdigit() else fold, fmt, output,
                                   checkpoint=checkpoint or "checkpoint_final.pth", **settings)
        elif fold is not None:
            raise MedseError("--fold applies to an nnU-Net results folder (plans.json, fold_N/); this is not one", run)
        else:
            result = export_run(run, fmt, output, checkpoint=checkpoint or "best", **settings)
        for line in filter(None, (result.note or "").split("; ")):
            typer.echo(f"note: {line}", err=True)
        typer.echo(result.summary())
