"""The local Hugging Face cache (where it is, what it holds, reading only it) and the one quick question to the hub,
whether it can be reached at all (imports only the catalogue of ours).

Kept apart from `core/versions.py` so that the loaders below it (`core/style.py`, `core/weights.py`) can name the
cache in their messages without importing the module that imports them.
"""

from __future__ import annotations

import contextlib
import typing as tp
from urllib.parse import quote

from core.catalogue import CHECKPOINT_FILES

__all__ = [
    "hf_cache_hint",
    "hub_cached",
    "hub_offline",
    "hub_endpoint",
    "hub_unreachable",
    "missing_from_cache",
    "download_command",
    "TEXT_ENCODER",
    "TEXT_ENCODER_FILES",
    "TEXT_ENCODER_DOWNLOAD",
    "HTDEMUCS_HUB_FILE",
    "HTDEMUCS_URL",
]

# audiocraft's T5Conditioner loads this by name for every facebook/musicgen-* model (and MusicGen-Style).
TEXT_ENCODER = "t5-base"
TEXT_ENCODER_FILES: tuple[str, ...] = ("config.json",)
# What `hf download` needs of the text encoder for transformers to load its tokenizer and encoder (the repo also
# holds TensorFlow, Flax, Rust and ONNX copies of the weights that nothing here reads).
TEXT_ENCODER_DOWNLOAD = ("--include", '"*.json"', "--include", "spiece.model", "--include", "model.safetensors")
# demucs' htdemucs weights, as torch.hub caches them: audiocraft's melody conditioner loads them by name.
HTDEMUCS_HUB_FILE = "955717e8-8726e21a.th"
HTDEMUCS_URL = f"https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/{HTDEMUCS_HUB_FILE}"
# One request to tell "the hub answers" from "it cannot be reached": huggingface_hub itself retries a failed
# metadata request 5 times with back-off (23 s) before giving up, which is right while the hub answers but only
# delays the message when it cannot be reached (offline, firewalled, HF_ENDPOINT wrong).
CONNECT_TIMEOUT_S = 3.0
ANSWER_TIMEOUT_S = 10.0


def hf_cache_hint() -> str:
    """The folder huggingface_hub reads and writes (`HF_HUB_CACHE`, else `$HF_HOME/hub`), as it resolved it."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_cached(repo_id: str, filenames: tuple[str, ...] = CHECKPOINT_FILES) -> bool:
    """Whether every file of `repo_id` is in the local Hugging Face cache. Reads only the disk
    (`huggingface_hub.try_to_load_from_cache`): no request, so it answers at once with no network."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)


def missing_from_cache(repo_id: str, filenames: tuple[str, ...] = CHECKPOINT_FILES) -> list[str]:
    """The files of `repo_id` that the local Hugging Face cache lacks (read from the disk only)."""
    from huggingface_hub import try_to_load_from_cache

    return [name for name in filenames if not isinstance(try_to_load_from_cache(repo_id, name), str)]


def hub_endpoint() -> str:
    """The hub huggingface_hub asks (`HF_ENDPOINT`, read by huggingface_hub at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable(repo_id: str, filename: str) -> str | None:
    """Whether the hub can be reached: None when it answers (any HTTP status: it is there, and huggingface_hub's
    own retries apply from then on), else a clause saying why not, after ONE request (connect timeout
    `CONNECT_TIMEOUT_S`, no retry). With `HF_HUB_OFFLINE` set, no request is made and the clause says so.

    The request is the one huggingface_hub would make first (HEAD of the file's URL), through huggingface_hub's
    own HTTP client, so proxies, certificates and the endpoint are the same as for the download."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set: the hub is not asked (unset it to download)"
    import httpx2  # huggingface_hub's HTTP client library (its `get_session()` is an httpx2.Client)

    url = f"{hub_endpoint()}/{repo_id}/resolve/main/{quote(filename)}"  # what hf_hub_url makes of HF_ENDPOINT
    timeout = httpx2.Timeout(ANSWER_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    try:
        get_session().head(url, timeout=timeout, follow_redirects=False)
    except Exception as e:  # noqa: BLE001 - any failure to get an HTTP answer means "not reachable"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no answer"
        return f"the hub {hub_endpoint()} could not be reached ({type(e).__name__}: {detail})"
    return None


def download_command(repo_id: str, args: tuple[str, ...] = ()) -> str:
    """The command that puts `repo_id` (only the files `args` name, if any) into the Hugging Face cache: `hf`, the
    CLI that huggingface_hub installs (it no longer installs `huggingface-cli`)."""
    return " ".join(("hf", "download", repo_id, *args))


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
