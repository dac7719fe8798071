"""Modes of the files we hand to users (trained_model.tar, checkpoints): the process umask, read without
changing it where the system allows. Imports nothing of ours."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask. Linux reports it in /proc (read-only); elsewhere `os.umask` is the only way to read it,
    by setting it and putting it straight back (a file another thread creates meanwhile could get 022)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
