"""Clean stops on SIGINT (Ctrl-C) and SIGTERM (a job scheduler's time limit).

Long commands (train, predict, compare, search) run inside :func:`stop_on_signals`: SIGTERM is turned into the
same ``KeyboardInterrupt`` that Ctrl-C raises, so one ``except KeyboardInterrupt`` handles both. The code that
knows where it stopped converts it into :class:`Interrupted` with a one-line ``where`` and, when there is one,
the ``resume`` command::

    with stop_on_signals():
        try:
            ...
        except KeyboardInterrupt:
            raise Interrupted(f"epoch {epoch} of {run_dir}", resume=f"medse train --resume {run_dir}") from None

The CLI (:func:`medse.cli.main`) prints ``interrupted: stopped at <where>`` and ``resume with: <command>`` on
stderr and exits with 130 (128 + SIGINT, as shells do), for either signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """A stop by SIGINT/SIGTERM that knows where it stopped and how to resume.

    A subclass of ``KeyboardInterrupt`` so that code which lets a Ctrl-C through lets this through too.
    """

    def __init__(self, where: str, resume: str | None = None, signal_name: str | None = None):
        self.where = " ".join(str(where).split())
        self.resume = resume
        self.signal_name = signal_name or last_signal_name()
        super().__init__(self.where)

    def lines(self) -> list[str]:
        """The lines the CLI prints (without a traceback)."""
        by = f" ({self.signal_name})" if self.signal_name else ""
        out = [f"interrupted{by}: stopped at {self.where}"]
        if self.resume:
            out.append(f"resume with: {self.resume}")
        return out


_last: dict[str, str | None] = {"name": None}


def last_signal_name() -> str | None:
    """``"SIGTERM"`` or ``"SIGINT"`` for the last signal :func:`stop_on_signals` received (``None``: none yet)."""
    return _last["name"]


def _raise_interrupt(signum: int, frame: object) -> None:  # pragma: no cover - called by the interpreter
    _last["name"] = signal.Signals(signum).name
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGINT) raise ``KeyboardInterrupt`` in the main thread.

    Outside the main thread (where Python cannot install handlers) it does nothing. The previous handlers are
    restored on exit; nesting is fine.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _last["name"] = None
    try:
        for s in old:
            signal.signal(s, _raise_interrupt)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
