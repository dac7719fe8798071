"""Logging for the entry points (CLI, Cog setup/train): INFO lines to stderr, where Cog collects a request's logs.

coglet does not configure `logging`, so without this every INFO line (the seed used, the model loaded, the
training's progress) is dropped under Cog. Idempotent: a second call (each `setup()`, each `train()`) keeps one
handler.
"""

from __future__ import annotations

import logging
import sys

_MARK = "_musicgen_ft_handler"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO, fmt: str = FORMAT) -> None:
    root = logging.getLogger()
    if not any(getattr(h, _MARK, False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "filelock", "numba", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
