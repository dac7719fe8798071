"""`trained_model.tar`: the weights a fine-tune produces and predict.py loads.

A real tar archive holding

- `state_dict.bin` in audiocraft's exported-LM format: `{'best_state': fp16 state dict, 'xp.cfg': plain dict,
  'version': audiocraft version, 'exported': True}` (plain containers only: loads with `weights_only=True`);
- `compression_state_dict.bin`: for a facebook/musicgen-* base, audiocraft's *reference* form
  `{'pretrained': 'facebook/encodec_32khz', ...}` plus `base_model` (the exact base whose EnCodec we prefer when it
  is cached); for tiny or local-folder bases, a copy of the base's file (the full state);
- `finetune.json`: base model_version, method, training inputs, labels vocabulary, trigger word, format version,
  and `integrity`: the sha256 of every weights member and a fingerprint of the base architecture
  (`architecture_fingerprint`), both verified on load;
- for fine-tunes that reference their base instead of copying it (`finetune.json` `base_model`; `state_dict.bin`
  then holds the config and an empty `best_state`): `adapter.safetensors` + `adapter_config.json` (LoRA) or
  `embeddings.safetensors` (textual inversion, text projection); see `core/adapters.py`.

Extracted, the folder loads with audiocraft's own `MusicGen.get_pretrained(folder)`.

Where weights come from (`unpack`): a local path, an http(s) URL, a `data:` URI or a Hugging Face model repo id
(`user/name[@revision]`). Each is kept once on disk, as an unpacked folder in `$MGFT_CACHE/weights/` (a downloaded
tar is deleted once unpacked); that cache is evicted least-recently-used to keep free disk above a threshold.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import typing as tp
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from core import adapters, style, tiny, versions
from core.catalogue import (
    CHECKPOINT_FILES,
    LM_LAYOUTS,
    LM_WIDTHS,
    PRETRAINED,
    PRETRAINED_COMPRESSION,
    STYLE_PRETRAINED,
    STYLE_TINY_VERSIONS,
    TINY_VERSIONS,
)
from core.devices import default_device
from core.errors import DiskError, ModelUnavailableError, WeightsError
from core.files import current_umask
from core.hub import hf_cache_hint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FINETUNE_FILE = "finetune.json"
OPTIONAL_FILES = ("adapter.safetensors", "adapter_config.json", "embeddings.safetensors")
KNOWN_FILES = (*CHECKPOINT_FILES, FINETUNE_FILE, *OPTIONAL_FILES)
MAX_MEMBER_BYTES = 64 * 1024**3
# The training report (training/export.py): for people, not needed to load, so unpacking skips it without a warning.
REPORT_MEMBERS = ("loss.png", "metrics.json", "report.html", "samples/")
# The members whose bytes are the weights: hashed into finetune.json on export, verified on load.
INTEGRITY_MEMBERS = (*CHECKPOINT_FILES, *OPTIONAL_FILES)
# LM cfg sections audiocraft's builders construct every LM parameter from (names and shapes follow from them).
ARCHITECTURE_KEYS = ("lm_model", "transformer_lm", "codebooks_pattern", "conditioners", "fuser")


def _plain(cfg: tp.Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return tp.cast(dict, OmegaConf.to_container(cfg, resolve=True))
    if isinstance(cfg, str):
        return tp.cast(dict, OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    return dict(cfg)


def lm_package(state_dict: dict[str, torch.Tensor], cfg: tp.Any) -> dict:
    """audiocraft's exported-LM package, weights in fp16 (half the size; loads into an fp32 model as is)."""
    import audiocraft

    best_state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
        for k, v in state_dict.items()
    }
    plain = _plain(cfg)
    for key in ("device", "dtype"):  # overwritten by the loader; keep the package device-neutral
        plain.pop(key, None)
    return {"best_state": best_state, "xp.cfg": plain, "version": audiocraft.__version__, "exported": True}


def compression_package(base: str) -> dict:
    """The compression part for base model `base` (a model_version or a local model folder)."""
    import audiocraft

    if base in PRETRAINED or base in STYLE_PRETRAINED or base.startswith("facebook/musicgen"):
        return {
            "pretrained": PRETRAINED_COMPRESSION,
            "base_model": {**PRETRAINED, **STYLE_PRETRAINED}.get(base, base),
            "exported": True,
            "version": audiocraft.__version__,
        }
    if base == "micro":  # trained from scratch on the pretrained EnCodec (training/methods/scratch.py)
        return {"pretrained": PRETRAINED_COMPRESSION, "exported": True, "version": audiocraft.__version__}
    if base == "tiny-micro":  # ... on the tiny models' EnCodec
        base = "tiny"
    folder = tiny.ensure_tiny(base) if base in (*TINY_VERSIONS, *STYLE_TINY_VERSIONS) else Path(base)
    return torch.load(folder / "compression_state_dict.bin", map_location="cpu", weights_only=True)


def architecture_fingerprint(cfg: tp.Any) -> str:
    """A hash of the LM architecture `cfg` describes: its `ARCHITECTURE_KEYS` sections, without dropout rates.

    audiocraft's `get_lm_model` builds every LM parameter (names and shapes: dim, heads, layers, n_q, card, the
    conditioners and their projections) from these keys and nothing else, so equal fingerprints mean the same
    parameter names and shapes. It is read from the cfg, not the weights, because an adapter export holds no base
    weights: at load the base model is built first and its own `lm.cfg` is fingerprinted and compared.
    """

    def strip(node: tp.Any) -> tp.Any:
        if isinstance(node, dict):
            return {str(k): strip(v) for k, v in node.items() if "dropout" not in str(k)}
        if isinstance(node, list | tuple):
            return [strip(v) for v in node]
        return node

    plain = _plain(cfg)
    arch = strip({k: plain.get(k) for k in ARCHITECTURE_KEYS})
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()


def write_trained_model(
    out_tar: str | Path,
    *,
    state_dict: dict[str, torch.Tensor],
    cfg: tp.Any,
    base_model: str,
    finetune: dict[str, tp.Any],
    extra_files: dict[str, bytes] | None = None,
    report_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `trained_model.tar` (through `write_tar`: atomic, mode 0644 less the umask).

    `finetune.json` gets `integrity`: the sha256 of each weights member and `architecture_fingerprint(cfg)` (the
    base's architecture: `cfg` is the base's LM cfg for adapter exports, the trained LM's for full ones).
    `extra_files`: adapter / embeddings members (`OPTIONAL_FILES`), hashed like the weights. `report_files`: the
    training report (loss plot, samples, report.html: for people, not read on load), after the weights, not hashed.
    """
    members: dict[str, bytes] = {}
    for name, obj in (("state_dict.bin", lm_package(state_dict, cfg)), ("compression_state_dict.bin", None)):
        buffer = io.BytesIO()
        torch.save(obj if obj is not None else compression_package(base_model), buffer)
        members[name] = buffer.getvalue()
    for name, data in (extra_files or {}).items():
        if name not in OPTIONAL_FILES:
            raise ValueError(f"{name} is not a known weights member ({OPTIONAL_FILES})")
        members[name] = data
    integrity = {
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
        "base_architecture": architecture_fingerprint(cfg),
    }
    info = {"format_version": FORMAT_VERSION, "base_model": base_model, **finetune, "integrity": integrity}
    members[FINETUNE_FILE] = json.dumps(info, indent=2, sort_keys=True, default=str).encode()
    for name, data in (report_files or {}).items():
        if name in KNOWN_FILES:
            raise ValueError(f"{name} is a weights member, not a report file; name the report file otherwise")
        members[name] = data
    out_tar = write_tar(out_tar, members)
    logger.info("Wrote %s (%.1f MB)", out_tar, out_tar.stat().st_size / 1e6)
    return out_tar


def write_tar(out_tar: str | Path, members: tp.Mapping[str, bytes]) -> Path:
    """Write the tar `out_tar` holding `members` (name -> bytes, in that order); the one writer of our tars.

    Atomic: written to a temp file beside it, then renamed, so a partial file never carries the final name. The
    file is mode 0644 less the umask (a file handed to users; `mkstemp` alone would leave it 0600). Every member is
    a regular file, mode 0644, mtime 0, owner 0: the same members make the same archive byte for byte.
    """
    out_tar = Path(out_tar)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".trained_model-", suffix=".tar", dir=out_tar.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for name, data in members.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                member.mode = 0o644
                member.mtime = 0
                tar.addfile(member, io.BytesIO(data))
        os.chmod(tmp, 0o644 & ~current_umask())
        os.replace(tmp, out_tar)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_tar


# ------------------------------------------------------------------------------------------------ sources

DEFAULT_MIN_FREE_BYTES = 10 * 1024**3  # as replicate/flux-fine-tuner: keep 10 GiB of disk free
DOWNLOAD_TIMEOUT = 60.0  # one read
DOWNLOAD_DEADLINE = 3600.0  # a whole download: a 7 GB large model at 2 MB/s
MAX_DOWNLOAD_BYTES = 2 * MAX_MEMBER_BYTES
HUB_TIMEOUT = 10.0
# Beside each cached folder `<key>/`, `.<key>.json`: what it was made from (URL / repo id, commit); its mtime is
# the last use (the eviction order). Kept outside the folder, which stays exactly the tar's members.
META_SUFFIX = ".json"
# `user/name` or `user/name@revision`, as Hugging Face spells model repo ids.
HF_REPO_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9][\w./-]*))?$"
)
FreeBytes = tp.Callable[[Path], int]


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from. `kind`: `path`, `url`, `data` or `hf`; `label`: what the user gave, for messages
    (a data: URI shortened); `location`: a path, URL, the data: URI, or a repo id (`revision` then its @revision)."""

    kind: str
    label: str
    location: str
    revision: str | None = None


def classify(weights: str | os.PathLike[str]) -> WeightsSource:
    """Tell the kinds of weights reference apart.

    - `data:...`: a data: URI (base64 or percent-encoded) holding a trained_model.tar;
    - `http://`, `https://`: a URL of a trained_model.tar; `file://`: a local path;
    - an existing local path: a path, always. A relative path such as `out/trained_model.tar` or `runs/v2` that
      exists is a path even though it looks like a repo id: the existing path wins;
    - `user/name` or `user/name@revision` that is not an existing path (and does not end in `.tar`, which a missing
      local tar does): a Hugging Face model repo id;
    - anything else: a local path (reported as missing if it does not exist).
    """
    text = str(weights).strip()
    if text[:5].lower() == "data:":
        return WeightsSource("data", text[:48] + ("..." if len(text) > 48 else ""), text)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("http", "https"):
        return WeightsSource("url", text, text)
    if parsed.scheme == "file":
        path = urllib.parse.unquote(parsed.path)
        return WeightsSource("path", text, path)
    if len(parsed.scheme) > 1 and "://" in text:  # s3://, gs://, ftp://: one letter would be a Windows drive
        raise WeightsError(
            f"Weights {text}: the {parsed.scheme}:// scheme is not supported. Give an https URL, a local path, a "
            "data: URI or a Hugging Face repo id (user/name) of a trained_model.tar."
        )
    path = Path(text).expanduser()
    match = HF_REPO_ID.match(text)
    if match and not path.exists() and not text.endswith(".tar"):
        return WeightsSource("hf", text, match["repo"], match["revision"])
    return WeightsSource("path", text, str(path))


def cache_dir(kind: str) -> Path:
    path = tiny.cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _meta(folder: Path) -> Path:
    return folder.with_name("." + folder.name + META_SUFFIX)


def _touch(folder: Path) -> None:
    """Mark `folder` as just used (eviction removes the least recently used first)."""
    if folder.parent == cache_dir("weights"):
        _meta(folder).touch()


def _ready(folder: Path) -> bool:
    return (folder / "state_dict.bin").is_file() or (folder / adapters.ADAPTER_CONFIG_FILE).is_file()


def evict(
    keep: tp.Iterable[str | Path] = (),
    *,
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    free_bytes: FreeBytes | None = None,
    need_bytes: int = 0,
) -> list[Path]:
    """Delete cached weights folders, least recently used first, until the cache's disk has `min_free_bytes`
    (+ `need_bytes`, for a download about to land) free. Folders in `keep` (the weights loaded now) are never
    deleted, nor anything outside `$MGFT_CACHE/weights`. `free_bytes(path)`: free bytes on `path`'s disk (tests
    pass their own). Returns the folders deleted; each is logged."""
    free_bytes = free_bytes or _disk_free
    root = cache_dir("weights")
    kept = {Path(k).resolve() for k in keep}
    target = min_free_bytes + need_bytes
    if free_bytes(root) >= target:
        return []
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.resolve() not in kept]

    def last_used(folder: Path) -> float:
        meta = _meta(folder)
        return meta.stat().st_mtime if meta.exists() else folder.stat().st_mtime

    deleted = []
    for folder in sorted(entries, key=last_used):
        if free_bytes(root) >= target:
            break
        label = _read_source(folder).get("label", folder.name)
        shutil.rmtree(folder, ignore_errors=True)
        _meta(folder).unlink(missing_ok=True)
        deleted.append(folder)
        logger.info("Evicted cached weights %s (%s) to keep %.1f GiB free", folder.name, label, target / 2**30)
    if free_bytes(root) < target:
        logger.warning(
            "Only %.1f GiB free on the weights cache's disk (%s) after evicting every unused weights (wanted %.1f GiB)",
            free_bytes(root) / 2**30,
            root,
            target / 2**30,
        )
    return deleted


def _read_source(folder: Path) -> dict[str, tp.Any]:
    try:
        return json.loads(_meta(folder).read_text())
    except (OSError, ValueError):
        return {}


def _download(
    url: str,
    target: Path,
    *,
    deadline: float | None = None,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    on_chunk: tp.Callable[[int], None] | None = None,
) -> int:
    """Stream `url` into `target` through a `.part` file (a partial download never carries the final name); returns
    the bytes received. Bounded three ways: each read waits at most `DOWNLOAD_TIMEOUT`, the whole download at most
    `deadline` seconds, and at most `max_bytes` bytes are taken whatever the server announces. `on_chunk(received)`
    runs after each chunk written (the cache makes room as real bytes arrive, never for a size a header claims)."""
    deadline = DOWNLOAD_DEADLINE if deadline is None else deadline
    tmp = target.with_name(target.name + ".part")
    started = time.monotonic()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(tmp, "wb") as out:
            while True:
                if time.monotonic() - started > deadline:
                    raise WeightsError(
                        f"Could not download weights from {url}: not finished after {deadline:.0f} s "
                        f"({received / 1e6:.1f} MB received). Check the server and the network, or give a faster URL."
                    )
                chunk = response.read1(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
                if received > max_bytes:
                    raise WeightsError(
                        f"Could not download weights from {url}: more than {max_bytes / 2**30:.0f} GiB, far more "
                        "than any trained_model.tar. Check the URL."
                    )
                out.write(chunk)
                if on_chunk is not None:
                    on_chunk(received)
        os.replace(tmp, target)
    except OSError as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsError(f"Could not download weights from {url}: {reason}. Check the URL and the network.") from None
    finally:
        tmp.unlink(missing_ok=True)
    return received


def _keep_free(keep: tp.Iterable[str | Path], evict_kw: dict[str, tp.Any]) -> tp.Callable[[int], None]:
    """An `on_chunk` for `_download`: every 64 MiB received, evict as `evict` does to keep the free space."""
    kept = [*keep]
    step = 64 << 20
    done = [0]

    def check(received: int) -> None:
        if received - done[0] >= step:
            done[0] = received
            evict(kept, **evict_kw)

    return check


def _decode_data_uri(uri: str, label: str) -> bytes:
    import base64
    import binascii

    header, sep, payload = uri.partition(",")
    if not sep:
        raise WeightsError(
            f"Weights {label}: a data: URI needs a comma before its payload (data:application/x-tar;base64,<...>)."
        )
    try:
        if header.lower().endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise WeightsError(f"Weights {label}: the data: URI's base64 payload does not decode ({e}).") from None


def unpack(
    weights: str | os.PathLike[str],
    *,
    keep: tp.Iterable[str | Path] = (),
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    free_bytes: FreeBytes | None = None,
) -> Path:
    """A folder holding the weights of a `trained_model.tar` given as a local path, an http(s) URL, a `data:` URI
    or a Hugging Face repo id (see `classify`); returns it.

    - A local folder holding the checkpoint files (or an adapter) is returned as is; a local tar is extracted into
      the cache keyed by its content (the user's file is never touched).
    - A URL is downloaded once, extracted into the cache keyed by the URL, and the download deleted: the unpacked
      folder is the one copy (the server is not asked again while it is cached).
    - A data: URI is decoded, extracted (keyed by content), and the decoded tar deleted.
    - A repo id: see `_fetch_hf`.

    Before anything lands, the cache is evicted (`evict`, least recently used first) to keep `min_free_bytes` free;
    folders in `keep` (the weights loaded now) are never evicted. Only regular files with known names are taken
    from an archive (a leading folder is allowed); links, devices and paths outside are refused. Every error names
    the reference the user gave, not a cache file.
    """
    source = classify(weights)
    evict_kw = {"min_free_bytes": min_free_bytes, "free_bytes": free_bytes}
    if source.kind == "hf":
        return _fetch_hf(source, keep=keep, **evict_kw)
    if source.kind == "url":
        folder = cache_dir("weights") / ("url-" + _key(source.location))
        if _ready(folder):
            logger.info("Using the cached weights of %s (%s)", source.label, folder)
            _touch(folder)
            return folder
        # Earlier versions kept each download as downloads/<key>.tar forever, beside its unpacked folder: unpack
        # that one instead of downloading again, then delete it like any download.
        legacy = cache_dir("downloads") / (_key(source.location) + ".tar")
        download = legacy if legacy.is_file() else cache_dir("downloads") / (folder.name + ".tar")
        try:
            if download is legacy:
                logger.info("Unpacking the earlier download of %s (then deleting it)", source.label)
            else:
                # Room is made for bytes that arrived, never for a size the server announces (one Content-Length
                # header could empty the whole cache): the free space is kept as chunks land.
                evict([*keep], **evict_kw)
                logger.info("Downloading weights from %s", source.label)
                _download(source.location, download, on_chunk=_keep_free(keep, evict_kw))
            evict([*keep], need_bytes=download.stat().st_size, **evict_kw)  # the extraction's size, now known
            _extract(download, source.label, folder)
        finally:
            download.unlink(missing_ok=True)  # the unpacked folder is the one copy
        _write_source(folder, {"label": source.label, "kind": "url"})
        return folder
    if source.kind == "data":
        data = _decode_data_uri(source.location, source.label)
        folder = cache_dir("weights") / hashlib.sha256(data).hexdigest()[:20]
        if _ready(folder):
            _touch(folder)
            return folder
        evict([*keep], need_bytes=2 * len(data), **evict_kw)
        fd, name = tempfile.mkstemp(prefix=".data-", suffix=".tar", dir=cache_dir("downloads"))
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            del data
            _extract(Path(name), source.label, folder)
        finally:
            Path(name).unlink(missing_ok=True)
        _write_source(folder, {"label": source.label, "kind": "data"})
        return folder
    path = Path(source.location)
    if not path.exists():
        hint = ""
        if HF_REPO_ID.match(source.label) and source.label.endswith(".tar"):
            hint = " (a name ending in .tar is read as a local path, not as a Hugging Face repo id)"
        raise WeightsError(
            f"Weights not found: {source.label} does not exist{hint}. Give the path, an https URL, a data: URI or a "
            "Hugging Face repo id (user/name) of a trained_model.tar."
        )
    if path.is_dir():
        _check_folder(path, source.label)
        return path
    if not tarfile.is_tarfile(path):
        raise WeightsError(
            f"{source.label} is not a trained_model.tar: expected a tar archive holding "
            f"{', '.join(CHECKPOINT_FILES)} and {FINETUNE_FILE} (as written by train.py)."
        )
    folder = cache_dir("weights") / _sha256(path)[:20]
    if _ready(folder):
        _touch(folder)
        return folder
    evict([*keep], need_bytes=path.stat().st_size, **evict_kw)
    _extract(path, source.label, folder)
    _write_source(folder, {"label": source.label, "kind": "path"})
    return folder


fetch = unpack  # the weights folder for any reference `classify` accepts, under its other name


def _write_source(folder: Path, info: dict[str, tp.Any]) -> None:
    _meta(folder).write_text(json.dumps(info))


def _extract(path: Path, label: str, folder: Path) -> None:
    """Extract the weights members of the tar `path` into `folder` (atomically: a temp folder renamed; an existing
    `folder` is replaced). `label` names the archive in errors (the URL / path / repo id the user gave)."""
    if not tarfile.is_tarfile(path):
        raise WeightsError(
            f"{label} is not a trained_model.tar: expected a tar archive holding "
            f"{', '.join(CHECKPOINT_FILES)} and {FINETUNE_FILE} (as written by train.py)."
        )
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder.parent))
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if not member.isfile() or name not in KNOWN_FILES:
                    is_report = member.name.lstrip("./").startswith(REPORT_MEMBERS)
                    if (member.isfile() and not is_report) or member.issym() or member.islnk():
                        logger.warning("Ignoring %s in %s (not a weights file)", member.name, label)
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise WeightsError(f"{member.name} in {label} is implausibly large ({member.size} bytes)")
                source = tar.extractfile(member)
                assert source is not None
                with open(tmp / name, "wb") as out:
                    shutil.copyfileobj(source, out, length=1 << 20)
        _check_folder(tmp, label)
        if folder.exists():  # a stale copy (e.g. an older commit of a repo): replaced whole
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            if not _ready(folder):  # another process unpacked the same weights first
                raise
    except (tarfile.TarError, EOFError) as e:
        raise WeightsError(f"{label} is a corrupt tar archive ({e}); re-download or re-export it.") from None
    except OSError as e:  # a full disk or an I/O error while writing the members: one line, nothing half-unpacked
        raise DiskError(
            f"Could not unpack the weights {label} into {folder.parent}: {e.strerror or e}. Free disk space there "
            "(the cache evicts unused weights only down to its free-space threshold) or check the folder's permissions."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_hf(
    source: WeightsSource,
    *,
    keep: tp.Iterable[str | Path],
    min_free_bytes: int,
    free_bytes: FreeBytes | None,
) -> Path:
    """The weights of a Hugging Face model repo (`user/name`, `@revision` optional) holding a trained_model.tar
    (any `*.tar`; `trained_model.tar` preferred) or its extracted members / LoRA adapter files at the root.

    - Extracted members: downloaded through huggingface_hub into its cache, whose snapshot folder is returned (the
      hub cache is then the one copy).
    - A tar: downloaded into a temp folder, extracted into our cache (keyed by repo id and revision, with the
      commit it came from), the tar deleted. The hub is asked for the commit each time; when it is unreachable
      (offline, `HF_HUB_OFFLINE=1`), the cached folder is used, else the huggingface_hub cache.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision, label = source.location, source.revision, source.label
    folder = cache_dir("weights") / ("hf-" + _key(f"{repo}@{revision or 'main'}"))
    members = list(KNOWN_FILES)
    try:
        info = HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise WeightsError(
            f"Weights {label}: no such Hugging Face model repo, or it is private/gated ({type(e).__name__}), and no "
            f"such local path. Check the repo id (user/name) or the path; for a private repo set HF_TOKEN."
        ) from None
    except RevisionNotFoundError:
        raise WeightsError(f"Weights {label}: the repo has no revision {revision!r}.") from None
    except Exception as e:  # noqa: BLE001 - offline or unreachable: the caches may still hold it
        if _ready(folder):
            logger.info("Hub unreachable for %s (%s); using the cached weights of %s", label, type(e).__name__, folder)
            _touch(folder)
            return folder
        try:
            snapshot = Path(
                snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=[*members, "*.tar"])
            )
        except Exception:  # noqa: BLE001 - not cached either: one message below
            raise WeightsError(
                f"Weights {label}: not a local path, and as a Hugging Face repo id: the hub could not be reached "
                f"({type(e).__name__}: {e}) and the repo is not cached (looked in {cache_dir('weights')} and "
                f"{hf_cache_hint()}). Connect to the network, or give the trained_model.tar as a path or URL."
            ) from None
        return _from_snapshot(snapshot, source, folder, keep, min_free_bytes, free_bytes)
    files = [s.rfilename for s in info.siblings or []]
    if any(f in files for f in ("state_dict.bin", adapters.ADAPTER_CONFIG_FILE)):
        logger.info("Downloading the weights of %s (commit %s) from the Hugging Face hub", label, info.sha)
        snapshot = Path(snapshot_download(repo, revision=info.sha, allow_patterns=members))
        _check_folder(snapshot, label)
        return snapshot
    tar_name = _pick_tar(files, label)
    if _ready(folder) and _read_source(folder).get("commit") == info.sha:
        logger.info("Using the cached weights of %s (commit %s)", label, info.sha)
        _touch(folder)
        return folder
    # The hub's announced size is not trusted for eviction either: room for the download's real size once it is here.
    evict([*keep], min_free_bytes=min_free_bytes, free_bytes=free_bytes)
    logger.info("Downloading %s of %s (commit %s) from the Hugging Face hub", tar_name, label, info.sha)
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=cache_dir("downloads")) as tmp:
        try:
            path = Path(hf_hub_download(repo, tar_name, revision=info.sha, local_dir=tmp))
        except Exception as e:  # noqa: BLE001 - one message naming the repo
            raise WeightsError(f"Could not download {tar_name} of {label}: {type(e).__name__}: {e}") from None
        evict([*keep], need_bytes=path.stat().st_size, min_free_bytes=min_free_bytes, free_bytes=free_bytes)
        _extract(path, label, folder)
    _write_source(folder, {"label": label, "kind": "hf", "commit": info.sha})
    return folder


def _pick_tar(files: tp.Sequence[str], label: str) -> str:
    tars = sorted(f for f in files if f.endswith(".tar"))
    if "trained_model.tar" in tars:
        return "trained_model.tar"
    if len(tars) == 1:
        return tars[0]
    raise WeightsError(
        f"Weights {label}: the repo holds {'several tars (' + ', '.join(tars) + ')' if tars else 'no tar'} and no "
        f"{' / '.join(CHECKPOINT_FILES)} or {adapters.ADAPTER_FILE} at its root (it has: {', '.join(files[:12])}). "
        "Upload the trained_model.tar (or its extracted files) to the repo's root."
    )


def _from_snapshot(
    snapshot: Path,
    source: WeightsSource,
    folder: Path,
    keep: tp.Iterable[str | Path],
    min_free_bytes: int,
    free_bytes: FreeBytes | None,
) -> Path:
    """Weights from a repo snapshot in the huggingface_hub cache (offline): its folder, or its tar extracted."""
    if _ready(snapshot):
        _check_folder(snapshot, source.label)
        return snapshot
    tar_name = _pick_tar([p.name for p in snapshot.iterdir()], source.label)
    evict([*keep], min_free_bytes=min_free_bytes, free_bytes=free_bytes)
    # The hub cache's file is left alone: that cache is huggingface_hub's (and perhaps the user's), not ours.
    _extract(snapshot / tar_name, source.label, folder)
    _write_source(folder, {"label": source.label, "kind": "hf", "commit": snapshot.name})
    return folder


def _check_folder(folder: Path, label: str | None = None) -> None:
    """A folder holds loadable weights: the checkpoint files (state_dict.bin an audiocraft LM checkpoint), or only
    a LoRA adapter whose config names its base model."""
    label = label or str(folder)
    # Checksums first: a flipped byte is then reported as a corrupt member, whatever torch.load would make of it.
    verify_members(folder, read_finetune_info(folder, label), label)
    adapter_only = (folder / adapters.ADAPTER_CONFIG_FILE).is_file() and not (folder / "state_dict.bin").is_file()
    if adapter_only:
        if not (folder / adapters.ADAPTER_FILE).is_file():
            raise WeightsError(f"Weights {label}: {adapters.ADAPTER_CONFIG_FILE} without {adapters.ADAPTER_FILE}.")
        if not _base_of(folder, read_finetune_info(folder, label)):
            raise WeightsError(
                f"Weights {label}: a LoRA adapter whose {adapters.ADAPTER_CONFIG_FILE} (and {FINETUNE_FILE}) names no "
                "base_model: it cannot be applied. Upload the whole trained_model.tar."
            )
        return
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        raise WeightsError(
            f"The weights {label} lack {', '.join(missing)}: a trained_model.tar must hold "
            f"{', '.join(CHECKPOINT_FILES)} (and {FINETUNE_FILE}). Was it written by train.py?"
        )
    try:
        pkg = torch.load(folder / "state_dict.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"state_dict.bin of {label} is not a readable torch checkpoint ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
        raise WeightsError(
            f"state_dict.bin of {label} is not an audiocraft LM checkpoint (no 'best_state' / 'xp.cfg')."
        )


def _base_of(folder: Path, info: dict[str, tp.Any]) -> str:
    """The base model a fine-tune references: finetune.json's, else (adapter-only repos) adapter_config.json's."""
    base = str(info.get("base_model", "") or "")
    if not base and (folder / adapters.ADAPTER_CONFIG_FILE).is_file():
        try:
            config = json.loads((folder / adapters.ADAPTER_CONFIG_FILE).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            config = {}
        base = config.get("base_model") if isinstance(config, dict) else None
        base = base if isinstance(base, str) else ""
    return base


MAX_FINETUNE_BYTES = 16 * 1024**2  # finetune.json holds settings and a report summary: kilobytes, not megabytes
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def read_finetune_info(folder: str | Path, label: str | None = None) -> dict[str, tp.Any]:
    """finetune.json of a weights folder, every field we read typed and bounded (`check_finetune_info`); `{}` when
    there is none (tars written before it existed). Whatever the file holds, a bad one is a `WeightsError` naming
    the weights and the fix, never a traceback: weights come from anyone's URL."""
    label = label or str(folder)
    path = Path(folder) / FINETUNE_FILE
    if not path.is_file():
        return {}
    fix = "Re-export the trained_model.tar with train.py (or re-download it)."
    try:
        if path.stat().st_size > MAX_FINETUNE_BYTES:
            raise WeightsError(f"{FINETUNE_FILE} of {label} is over {MAX_FINETUNE_BYTES >> 20} MB: not ours. {fix}")
        text = path.read_bytes().decode("utf-8")
        info = json.loads(text)
    except UnicodeDecodeError as e:
        raise WeightsError(f"{FINETUNE_FILE} of {label} is not UTF-8 text (byte {e.start}). {fix}") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{FINETUNE_FILE} of {label} is not valid JSON ({e}). {fix}") from None
    except RecursionError:
        raise WeightsError(f"{FINETUNE_FILE} of {label} is nested too deeply to be ours. {fix}") from None
    except OSError as e:
        raise WeightsError(f"{FINETUNE_FILE} of {label} could not be read ({e.strerror or e}). {fix}") from None
    check_finetune_info(info, label)
    return info


def check_finetune_info(info: tp.Any, label: str) -> None:
    """The fields of finetune.json the loader reads, each of its type and within bounds: a JSON object;
    `format_version` one this code reads; `base_model`, `method` short strings; `integrity.sha256` a map of weights
    member names (`INTEGRITY_MEMBERS`: plain names in the weights folder, never a path) to sha256 hex digests;
    `integrity.base_architecture` a sha256 hex digest. Other fields are the training's record, for people."""
    fix = "Re-export the trained_model.tar with train.py (or re-download it)."

    def bad(what: str) -> WeightsError:
        return WeightsError(f"{FINETUNE_FILE} of {label}: {what}. {fix}")

    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, found {_json_type(info)}")
    version = info.get("format_version", FORMAT_VERSION)  # tars from before the field are the first format
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WeightsError(
            f"{FINETUNE_FILE} of {label}: format_version {str(version)[:40]!r} is not a format this code knows "
            f"(it reads format {FORMAT_VERSION}). Use a trained_model.tar written by train.py."
        )
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{FINETUNE_FILE} of {label}: format_version {version} was written by a newer version of this fine-tuner "
            f"(this one reads format {FORMAT_VERSION}): upgrade it to load these weights."
        )
    for name in ("base_model", "method"):
        value = info.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 4096):
            raise bad(f"{name} must be a string (a model_version or folder), found {_json_type(value)}")
    integrity = info.get("integrity")
    if integrity is None:
        return
    if not isinstance(integrity, dict):
        raise bad(f"integrity must be an object, found {_json_type(integrity)}")
    sha = integrity.get("sha256")
    if sha is not None:
        if not isinstance(sha, dict):
            raise bad(f"integrity.sha256 must be an object (member name: sha256), found {_json_type(sha)}")
        for name, digest in sha.items():
            if name not in INTEGRITY_MEMBERS:
                # Only the known member names: a path here would make the loader read (and report on) a file
                # outside the weights folder.
                raise bad(f"integrity.sha256 lists {name[:60]!r}, which is not a weights member")
            if not isinstance(digest, str) or not HEX64.match(digest):
                raise bad(f"integrity.sha256 of {name} is not a sha256 hex digest")
    fingerprint = integrity.get("base_architecture")
    if fingerprint is not None and not (isinstance(fingerprint, str) and HEX64.match(fingerprint)):
        raise bad("integrity.base_architecture is not a sha256 hex digest")


def _json_type(value: tp.Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ integrity


def verify_members(folder: Path, info: dict[str, tp.Any], label: str) -> None:
    """Check each weights member against the sha256 finetune.json records (`integrity.sha256`).

    Tars written before these fields existed load with an info line. Called on every folder `unpack` returns
    except cached ones (checked when they were extracted).
    """
    recorded = (info.get("integrity") or {}).get("sha256")
    if not recorded:
        logger.info("%s records no checksums (written before they were added): its members are not verified", label)
        return
    for name, expected in sorted(recorded.items()):
        path = _member(folder, name, label)
        if not path.is_file():
            raise WeightsError(f"Weights {label}: {name} is missing, and {FINETUNE_FILE} lists it. Re-export the tar.")
        actual = _sha256(path)
        if actual != expected:
            raise WeightsError(
                f"Weights {label}: {name} is corrupt (sha256 {actual[:16]}..., {FINETUNE_FILE} records "
                f"{expected[:16]}...). Re-download or re-export the trained_model.tar."
            )


def _member(folder: Path, name: str, label: str) -> Path:
    """`folder / name` for a weights member `name`, confined to the folder: a plain known name (finetune.json is
    checked for that), and no link leading out of it (in the Hugging Face cache, a snapshot's files are links to
    its repo's `blobs/`, which is theirs). Nothing outside is looked at: the error says nothing about it."""
    if name not in INTEGRITY_MEMBERS:
        raise WeightsError(f"Weights {label}: {FINETUNE_FILE} lists {name[:60]!r}, which is not a weights member.")
    path = folder / name
    if path.is_symlink():
        roots = [folder.resolve()]
        if folder.parent.name == "snapshots":
            roots.append((folder.parent.parent / "blobs").resolve())
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            target = None
        if target is None or not any(target.is_relative_to(root) for root in roots):
            raise WeightsError(
                f"Weights {label}: {name} is a link leading out of the weights folder; give a folder holding the "
                "files themselves (or the trained_model.tar)."
            )
    return path


def verify_architecture(info: dict[str, tp.Any], cfg: tp.Any, base: str, label: str) -> None:
    """The base architecture `cfg` describes must be the one the weights were trained on (finetune.json's
    `integrity.base_architecture`): an adapter never goes into another base."""
    recorded = (info.get("integrity") or {}).get("base_architecture")
    if not recorded:
        logger.info("%s records no base architecture fingerprint (an older tar): not verified", label)
        return
    actual = architecture_fingerprint(cfg)
    if actual != recorded:
        raise WeightsError(
            f"Weights {label} were trained on another architecture than base model {base or 'unknown'} "
            f"(fingerprint {actual[:12]} here, {recorded[:12]} recorded in {FINETUNE_FILE}): was base_model in "
            f"{FINETUNE_FILE} changed? Use the model_version the weights were trained on."
        )


# ------------------------------------------------------------------------------------------------ loading


def _load_lm(folder: Path, device: str, load_lm_model: tp.Callable[..., tp.Any]) -> tp.Any:
    """audiocraft's loader, or ours for MusicGen-Style fine-tunes (audiocraft 1.3.0 has no style conditioner)."""
    if style.is_style_folder(folder):
        return style.load_style_lm(folder, device)
    return load_lm_model(str(folder), device=device)


def _base_compression(pkg: dict, device: str, load_compression_model: tp.Callable[..., tp.Any]):
    """The base model's own EnCodec when it is in the Hugging Face cache, else None. Only the cache is looked at:
    asking the hub about a model that is not there costs retries with no network (a trained version boots offline
    with only the reference EnCodec baked into the image)."""
    from huggingface_hub import try_to_load_from_cache

    base = pkg.get("base_model")
    if not ("pretrained" in pkg and base):
        return None
    if not isinstance(try_to_load_from_cache(base, "compression_state_dict.bin"), str):
        logger.info("Base EnCodec of %s not in the Hugging Face cache; using %s", base, pkg["pretrained"])
        return None
    try:
        return load_compression_model(base, device=device)
    except Exception as e:  # noqa: BLE001 - fall back to audiocraft's own reference
        logger.info("Base EnCodec of %s not available (%s); using %s", base, e, pkg["pretrained"])
        return None


# Bounds on an LM config inside state_dict.bin, for bases the catalogue cannot describe (a local model folder, a
# style model, a model trained from scratch): wide enough for every MusicGen, far below what would exhaust memory.
LM_CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "dim": (8, 8192),
    "num_heads": (1, 128),
    "num_layers": (1, 96),
    "n_q": (1, 32),
    "card": (2, 65536),
}
MAX_LM_PARAMETERS = 4_500_000_000  # musicgen-large, the largest base, has 3.3 B
SCRATCH_CODEBOOKS = {"micro": (4, 2048), "tiny-micro": (tiny.N_Q, tiny.CARD)}  # (n_q, card) of their EnCodec


def base_architecture(base: str) -> dict[str, int]:
    """What the catalogue knows of base model `base`'s LM (`transformer_lm` keys: dim, num_heads, num_layers, n_q,
    card); empty for a base it does not describe (a local folder)."""
    name = {v: k for k, v in PRETRAINED.items()}.get(base, base)  # a facebook/musicgen-* id as its version
    known: dict[str, int] = {}
    if name in (*TINY_VERSIONS, *STYLE_TINY_VERSIONS):
        lm = tiny.lm_cfg(name)["transformer_lm"]
        return {key: int(lm[key]) for key in LM_CONFIG_BOUNDS}
    if name in LM_LAYOUTS:
        known["num_layers"], known["n_q"] = LM_LAYOUTS[name]
    if name in LM_WIDTHS:
        known["dim"], known["num_heads"] = LM_WIDTHS[name]
    if name in PRETRAINED:
        known["card"] = 2048
    if name in SCRATCH_CODEBOOKS:
        known["n_q"], known["card"] = SCRATCH_CODEBOOKS[name]
    return known


def check_lm_config(cfg: tp.Any, base: str, label: str) -> None:
    """The LM config a full fine-tune's state_dict.bin carries, checked before anything is built from it: every
    size an integer within `LM_CONFIG_BOUNDS`, the whole under `MAX_LM_PARAMETERS`, and equal to the declared base's
    architecture where the catalogue knows it (a fine-tune keeps its base's shape). A config that asks for more is
    refused by name instead of allocated."""
    fix = "Use the trained_model.tar train.py wrote: its state_dict.bin was altered or is not ours."
    try:
        plain = _plain(cfg)
    except Exception as e:  # noqa: BLE001 - whatever the file holds: one message
        raise WeightsError(
            f"state_dict.bin of {label}: its 'xp.cfg' is not a config ({type(e).__name__}). {fix}"
        ) from None
    lm = plain.get("transformer_lm")
    if not isinstance(lm, dict):
        raise WeightsError(f"state_dict.bin of {label}: its config has no transformer_lm section. {fix}")
    sizes: dict[str, int] = {}
    for key, (low, high) in LM_CONFIG_BOUNDS.items():
        value = lm.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise WeightsError(
                f"state_dict.bin of {label}: transformer_lm.{key} is {str(value)[:40]}, outside {low}..{high}. {fix}"
            )
        sizes[key] = value
    if sizes["dim"] % sizes["num_heads"]:
        raise WeightsError(
            f"state_dict.bin of {label}: transformer_lm.dim {sizes['dim']} is not a multiple of num_heads "
            f"{sizes['num_heads']}. {fix}"
        )
    parameters = 12 * sizes["num_layers"] * sizes["dim"] ** 2 + 2 * sizes["n_q"] * sizes["card"] * sizes["dim"]
    if parameters > MAX_LM_PARAMETERS:
        raise WeightsError(
            f"state_dict.bin of {label}: its config describes an LM of about {parameters / 1e9:.0f} B parameters, "
            f"more than any MusicGen ({MAX_LM_PARAMETERS / 1e9:.1f} B at most). {fix}"
        )
    expected = base_architecture(base)
    differ = [f"{key} {sizes[key]} (base: {value})" for key, value in expected.items() if sizes[key] != value]
    if differ:
        raise WeightsError(
            f"state_dict.bin of {label} does not have the architecture of its base model {base}: "
            f"{', '.join(differ)}. Was base_model in {FINETUNE_FILE} changed? {fix}"
        )
    segment = (plain.get("dataset") or {}).get("segment_duration") if isinstance(plain.get("dataset"), dict) else None
    if segment is not None and (
        not isinstance(segment, int | float) or isinstance(segment, bool) or not 0 < segment <= 3600
    ):
        raise WeightsError(
            f"state_dict.bin of {label}: dataset.segment_duration {str(segment)[:40]} is not a duration in seconds "
            f"(0..3600). {fix}"
        )


@dataclass(frozen=True)
class OpenedWeights:
    """Weights fetched, unpacked and checked, nothing built yet (`open_weights`): what `load_trained_model` builds
    from. `adapter`: they reference their base (LoRA adapter or learned embeddings) instead of carrying a full LM."""

    folder: Path
    info: dict[str, tp.Any]
    base: str
    label: str
    adapter: bool

    @property
    def method(self) -> str:
        return str(self.info.get("method") or ("adapter" if self.adapter else "full"))

    @property
    def lora(self) -> bool:
        return (self.folder / adapters.ADAPTER_CONFIG_FILE).is_file()


def open_weights(
    weights: str | os.PathLike[str],
    *,
    keep: tp.Iterable[str | Path] = (),
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    free_bytes: FreeBytes | None = None,
) -> OpenedWeights:
    """Everything about weights that needs no model: fetch and unpack (`unpack`), verify the members' checksums,
    read finetune.json (typed and bounded), and for a full LM check its config against its base's architecture.
    A caller can do this while another model still serves, and build only weights that passed."""
    label = classify(weights).label
    folder = unpack(weights, keep=keep, min_free_bytes=min_free_bytes, free_bytes=free_bytes)
    info = read_finetune_info(folder, label)
    base = _base_of(folder, info)
    adapter = (folder / adapters.ADAPTER_CONFIG_FILE).is_file() or (folder / adapters.EMBEDDINGS_FILE).is_file()
    if adapter:
        if not base:
            raise WeightsError(f"{FINETUNE_FILE} of {label} names no base_model: its adapter cannot be applied.")
        return OpenedWeights(folder, info, base, label, adapter)
    try:
        # mmap: only the config is read here, not gigabytes of weights
        pkg = torch.load(folder / "state_dict.bin", map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"state_dict.bin of {label} is not a readable torch checkpoint ({type(e).__name__})."
        ) from None
    if not isinstance(pkg, dict) or "xp.cfg" not in pkg:
        raise WeightsError(f"state_dict.bin of {label} is not an audiocraft LM checkpoint (no 'xp.cfg').")
    check_lm_config(pkg["xp.cfg"], base, label)
    verify_architecture(info, pkg["xp.cfg"], base, label)
    return OpenedWeights(folder, info, base, label, adapter)


def load_trained_model(
    weights: str | Path | OpenedWeights,
    device: str | None = None,
    *,
    lora_scale: float = 1.0,
    keep: tp.Iterable[str | Path] = (),
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    free_bytes: FreeBytes | None = None,
):
    """A fine-tuned MusicGen from a `trained_model.tar` (any reference `unpack` takes), its extracted folder, or
    weights `open_weights` already opened.

    Uses audiocraft's loaders. For a facebook/musicgen-* base, the base's own EnCodec is used when it is in the
    Hugging Face cache; otherwise audiocraft's reference (`facebook/encodec_32khz`) is followed. The members are
    checked against finetune.json's checksums, a full LM's config against its base's architecture, and an
    adapter's base against the recorded architecture. `lora_scale` scales a LoRA adapter's update (0: the base
    exactly, 1: as trained); for other weights a value other than 1 is ignored with a warning. `keep`,
    `min_free_bytes`, `free_bytes`: the cache eviction (`evict`). The model gets `weights_folder` (where its
    weights live) and `is_lora`.
    """
    from audiocraft.models import MusicGen
    from audiocraft.models.loaders import load_compression_model, load_lm_model

    if not isinstance(weights, OpenedWeights):
        weights = open_weights(weights, keep=keep, min_free_bytes=min_free_bytes, free_bytes=free_bytes)
    folder, info, base, label = weights.folder, weights.info, weights.base, weights.label
    device = device or default_device()
    if weights.adapter:
        model = _load_with_adapter(folder, info, base, device, label=label, lora_scale=lora_scale)
        model.weights_folder = folder
        return model
    if lora_scale != 1.0:
        logger.warning(
            "lora_scale=%g is ignored: %s are %s weights, not a LoRA adapter",
            lora_scale,
            label,
            info.get("method", "full"),
        )
    model_home = tiny.ensure_tiny(base) if base in TINY_VERSIONS else folder
    try:
        with tiny.tiny_hubs(model_home):
            lm = _load_lm(folder, device, load_lm_model)
        pkg = torch.load(folder / "compression_state_dict.bin", map_location="cpu", weights_only=True)
        compression = _base_compression(pkg, device, load_compression_model)
        if compression is None:
            compression = load_compression_model(str(folder), device=device)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailableError(
            f"Could not load the fine-tuned weights {label} (base {base or 'unknown'}): {type(e).__name__}: {e}. "
            "If the base is a facebook/musicgen-* model, its EnCodec must be downloadable or in the HF cache."
        ) from None
    if "self_wav" in lm.condition_provider.conditioners:  # as MusicGen.get_pretrained does
        lm.condition_provider.conditioners["self_wav"].match_len_on_eval = True
        lm.condition_provider.conditioners["self_wav"]._use_masking = False
    model = MusicGen(f"fine-tune of {base}" if base else label, compression, lm)
    model.finetune_info = info
    model.weights_folder = folder
    model.is_lora = False
    return model


def _load_with_adapter(
    folder: Path, info: dict[str, tp.Any], base: str, device: str, *, label: str, lora_scale: float = 1.0
):
    """A fine-tune that references its base (LoRA, textual inversion, text projection): the base model (by its
    model_version, as trained) with the adapter merged into its LM (scaled by `lora_scale`) and/or the learned
    tensors put in. The base's architecture must match the fingerprint finetune.json records."""
    lora = (folder / adapters.ADAPTER_CONFIG_FILE).is_file()
    if lora and not (folder / adapters.ADAPTER_FILE).is_file():
        raise WeightsError(f"{adapters.ADAPTER_CONFIG_FILE} without {adapters.ADAPTER_FILE} in {label}.")
    model = versions.load_musicgen(base, device)
    cfg = getattr(model.lm, "cfg", None)
    if cfg is not None:
        verify_architecture(info, cfg, base, label)
    if not lora and lora_scale != 1.0:
        logger.warning("lora_scale=%g is ignored: %s hold %s weights, not a LoRA adapter", lora_scale, label,
                       info.get("method", "learned embedding"))  # fmt: skip
    try:
        if lora:
            adapters.apply_lora_files(model.lm, folder, merge=True, strength=lora_scale)
        if (folder / adapters.EMBEDDINGS_FILE).is_file():
            adapters.apply_partial_file(model.lm, folder)
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, ArithmeticError, OSError) as e:
        raise WeightsError(
            f"The learned weights of {label} do not fit base model {base} ({type(e).__name__}: {e}); "
            "was it trained on another model_version?"
        ) from None
    model.name = f"{info.get('method', 'adapter')} fine-tune of {base}"
    model.finetune_info = info
    model.is_lora = lora
    return model
