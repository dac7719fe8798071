"""Progress where stderr is not a terminal (Cog, CI, a file): a few log lines with the step, the total, the rate and
the ETA, instead of one carriage-return line per redraw of tqdm's bar (issue 19, point 3)."""

from __future__ import annotations

import logging

import pytest

from core import progress
from core.progress import LogBar, progress_bar


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "core.progress"]


@pytest.mark.parametrize("step_s,expected_max", [(0.1, 15), (1.0, 45)])
def test_a_thousand_steps_make_a_few_lines_each_with_the_eta(caplog, step_s, expected_max):
    """1,000 updates at 0.1 s (100 s: the 10 % rule) or 1 s each (1,000 s: the 30 s rule)."""
    caplog.set_level(logging.INFO, logger="core.progress")
    clock = Clock()
    bar = LogBar(total=1000, desc="generating", unit="step", clock=clock)
    for _ in range(1000):
        clock.t += step_s
        bar.update(1)
    bar.close()
    lines = _lines(caplog)
    total_s = 1000 * step_s
    # at most one line per 10 % and one per 30 s, plus the last one
    assert len(lines) <= 10 + total_s / progress.MAX_GAP_S + 1 <= expected_max, lines
    assert len(lines) >= 9, lines  # and it does report along the way
    assert all(line.startswith("generating: ") and "step/s" in line for line in lines), lines
    assert all("ETA" in line for line in lines[:-1]), lines
    assert lines[-1].startswith("generating: 1000/1000 step (100 %)") and lines[-1].endswith("done"), lines
    assert "1000/1000" not in " ".join(lines[:-1])  # the end is announced once


def test_eta_is_the_remaining_work_at_the_average_rate(caplog):
    caplog.set_level(logging.INFO, logger="core.progress")
    clock = Clock()
    bar = LogBar(total=100, desc="Encoding clips", unit="clip", clock=clock)
    clock.t += 20.0
    bar.update(25)  # 25 clips in 20 s: 1.25 clip/s, 75 to go: 60 s
    assert _lines(caplog) == ["Encoding clips: 25/100 clip (25 %), 1.25 clip/s, 00:20 elapsed, ETA 01:00"]
    bar.close()


def test_quick_work_says_nothing_and_unknown_totals_report_by_time(caplog):
    caplog.set_level(logging.INFO, logger="core.progress")
    clock = Clock()
    with LogBar(total=3, desc="quick", clock=clock) as bar:
        for _ in range(3):
            clock.t += 0.1
            bar.update(1)
    assert _lines(caplog) == []  # 0.3 s of work: not worth a line
    clock = Clock()
    with LogBar(desc="Decompressing", unit="B", unit_scale=True, clock=clock) as bar:
        for _ in range(100):
            clock.t += 1.0
            bar.update(1_000_000)
    lines = _lines(caplog)
    assert 3 <= len(lines) <= 100 / progress.MAX_GAP_S + 1, lines
    assert lines[0].startswith("Decompressing: 30.0MB, 1.00MB/s, 00:30 elapsed"), lines


def test_iterating_and_setting_n_report_too(caplog):
    """The call sites' other forms: `for x in bar` (training/data.py) and `bar.n = ...; bar.refresh()` (windows)."""
    caplog.set_level(logging.INFO, logger="core.progress")
    clock = Clock()

    def ticking(n):
        for i in range(n):
            clock.t += 1.0
            yield i

    assert list(LogBar(ticking(50), total=50, desc="iter", clock=clock)) == list(range(50))
    assert 5 <= len(_lines(caplog)) <= 11
    caplog.clear()
    bar = LogBar(total=200, desc="set", clock=clock)
    for n in range(0, 201, 10):
        clock.t += 1.0
        bar.n = n
        bar.refresh()
    bar.close()
    assert 5 <= len(_lines(caplog)) <= 11 and _lines(caplog)[-1].startswith("set: 200/200")


def test_the_bar_stays_on_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> int:
            return len(s)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress_bar(total=10, desc="x")
    assert type(bar).__name__ == "tqdm" and not isinstance(bar, LogBar)
    bar.close()
    monkeypatch.undo()
    bar = progress_bar(total=10, desc="x")  # pytest's captured stderr: not a terminal
    assert isinstance(bar, LogBar)
    bar.close()
    quiet = progress_bar(total=10, desc="x", log_lines=False)
    assert quiet.disable and not isinstance(quiet, LogBar)
