"""Logging for the entry points (CLI, Cog setup/train): INFO lines to stderr, where Cog collects a request's logs.

coglet does not configure `logging`, so without this every INFO line (the seed used, the model loaded, the
training's progress) is dropped under Cog. Idempotent: a second call (each `setup()`, each `train()`) keeps one
handler.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import typing as tp
import warnings

_MARK = "_musicgen_ft_handler"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What libraries print that a user cannot act on, each with why it is silenced; `configure_logging` (called by every
# entry point) applies them. Anything not named here still reaches the user.
QUIET_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        FutureWarning,
        r"`torch\.nn\.utils\.weight_norm` is deprecated",
        "audiocraft builds EnCodec's convolutions with torch's old weight_norm on every model load; moving to the "
        "new one is audiocraft's to do (it renames the checkpoints' keys)",
    ),
)
QUIET_LOGGERS: dict[str, str] = {
    "audiocraft.modules.codebooks_patterns": "'New pattern, time steps: ...' at INFO each time a generation window "
    "builds its codebook pattern: audiocraft's internals, and it breaks into the progress bar",
}
# Libraries that `print()` to stdout, by the name `library_prints` is called with, and why that is not shown.
QUIET_PRINTS: dict[str, str] = {
    "dadaptation": "DAdaptAdam prints 'Using decoupled weight decay' on stdout when it is built: it is the setting "
    "we chose (weight decay as AdamW's), and Cog shows stdout as the training's log",
}
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


def _printed_by_its_library(record: logging.LogRecord) -> bool:
    """Whether a handler of the record's own library (huggingface_hub and transformers add one to their top logger
    and still pass records up) has printed it already: ours then does not print it a second time."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    root = logging.getLogger()
    while logger is not None and logger is not root:
        if any(not getattr(h, _MARK, False) for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent  # type: ignore[assignment]
    return False


def configure_logging(level: int = logging.INFO, fmt: str = FORMAT) -> None:
    root = logging.getLogger()
    if not any(getattr(h, _MARK, False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        handler.addFilter(lambda record: not _printed_by_its_library(record))
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "filelock", "numba", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category, message, _why in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def library_prints(library: str) -> tp.Iterator[None]:
    """Within: what `library` (a `QUIET_PRINTS` name) prints on stdout goes to the DEBUG log instead."""
    if library not in QUIET_PRINTS:
        raise KeyError(f"{library!r} is not in QUIET_PRINTS: name it there with why its prints are not shown")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        logging.getLogger(library).debug("%s", line)


def warn_retired_env(environ: tp.Mapping[str, str]) -> None:
    """A warning for each `RETIRED_ENV` variable set in `environ` (the entry points pass `os.environ`), naming what
    replaces it: a deployment that still sets one sees why it has no effect instead of a silent change."""
    for name, replacement in RETIRED_ENV.items():
        if environ.get(name):
            logging.getLogger(__name__).warning("%s is no longer read: use %s", name, replacement)
