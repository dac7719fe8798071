"""The local Hugging Face cache: where it is, what it holds, and reading only it (imports only the
catalogue of ours).

Kept apart from `core/versions.py` so that the loaders below it (`core/style.py`, `core/weights.py`) can name the
cache in their messages without importing the module that imports them.
"""

from __future__ import annotations

import contextlib
import os
import typing as tp
from pathlib import Path

from core.catalogue import CHECKPOINT_FILES

__all__ = ["hf_cache_hint", "hub_cached", "hub_offline"]


def hf_cache_hint() -> str:
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    hub = os.environ.get("HF_HUB_CACHE", str(Path(home) / "hub"))
    return hub


def hub_cached(repo_id: str, filenames: tuple[str, ...] = CHECKPOINT_FILES) -> bool:
    """Whether every file of `repo_id` is in the local Hugging Face cache. Reads only the disk
    (`huggingface_hub.try_to_load_from_cache`): no request, so it answers at once with no network."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)


@contextlib.contextmanager
def hub_offline() -> tp.Iterator[None]:
    """Within: huggingface_hub (and transformers, which asks it) read only the local cache, as with
    `HF_HUB_OFFLINE=1`. Both read `huggingface_hub.constants.HF_HUB_OFFLINE` at each call, so flipping it here
    works after import. For loads known to be fully cached: no request, so no wait on an unreachable hub."""
    import huggingface_hub.constants as constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
