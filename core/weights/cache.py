"""Where weights come from and where they are kept: a local path, an http(s) URL, a `data:` URI or a Hugging Face
model repo id (`user/name[@revision]`), each kept once on disk as an unpacked folder in `$MGFT_CACHE/weights/` (a
downloaded tar is deleted once unpacked); that cache is evicted least-recently-used to keep free disk above a
threshold. Every folder is checked (`core.weights.integrity.check_folder`) before it is handed out."""

from __future__ import annotations

import hashlib
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

from core import adapters, tiny
from core.catalogue import CHECKPOINT_FILES
from core.errors import DiskError, WeightsError
from core.hub import hf_cache_hint
from core.weights.format import FINETUNE_FILE, KNOWN_FILES, MAX_MEMBER_BYTES, PORTABLE_MEMBERS, REPORT_MEMBERS
from core.weights.integrity import check_folder, sha256_file
from core.weights.peft_format import PEFT_CONFIG_FILE, TRANSFORMERS_PATTERNS
from core.weights.transformers_format import CONFIG_FILE as TRANSFORMERS_CONFIG_FILE
from core.weights.transformers_format import is_transformers_folder

logger = logging.getLogger(__name__)


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


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _meta(folder: Path) -> Path:
    return folder.with_name("." + folder.name + META_SUFFIX)


def _touch(folder: Path) -> None:
    """Mark `folder` as just used (eviction removes the least recently used first)."""
    if folder.parent == cache_dir("weights"):
        _meta(folder).touch()


def _ready(folder: Path) -> bool:
    """`folder` holds weights (ours, a LoRA adapter, a transformers MusicGen or a PEFT adapter on one)."""
    return (
        (folder / "state_dict.bin").is_file()
        or (folder / adapters.ADAPTER_CONFIG_FILE).is_file()
        or is_transformers_folder(folder)
    )


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
        check_folder(path, source.label)
        return path
    if not tarfile.is_tarfile(path):
        raise WeightsError(
            f"{source.label} is not a trained_model.tar: expected a tar archive holding "
            f"{', '.join(CHECKPOINT_FILES)} and {FINETUNE_FILE} (as written by train.py)."
        )
    folder = cache_dir("weights") / sha256_file(path)[:20]
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
                inner = member.name.lstrip("./")
                # transformers/: the same weights in transformers' format, for other tools; ours load from ours
                if not member.isfile() or name not in KNOWN_FILES or inner.startswith(PORTABLE_MEMBERS):
                    is_report = inner.startswith((*REPORT_MEMBERS, *PORTABLE_MEMBERS))
                    if (member.isfile() and not is_report) or member.issym() or member.islnk():
                        logger.warning("Ignoring %s in %s (not a weights file)", member.name, label)
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise WeightsError(f"{member.name} in {label} is implausibly large ({member.size} bytes)")
                source = tar.extractfile(member)
                assert source is not None
                with open(tmp / name, "wb") as out:
                    shutil.copyfileobj(source, out, length=1 << 20)
        check_folder(tmp, label)
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
    (any `*.tar`; `trained_model.tar` preferred) or its extracted members / LoRA adapter files at the root, or else a
    transformers MusicGen (`config.json` + safetensors) or a PEFT adapter on one (converted on load).

    - Extracted members, a transformers model or a PEFT adapter: downloaded through huggingface_hub into its cache,
      whose snapshot folder is returned (the hub cache is then the one copy).
    - A tar: downloaded into a temp folder, extracted into our cache (keyed by repo id and revision, with the
      commit it came from), the tar deleted. The hub is asked for the commit each time; when it is unreachable
      (offline, `HF_HUB_OFFLINE=1`), the cached folder is used, else the huggingface_hub cache.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision, label = source.location, source.revision, source.label
    folder = cache_dir("weights") / ("hf-" + _key(f"{repo}@{revision or 'main'}"))
    members = list(KNOWN_FILES)
    portable = list(TRANSFORMERS_PATTERNS)
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
                snapshot_download(
                    repo, revision=revision, local_files_only=True, allow_patterns=[*members, "*.tar", *portable]
                )
            )
        except Exception:  # noqa: BLE001 - not cached either: one message below
            raise WeightsError(
                f"Weights {label}: not a local path, and as a Hugging Face repo id: the hub could not be reached "
                f"({type(e).__name__}: {e}) and the repo is not cached (looked in {cache_dir('weights')} and "
                f"{hf_cache_hint()}). Connect to the network, or give the trained_model.tar as a path or URL."
            ) from None
        return _from_snapshot(snapshot, source, folder, keep, min_free_bytes, free_bytes)
    files = [s.rfilename for s in info.siblings or []]
    if any(f in files for f in ("state_dict.bin", adapters.ADAPTER_FILE)):
        logger.info("Downloading the weights of %s (commit %s) from the Hugging Face hub", label, info.sha)
        snapshot = Path(snapshot_download(repo, revision=info.sha, allow_patterns=members))
        check_folder(snapshot, label)
        return snapshot
    # A trained_model.tar is ours, whole: preferred to the transformers files pushed beside it (training/publish.py)
    if not any(f.endswith(".tar") for f in files) and any(
        f in files for f in (TRANSFORMERS_CONFIG_FILE, PEFT_CONFIG_FILE)
    ):
        logger.info("Downloading the transformers weights of %s (commit %s) from the Hugging Face hub", label, info.sha)
        snapshot = Path(snapshot_download(repo, revision=info.sha, allow_patterns=portable))
        check_folder(snapshot, label)
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
        f"{' / '.join(CHECKPOINT_FILES)}, {adapters.ADAPTER_FILE}, transformers config.json or PEFT "
        f"{PEFT_CONFIG_FILE} at its root (it has: {', '.join(files[:12])}). Upload the trained_model.tar "
        "(or its extracted files) to the repo's root."
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
    names = [p.name for p in snapshot.iterdir()]
    if _ready(snapshot) and not (
        is_transformers_folder(snapshot) and any(n.endswith(".tar") for n in names)
    ):  # ours, or transformers files alone (a trained_model.tar beside them is preferred: it is ours, whole)
        check_folder(snapshot, source.label)
        return snapshot
    tar_name = _pick_tar(names, source.label)
    evict([*keep], min_free_bytes=min_free_bytes, free_bytes=free_bytes)
    # The hub cache's file is left alone: that cache is huggingface_hub's (and perhaps the user's), not ours.
    _extract(snapshot / tar_name, source.label, folder)
    _write_source(folder, {"label": source.label, "kind": "hf", "commit": snapshot.name})
    return folder
