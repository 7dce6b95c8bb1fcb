"""The export command: ``medse export RUN --format onnx|torchscript --output DIR``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this command to the medse app."""

    @app.command("export")
    def export_cmd(
        run: Path = typer.Argument(..., help="Training run folder (config.yaml, dataset.json, checkpoints/)."),
        fmt: str = typer.Option(..., "--format", "-f", help="onnx (model.onnx, onnxruntime/TensorRT), "
                                "torchscript (model.ts, torch.jit.load without medse) or bundle (a MONAI bundle "
                                "folder: MONAI Label, monai.bundle run)."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the model file and export.json "
                                    "(created); for bundle, the bundle folder itself (new or empty)."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a path to a .pt file."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model file and export.json."),
        opset: int = typer.Option(None, "--opset", min=7, help="ONNX opset (default 17)."),
        tolerance: float = typer.Option(None, "--tolerance", help="Largest absolute logit difference to torch "
                                        "accepted (default 1e-4); above it nothing is written, exit 2."),
    ) -> None:
        """Export a run's network and check the written file against torch at batch 1 and 2 and two spatial
        sizes (onnxruntime for ONNX, torch.jit.load for TorchScript and the bundle's model.ts); writes
        export.json beside it. Above --tolerance nothing is written (exit 2)."""
        from medse.export import DEFAULT_OPSET, DEFAULT_TOLERANCE, export_run, model_file_name
        from medse.utils.errors import MedseError

        fmt = fmt.strip().lower()
        model_file_name(fmt)  # an unknown format: one line before the run is read
        if opset is not None and fmt != "onnx":
            raise MedseError(f"--opset applies to --format onnx, not {fmt}")
        result = export_run(run, fmt, output, checkpoint=checkpoint, overwrite=overwrite,
                            opset=DEFAULT_OPSET if opset is None else opset,
                            tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
        for line in filter(None, (result.note or "").split("; ")):
            typer.echo(f"note: {line}", err=True)
        typer.echo(result.summary())
