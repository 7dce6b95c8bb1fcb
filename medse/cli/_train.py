"""The train commands: ``medse train``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add these commands to the medse app."""

    @app.command("train", context_settings={"allow_extra_args": False})
    def train_cmd(
        overrides: list[str] = typer.Argument(
            None, metavar="[KEY=VALUE]...", help="Dotted config overrides, e.g. data.root=DIR train.epochs=2."
        ),
        config: Path = typer.Option(None, "--config", "-c", help="YAML config (see configs/)."),
        output: Path = typer.Option(None, "--output", "-o", help="Run folder to create."),
        resume: Path = typer.Option(
            None, "--resume", help="Continue the run in this folder from its last checkpoint; train.epochs=N "
            "(the only override it takes) extends a finished or stopped run."),
    ) -> None:
        """Train a segmentation network (DistributedDataParallel when started by torchrun).

        medse train --config configs/demo.yaml --output runs/demo data.root=DIR [train.epochs=2 ...]
        medse train --resume runs/demo [train.epochs=N]

        SIGINT (Ctrl-C) and SIGTERM stop it with one line saying where, and the command that resumes (exit 130).
        """
        from medse.utils.errors import MedseError

        if resume is not None:
            if config is not None or output is not None:
                raise MedseError("--resume takes the run folder and optionally train.epochs=N (the config is the "
                                 "one stored in the run folder)")
            from medse.training import resume as resume_run

            run_dir = resume_run(resume, list(overrides or ()))
        else:
            if config is None or output is None:
                raise MedseError("medse train needs --config CONFIG and --output RUN_DIR (or --resume RUN_DIR)")
            from medse.training import train

            run_dir = train(config, output, overrides=list(overrides or ()))
        _summary(run_dir)


def _summary(run_dir: Path) -> None:
    import json
    import os

    timing = run_dir / "timing.json"
    msg = f"run folder: {run_dir}"
    if timing.is_file():
        rec = json.loads(timing.read_text())
        best = rec.get("best_val_dice_mean")
        if best is not None:
            msg += f"  best mean foreground Dice {best:.4f} (epoch {rec.get('best_epoch')})"
        if rec.get("train_step_time_mean_s") is not None:
            msg += f"  step {rec['train_step_time_mean_s'] * 1000:.1f} ms"
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(msg)
