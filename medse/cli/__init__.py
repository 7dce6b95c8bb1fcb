"""The ``medse`` command line: a thin Typer app over the Python API.

Each command group registers its commands from its own module (``medse/cli/_<group>.py``, a ``register(app)``
function). torch and the heavy libraries are imported inside the commands, so ``medse --help`` is fast.

How failures look (:func:`main`):

* usage errors (unknown command or option, bad option value) are Typer's own message: usage line,
  "No such option", a suggestion, exit code 2;
* user errors (:class:`~medse.utils.errors.MedseError`, ``ValueError``) and file-system errors
  (``PermissionError``, ``FileExistsError``, ``IsADirectoryError``, other ``OSError``) print one line
  ``error: <what>, <which path>`` without a traceback and exit with code 2;
* anything else prints ``error: unexpected <Type>: <message> (run with --debug or MEDSE_DEBUG=1 for the
  traceback)`` and exits with code 1; ``medse --debug ...`` or ``MEDSE_DEBUG=1`` prints the traceback too.

Typer runs in its standalone mode, so this module needs none of click's exception classes: recent Typer
(0.29) vendors click as ``typer._click`` and installs no ``click`` package, older Typer depends on click;
both work the same here (``tests/test_cli_errors.py`` runs the CLI with ``click`` made unimportable).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings

import typer

from medse.utils.errors import MedseError
from medse.utils.interrupt import Interrupted

#: environment variable that turns on tracebacks (same as ``medse --debug``).
DEBUG_ENV = "MEDSE_DEBUG"

app = typer.Typer(
    name="medse",
    help="Squeeze-and-excitation family attention for medical image segmentation and classification.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_COMMAND_MODULES = ("blocks", "models", "data", "train", "predict", "compare", "classify", "nnunet", "export")
_state: dict = {"debug": False}


def _print_version(requested: bool) -> None:
    """``medse --version``: the installed distribution's version (``importlib.metadata``), else the package's."""
    if not requested:
        return
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        v = dist_version("medse")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from medse import __version__ as v
    typer.echo(f"medse {v}")
    raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help=f"Print the full traceback of an error (or set {DEBUG_ENV}=1)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print medse's version and exit."),
) -> None:
    """medse: SE-family attention blocks, networks, training, inference, evaluation and comparison."""
    if debug and not _state["debug"]:
        _state["debug"] = True
        warnings.formatwarning = _state.get("python_formatwarning", warnings.formatwarning)


for _name in _COMMAND_MODULES:
    importlib.import_module(f"medse.cli._{_name}").register(app)


def _env_debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def os_error_message(e: OSError) -> str:
    """``<what>, <which path>`` for an ``OSError`` (both paths of a failed rename or copy)."""
    what = e.strerror or str(e) or type(e).__name__
    paths = [str(p) for p in (e.filename, getattr(e, "filename2", None)) if p is not None]
    if not paths:
        return what
    return f"{what}, {' -> '.join(paths)}"


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code
    typer.echo(str(code), err=True)  # sys.exit("message") prints the message, exit code 1
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit code (see the module docstring)."""
    _state["debug"] = _env_debug()
    old_format = _state["python_formatwarning"] = warnings.formatwarning
    if not _state["debug"]:
        warnings.formatwarning = _one_line_warning
    try:
        return _run(argv)
    finally:
        warnings.formatwarning = old_format


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """Warnings on the command line: ``warning: <message>`` (``--debug`` keeps Python's format with the source)."""
    return f"warning: {str(message).strip()}\n"


def _run(argv: list[str] | None) -> int:
    try:
        # standalone mode: Typer prints usage errors itself and ends every run with SystemExit(code)
        app(args=argv, prog_name="medse", standalone_mode=True)
    except SystemExit as e:
        stop = _interruption(e)  # Typer turns a KeyboardInterrupt into a silent exit 130: print where it stopped
        if isinstance(stop, Interrupted):
            for line in stop.lines():
                typer.echo(line, err=True)
        elif stop is not None:
            typer.echo("interrupted", err=True)
        return _exit_code(e.code)
    except Interrupted as e:
        for line in e.lines():
            typer.echo(line, err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except (MedseError, ValueError) as e:
        _traceback_if_debug()
        typer.echo(f"error: {e}", err=True)
        return 2
    except OSError as e:
        _traceback_if_debug()
        typer.echo(f"error: {os_error_message(e)}", err=True)
        return 2
    except Exception as e:
        _traceback_if_debug()
        msg = str(e).replace("\n", " ").strip()
        hint = "" if _state["debug"] else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
        typer.echo(f"error: unexpected {type(e).__name__}: {msg}{hint}", err=True)
        return 1
    return 0


def _interruption(e: BaseException) -> KeyboardInterrupt | None:
    """The stop behind an exit (Typer raises ``Exit(130) from`` the ``KeyboardInterrupt``): the
    :class:`Interrupted` if the chain holds one, else the plain ``KeyboardInterrupt``, else ``None``."""
    seen: set[int] = set()
    cur: BaseException | None = e
    plain: KeyboardInterrupt | None = None
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, Interrupted):
            return cur
        if isinstance(cur, KeyboardInterrupt) and plain is None:
            plain = cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return plain


def _traceback_if_debug() -> None:
    if _state["debug"]:
        traceback.print_exc(file=sys.stderr)


def _entry() -> None:
    sys.exit(main())
