"""CLI commands of the 'data' area: ``medse synth``, ``medse manifest``, ``medse validate``.

* ``medse synth --out DIR [--cases 20 --size 64 --seed 0 --layout folder|nnunet --overwrite]`` writes the
  synthetic brain-phantom dataset (:func:`medse.data.synth.generate_dataset`).
* ``medse manifest SRC --out data_manifests/x.json [--layout auto]`` turns a dataset in any layout into a
  versioned JSON manifest with paths relative to the manifest, after validating it (nothing is written
  when validation finds errors; ``--skip-validation`` writes anyway). Label names come from the dataset,
  else from the values found (``label_<v>``).
* ``medse validate DATA_OR_MANIFEST [--layout auto] [--no-labels]`` prints one line per problem and
  exits 1 when there are errors.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the medse app."""

    @app.command("synth")
    def synth(
        out: Path = typer.Option(..., "--out", help="Output folder (created)."),
        cases: int = typer.Option(20, "--cases", min=1, help="Number of cases."),
        size: int = typer.Option(64, "--size", min=8, help="Voxels along the finest axes."),
        seed: int = typer.Option(0, "--seed", help="Random seed."),
        layout: str = typer.Option("folder", "--layout", help="'folder' (images/ + labels/) or 'nnunet'."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a synthetic dataset already in --out."),
    ) -> None:
        """Write the synthetic brain-phantom demo dataset (NIfTI images, uint8 labels, dataset.json)."""
        from medse.data.synth import generate_dataset

        t0 = time.perf_counter()
        generate_dataset(out, n_cases=cases, size=size, seed=seed, layout=layout, overwrite=overwrite)
        typer.echo(f"wrote {cases} cases ({size}^3, seed {seed}, layout {layout}) to {out} "
                   f"in {time.perf_counter() - t0:.1f} s")

    @app.command("manifest")
    def manifest(
        src: Path = typer.Argument(..., help="Dataset folder, dataset.json, or manifest to convert."),
        out: Path = typer.Option(..., "--out", help="Manifest to write (.json), e.g. data_manifests/x.json."),
        layout: str = typer.Option("auto", "--layout", help="auto | folder | nnunet | msd | manifest."),
        skip_validation: bool = typer.Option(False, "--skip-validation", help="Write without validating."),
        description: str = typer.Option("", "--description", help="Free text stored in the manifest."),
    ) -> None:
        """Convert a dataset (images/+labels/, nnU-Net v2, Decathlon) into a validated JSON manifest."""
        from medse.data.datasets import load_dataset, write_manifest
        from medse.data.validate import resolve_labels, validate_dataset

        spec = load_dataset(src, layout=layout)
        if not skip_validation:
            report = validate_dataset(spec, check_labels=any(c.label is not None for c in spec.cases))
            for line in report.lines():
                typer.echo(line)
            if report.errors:
                typer.echo(f"{len(report.errors)} error(s): manifest not written", err=True)
                raise typer.Exit(1)
            if not spec.labels and report.label_values:
                spec.labels = resolve_labels(spec, report)
        write_manifest(spec, out, description=description or None)
        typer.echo(f"wrote {out} ({len(spec.cases)} cases, labels {spec.labels or 'none declared'})")

    @app.command("validate")
    def validate(
        data: Path = typer.Argument(..., help="Dataset folder, dataset.json, or manifest."),
        layout: str = typer.Option("auto", "--layout", help="auto | folder | nnunet | msd | manifest."),
        no_labels: bool = typer.Option(False, "--no-labels", help="Images only: do not require or check labels."),
    ) -> None:
        """Check every file of a dataset; one line per problem; exit code 1 when there are errors."""
        from medse.data.datasets import load_dataset
        from medse.data.validate import validate_dataset

        spec = load_dataset(data, layout=layout)
        report = validate_dataset(spec, check_labels=not no_labels)
        for line in report.lines():
            typer.echo(line)
        labels = spec.labels or {f"label_{v}": v for v in report.label_values}
        typer.echo(f"{len(spec.cases)} cases ({spec.layout}), {report.num_channels} channel(s), labels "
                   f"{sorted(labels.values()) if labels else 'none'}: {len(report.errors)} error(s), "
                   f"{len(report.warnings)} warning(s)")
        if report.errors:
            raise typer.Exit(1)
