"""User-facing errors.

Every error a user can cause (bad file, bad config, bad argument on the command line) is raised as
:class:`MedseError` (or :class:`ValueError` for programmatic misuse). The CLI prints ``str(err)`` on one
line, without a traceback, and exits with code 2. Messages name the file or key and what is wrong.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MedseError(Exception):
    """An error caused by user input: one line that names the file/key and the problem."""

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        msg = str(message).replace("\n", " ").strip()
        if self.path and self.path not in msg:
            msg = f"{self.path}: {msg}"
        super().__init__(msg)


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or an empty string."""
    options = list(options)
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_option_error(kind: str, name: str, options: Iterable[str]) -> ValueError:
    """A ``ValueError`` for an unknown registry name, listing the options and suggesting the closest."""
    options = sorted(options)
    return ValueError(f"Unknown {kind} '{name}'.{did_you_mean(name, options)} Available: {', '.join(options)}.")
