"""Logging for the entry points (CLI, Cog setup/train): INFO lines to stderr, where Cog collects a request's logs.

coglet does not configure `logging`, so without this every INFO line (the seed used, the model loaded, the
training's progress) is dropped under Cog. Idempotent: a second call (each `setup()`, each `train()`) keeps one
handler.
"""

from __future__ import annotations

import logging
import sys
import typing as tp

_MARK = "_musicgen_ft_handler"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Settings once read from the environment, and what sets them now.
RETIRED_ENV = {"MGFT_QUANTIZE": "the input sampler_precision (auto, int8, bf16, fp16, none)"}


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each record, not as it was when the handler was made: Cog's worker and
    test harnesses swap `sys.stderr`, and a handler holding the old stream writes into a closed file
    ("--- Logging error ---" and a traceback, instead of the line)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> tp.TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: tp.Any) -> None:
        pass  # always the current sys.stderr


def configure_logging(level: int = logging.INFO, fmt: str = FORMAT) -> None:
    root = logging.getLogger()
    if not any(getattr(h, _MARK, False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "filelock", "numba", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def warn_retired_env(environ: tp.Mapping[str, str]) -> None:
    """A warning for each `RETIRED_ENV` variable set in `environ` (the entry points pass `os.environ`), naming what
    replaces it: a deployment that still sets one sees why it has no effect instead of a silent change."""
    for name, replacement in RETIRED_ENV.items():
        if environ.get(name):
            logging.getLogger(__name__).warning("%s is no longer read: use %s", name, replacement)
