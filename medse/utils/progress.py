"""Progress over a loop: a tqdm bar on a terminal, periodic plain lines everywhere else.

Every progress display of medse goes through :func:`progress`. On a terminal it is a ``tqdm`` bar (redrawn
in place). When the stream is not a terminal (a log file, CI, a job array, a pipe) a redrawn bar writes
carriage returns that turn logs into one very long line, so :class:`PlainProgress` writes a plain line
instead, at every 10% of the loop (at most one every ``min_interval`` seconds) and at least every
``max_interval`` seconds, plus a last line when the loop ends::

    predict 12/40 cases (30%), 1m02s elapsed, ~2m25s left

Environment: ``MEDSE_PROGRESS=bar`` forces the bar, ``MEDSE_PROGRESS=plain`` the plain lines,
``MEDSE_PROGRESS=off`` turns progress off.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["PROGRESS_ENV", "PlainProgress", "format_duration", "progress", "progress_write", "use_plain_lines"]

#: environment variable: ``bar``, ``plain`` or ``off`` (default: bar on a terminal, plain lines otherwise).
PROGRESS_ENV = "MEDSE_PROGRESS"


def format_duration(seconds: float) -> str:
    """``42s``, ``1m02s``, ``2h05m09s``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def use_plain_lines(file: IO[str] | None = None) -> bool:
    """True when progress on ``file`` (default stderr) should be plain lines: ``MEDSE_PROGRESS=plain``, or the
    stream is not a terminal (unless ``MEDSE_PROGRESS=bar``)."""
    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if mode == "plain":
        return True
    if mode == "bar":
        return False
    stream = file if file is not None else sys.stderr
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return True


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    file: IO[str] | None = None,
    leave: bool = True,
    plain: bool | None = None,
    min_interval: float = 5.0,
    max_interval: float = 60.0,
    **tqdm_kwargs: Any,
) -> Any:
    """A progress wrapper over ``iterable`` with tqdm's interface (iterate, ``update``, ``set_postfix``,
    ``set_description``, ``close``, ``write``).

    Args:
        iterable: what to iterate. Defaults to None (call ``update(n)`` yourself).
        total: number of items. Defaults to ``len(iterable)`` when it has one.
        desc: the label, e.g. ``"predict"``. Defaults to "".
        unit: what an item is, e.g. ``"case"``. Defaults to "it".
        disable: no output at all (e.g. on DDP ranks other than 0). Defaults to False.
        file: the stream. Defaults to ``sys.stderr``.
        leave: keep the finished bar / print a last line when done. Defaults to True.
        plain: force plain lines (True) or the bar (False). Defaults to None (:func:`use_plain_lines`).
        min_interval: plain lines: at least this many seconds between two 10% lines. Defaults to 5.0.
        max_interval: plain lines: a line at least this often, whatever the progress. Defaults to 60.0.
        **tqdm_kwargs: passed to ``tqdm`` (bar mode only).
    """
    if os.environ.get(PROGRESS_ENV, "").strip().lower() == "off":
        disable = True
    if plain is None:
        plain = use_plain_lines(file)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if disable or not plain:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                    file=file if file is not None else sys.stderr, leave=leave, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, file=file, leave=leave,
                         min_interval=min_interval, max_interval=max_interval)


def progress_write(msg: str, file: IO[str] | None = None) -> None:
    """Print one line without breaking an active tqdm bar (``tqdm.write``), plain when there is none."""
    from tqdm.auto import tqdm

    tqdm.write(msg, file=file if file is not None else sys.stderr)


class PlainProgress:
    """Periodic plain progress lines (see the module docstring); no carriage returns, no ANSI codes."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        file: IO[str] | None = None,
        leave: bool = True,
        min_interval: float = 5.0,
        max_interval: float = 60.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.file = file
        self.leave = leave
        self.min_interval = float(min_interval)
        self.max_interval = float(max_interval)
        self._clock = clock
        self.n = 0
        self.postfix = ""
        self.start = clock()
        self._last_print = self.start
        self._last_decile = 0
        self._printed = 0
        self._done = False
        self.closed = False

    # tqdm's interface --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if self.total:
            if self.n >= self.total and not self._done:
                self._done = True
                if self.leave:
                    self._emit(now)
                return
            decile = min(9, int(10 * self.n / self.total))
            crossed = decile > self._last_decile
            if crossed and now - self._last_print >= self.min_interval:
                self._last_decile = decile
                self._emit(now)
                return
        if now - self._last_print >= self.max_interval:
            if self.total:
                self._last_decile = min(9, int(10 * self.n / self.total))
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {})
        items.update(kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and not self._done and (self.n or self.total is None):
            self._emit(self._clock())

    @staticmethod
    def write(msg: str, file: IO[str] | None = None, end: str = "\n") -> None:
        stream = file if file is not None else sys.stderr
        stream.write(f"{msg}{end}")
        stream.flush()

    # the line ----------------------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        """The progress line for the current count, e.g. ``predict 12/40 cases (30%), 1m02s elapsed``."""
        now = self._clock() if now is None else now
        elapsed = now - self.start
        unit = self.unit if (self.unit in ("it", "") or self.unit.endswith("s")) else self.unit + "s"
        head = f"{self.desc} " if self.desc else ""
        if self.total:
            pct = 100.0 * self.n / self.total
            text = f"{head}{self.n}/{self.total} {unit} ({math.floor(pct):.0f}%), {format_duration(elapsed)} elapsed"
            if 0 < self.n < self.total and elapsed > 0:
                text += f", ~{format_duration(elapsed * (self.total - self.n) / self.n)} left"
        else:
            text = f"{head}{self.n} {unit}, {format_duration(elapsed)} elapsed"
        if self.postfix:
            text += f", {self.postfix}"
        return text

    def _emit(self, now: float) -> None:
        self._last_print = now
        self._printed += 1
        self.write(self.line(now), file=self.file)
