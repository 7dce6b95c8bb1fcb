"""The ``medse`` command line: a thin Typer app over the Python API.

Each area registers its commands from its own module (``medse/cli/_<area>.py``, a ``register(app)``
function). torch and the heavy libraries are imported inside the commands, so ``medse --help`` is fast.
User errors (:class:`~medse.utils.errors.MedseError`, ``ValueError``) print one line without a
traceback and exit with code 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from medse.utils.errors import MedseError

app = typer.Typer(
    name="medse",
    help="Squeeze-and-excitation family attention for medical image segmentation and classification.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_AREAS = ("blocks", "models", "data", "train", "predict", "compare", "classify", "nnunet")


@app.callback()
def _root() -> None:
    """medse: SE-family attention blocks, networks, training, inference, evaluation and comparison."""


for _area in _AREAS:
    importlib.import_module(f"medse.cli._{_area}").register(app)


def main(argv: list[str] | None = None) -> int:
    try:
        # with standalone_mode=False, click returns the exit code of typer.Exit / ctx.exit instead of raising
        rv = app(args=argv, standalone_mode=False)
    except (MedseError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as e:  # commands may call typer.Exit / sys.exit with a code
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.Exit):
            return e.exit_code
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            typer.echo("aborted", err=True)
            return 1
        raise
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def _entry() -> None:
    sys.exit(main())
