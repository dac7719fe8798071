"""The errors a user can cause, and the one way the command lines report them (a leaf: imports nothing of ours).

Each message names the input or file and the fix; the CLIs print it as one line (no traceback) and exit 2.
"""

from __future__ import annotations

import contextlib
import sys
import typing as tp
from dataclasses import dataclass

__all__ = [
    "InputError",
    "ModelUnavailableError",
    "WeightsError",
    "NonFiniteError",
    "Interrupted",
    "DiskError",
    "write_failed",
    "USER_ERRORS",
    "cli_errors",
]


class InputError(ValueError):
    """A user input is invalid. The message names the input and says how to fix it."""

    def __init__(self, name: str, message: str):
        super().__init__(f"Invalid input '{name}': {message}")
        self.name = name


class ModelUnavailableError(RuntimeError):
    """A model's checkpoint could not be found or read; the message says where we looked and how to fix it."""


class WeightsError(ValueError):
    """A weights file is missing, corrupt or not ours; the message says what was expected."""


class NonFiniteError(RuntimeError):
    """Training diverged: the loss, a gradient or an exported weight became NaN/inf. The message names the step and
    what to change (a lower lr, fp32); the last finite state is kept as a checkpoint where one exists."""


class Interrupted(RuntimeError):
    """A run stopped early by a signal (SIGTERM, Ctrl-C) or a cancel, leaving what can be resumed; the message
    says where it is and how to resume. `exit_code` is what the CLI exits with (128 + the signal)."""

    exit_code = 130


class DiskError(RuntimeError):
    """A file of ours could not be written (a full disk, a quota, a file size limit, a read-only folder); the message
    names the file and the fix. Never an OSError subclass: handlers that skip an unreadable input must not take it."""


def write_failed(path: tp.Any, error: BaseException, what: str = "a file") -> DiskError:
    """The one-line error for a failed write of `path` (`what`: e.g. "the resume checkpoint"). Writers raise
    different things for the same full disk: OSError (ENOSPC, EFBIG, EDQUOT), torch.save's RuntimeError,
    soundfile's LibsndfileError ('System error'), so the cause is shown as the writer put it."""
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1:] or [type(error).__name__]
    reason = reason if isinstance(reason, str) else reason[0]
    return DiskError(
        f"could not write {what} {path} ({type(error).__name__}: {reason[:300]}). Free space on that disk (or raise "
        "the quota or file size limit), or give an output folder on another disk; nothing was left under that name"
    )


USER_ERRORS: tuple[type[Exception], ...] = (InputError, ModelUnavailableError, WeightsError, NonFiniteError, DiskError)


@dataclass
class Outcome:
    code: int = 0


@contextlib.contextmanager
def cli_errors(what: str) -> tp.Iterator[Outcome]:
    """Run a CLI's work: a user error or an interrupt becomes one line on stderr and an exit code in `Outcome`.

    `what` names the work in the Ctrl-C message ("generation", "training", "preparation").
    """
    outcome = Outcome()
    try:
        yield outcome
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        outcome.code = 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        outcome.code = e.exit_code
    except KeyboardInterrupt:
        print(f"interrupted: Ctrl-C stopped the {what}; nothing was written for it.", file=sys.stderr)
        outcome.code = 130
