"""The classify commands: ``medse synth-cls`` and ``medse classify train|evaluate|compare``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add these commands to the medse app."""

    @app.command("synth-cls")
    def synth_cls(
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write (one sub-folder per class + manifest.csv)."),
        n_images: int = typer.Option(400, "--n-images", help="Total images, split in the 2025 study's proportions."),
        size: int = typer.Option(128, "--size", help="Pixels a side."),
        seed: int = typer.Option(0, "--seed", help="Random seed."),
    ) -> None:
        """Write synthetic 4-class brain-MRI-like slices (glioma / meningioma / notumor / pituitary)."""
        from medse.classify.synth import generate_classification_dataset

        root = generate_classification_dataset(out, n_images=n_images, size=size, seed=seed)
        counts = {p.name: len(list(p.glob("*.png"))) for p in sorted(root.iterdir()) if p.is_dir()}
        typer.echo(f"wrote {sum(counts.values())} images to {root} {counts} and {root / 'manifest.csv'}")

    cls = typer.Typer(help="Brain-tumour style image classification: train, evaluate, compare.", no_args_is_help=True)
    app.add_typer(cls, name="classify")

    @cls.command("train")
    def train_cmd(
        overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                              help="Dotted config overrides, e.g. data.root=DIR train.epochs=2."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML config (see configs/classifier*.yaml)."),
        output: Path = typer.Option(None, "--output", "-o", help="Run folder to create."),
        resume: Path = typer.Option(None, "--resume", help="Continue this run folder from checkpoints/last.pt."),
    ) -> None:
        """Train a classifier.

        medse classify train --config configs/classifier_se.yaml --output runs/cls_se data.root=DIR
        medse classify train --resume runs/cls_se [train.epochs=40]
        """
        from medse.utils.errors import MedseError

        if resume is not None:
            if config is not None or output is not None:
                raise MedseError("--resume takes the run folder and optional KEY=VALUE overrides only")
            from medse.classify.train import resume as resume_run

            run_dir = resume_run(resume, list(overrides or ()))
        else:
            if config is None or output is None:
                raise MedseError("medse classify train needs --config CONFIG and --output RUN_DIR (or --resume RUN)")
            from medse.classify.train import train

            run_dir = train(config, output, list(overrides or ()))
        typer.echo(f"run folder: {run_dir}")

    @cls.command("evaluate")
    def evaluate_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run folder."),
        output: Path = typer.Option(None, "--output", "-o", help="Output folder. Defaults to RUN/eval_<split>."),
        data: Path = typer.Option(None, "--data", help="Evaluate on every image of this folder/CSV instead."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
        split: str = typer.Option("test", "--split", help="test, val or train (from splits.json)."),
    ) -> None:
        """Per-class AUC (DeLong 95% CI), sensitivity, specificity, precision, F1; accuracy; plots."""
        from medse.classify.evaluate import evaluate_run

        m = evaluate_run(run, output, data, checkpoint, split)
        typer.echo(f"n={m['n']} accuracy={m['accuracy']:.4f} macro AUC="
                   f"{'n/a' if m['macro_auc'] is None else format(m['macro_auc'], '.4f')}")

    @cls.command("compare")
    def compare_cmd(
        baseline: Path = typer.Option(..., "--baseline", help="Baseline run folder."),
        candidate: Path = typer.Option(..., "--candidate", help="Candidate run folder."),
        output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
        data: Path = typer.Option(None, "--data", help="Evaluate both on every image of this folder/CSV."),
        checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
        split: str = typer.Option("test", "--split", help="test, val or train (from splits.json)."),
    ) -> None:
        """Paired DeLong and McNemar tests (and the unpaired Z-test) of candidate vs baseline, per class."""
        from medse.compare.classifier import compare_runs

        comp = compare_runs(baseline, candidate, output, data, checkpoint, split)
        o = comp["overall"]
        typer.echo(f"accuracy {o['accuracy_baseline']:.4f} -> {o['accuracy_candidate']:.4f} "
                   f"(McNemar p={o['mcnemar']['p']:.4g}); table: {Path(output) / 'comparison.md'}")
