"""Progress that a person reads: a redrawn bar on a terminal, a few log lines everywhere else.

On a terminal tqdm's bar is the right thing. Where stderr is a pipe or a file (Cog collects it into a request's
`logs`, CI, `2> log.txt`) every redraw of the bar becomes one more carriage-return line: a 45 s prediction wrote
2,257 of them (171 KB). There, `LogBar` keeps tqdm's interface (update, iteration, `n`, set_postfix, close) and writes
a log line only when another ~10 % is done or 30 s have passed, each with the step, the total, the rate and the ETA.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import typing as tp

from tqdm import tqdm

__all__ = ["LogBar", "progress_bar", "STEP_FRACTION", "MAX_GAP_S", "MIN_GAP_S"]

logger = logging.getLogger(__name__)

STEP_FRACTION = 0.1  # a line each time another 10 % is done...
MAX_GAP_S = 30.0  # ...or this long after the last line when it goes slowly (and always without a known total)
MIN_GAP_S = 2.0  # never closer than this: a bar that finishes in a second says nothing until its last line


class LogBar(tqdm):
    """tqdm's counting, written as a few log lines (INFO, logger `core.progress`) instead of a redrawn bar.

    A line when at least `STEP_FRACTION` of the total was done since the last one, or `MAX_GAP_S` passed, and at
    least `MIN_GAP_S` after the previous line; and a last line on close when something was not reported yet and
    the work took `MIN_GAP_S` or more (or had interim lines). `clock` (seconds, monotonic) is for tests."""

    def __init__(self, *args: tp.Any, clock: tp.Callable[[], float] = time.monotonic, **kwargs: tp.Any) -> None:
        kwargs["file"] = io.StringIO()  # tqdm's own writes (a newline on close) go nowhere
        kwargs.pop("mininterval", None)
        kwargs.pop("miniters", None)
        # tqdm calls display() at most every `mininterval`; the lines' own spacing is decided in display().
        super().__init__(*args, mininterval=0.5, **kwargs)
        self._clock = clock
        self._time = clock
        self.start_t = self.last_print_t = clock()
        self._last_line_t = self.start_t
        self._last_line_n = self.n
        self._lines = 0
        self._closing = False

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not hasattr(self, "_clock"):  # tqdm's first refresh, from inside its __init__
            return True
        if self.disable and not self._closing:
            return True
        now, n, total = self._clock(), self.n, self.total
        if self._closing:
            self._closing = False
            reported = n == self._last_line_n
            if not reported and (self._lines or now - self.start_t >= MIN_GAP_S):
                self._line(now, done=True)
            return True
        since = now - self._last_line_t
        advanced = n - self._last_line_n
        due = since >= MAX_GAP_S or bool(total and advanced >= STEP_FRACTION * total)
        if advanced > 0 and due and since >= MIN_GAP_S:
            self._line(now, done=bool(total) and n >= total)
        return True

    def close(self) -> None:
        if not self.disable:
            self._closing = True
        super().close()

    def _line(self, now: float, *, done: bool) -> None:
        n, total, unit = self.n, self.total, self.unit
        elapsed = max(now - self.start_t, 1e-9)
        rate = (n - self.initial) / elapsed
        if self.unit_scale:  # bytes and the like: 30.0MB/100MB, 1.00MB/s

            def amount(v: float, per: str = "") -> str:
                return f"{tqdm.format_sizeof(v, divisor=self.unit_divisor)}{unit}{per}"
        else:

            def amount(v: float, per: str = "") -> str:
                return f"{v:.3g} {unit}{per}"

        if total:
            done_of = f"{n:g}/{total:g} {unit}" if not self.unit_scale else f"{amount(n)}/{amount(total)}"
            count = f"{done_of} ({100 * n / total:.0f} %)"
        else:
            count = amount(n) if self.unit_scale else f"{n:g} {unit}"
        text = f"{self.desc or 'progress'}: {count}, {amount(rate, '/s')}, {tqdm.format_interval(elapsed)} elapsed"
        if total and n < total and not done and rate > 0:
            text += f", ETA {tqdm.format_interval((total - n) / rate)}"
        elif done and (not total or n >= total):
            text += ", done"
        if self.postfix:
            text += f" ({self.postfix})"
        logger.info(text)
        self._last_line_t, self._last_line_n = now, n
        self._lines += 1


def progress_bar(iterable: tp.Iterable | None = None, *, log_lines: bool = True, **kwargs: tp.Any) -> tqdm:
    """tqdm's bar when stderr is a terminal; otherwise a `LogBar` (or, with `log_lines=False`, for a caller that
    logs its own progress lines, nothing). Takes tqdm's arguments."""
    if _stderr_is_terminal():
        return tqdm(iterable, **kwargs)
    if not log_lines:
        kwargs["disable"] = True
        return tqdm(iterable, **kwargs)
    return LogBar(iterable, **kwargs)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
