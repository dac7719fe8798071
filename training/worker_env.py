"""How `run_training` hands the secret inputs to its torchrun workers: in their environment, as
`MGFT_SECRET_<INPUT>` (never in the params file they read). A leaf: `training.worker` imports it before anything
that can start a process (see there)."""

from __future__ import annotations

import os

ENV_PREFIX = "MGFT_SECRET_"


def secret_env(values: dict[str, str]) -> dict[str, str]:
    """The environment entries that hand `values` (secret input name -> value) to a worker."""
    return {ENV_PREFIX + name.upper(): value for name, value in values.items()}


def pop_secret_env() -> dict[str, str]:
    """Take every `MGFT_SECRET_<INPUT>` out of this process's environment; returns input name -> value."""
    names = [name for name in os.environ if name.startswith(ENV_PREFIX)]
    return {name[len(ENV_PREFIX) :].lower(): os.environ.pop(name) for name in names}
