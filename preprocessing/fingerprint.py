"""What an upload holds, by content: a sha256 per audio track, read without unpacking anything to disk.

Two inputs hold the same track when one of its fingerprints is in the other, whatever the names, paths or
containers: the same archive uploaded twice (Cog hands each as its own temp file), a copy, a hard link, another
archive of the same files, a single track given as the whole upload, or a folder prepared from them (preparation
records each clip's source fingerprint in its sidecar, `SOURCE_KEY`). The training run compares its validation set
with its training set this way before preparing either, and records the digest in its resume checkpoints.

An archive is streamed member by member (zip, tar, tar.gz/bz2/xz, a gz/bz2/xz of one track) and its members are
hashed as they would be extracted: only what `unpack.classify` keeps as audio, at most `byte_cap` bytes in all (a
bomb is refused by `unpack` itself, later; here hashing just stops and says so).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import posixpath
import tarfile
import typing as tp
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from core.params import InputError
from preprocessing.dataset import CLIPS_DIR, MANIFEST
from preprocessing.unpack import AUDIO_EXTENSIONS, classify, sniff

logger = logging.getLogger(__name__)

__all__ = ["SOURCE_KEY", "Fingerprints", "fingerprint", "file_sha256", "prepared_folder"]

SOURCE_KEY = "source_sha256"  # a prepared clip's sidecar: the sha256 of the track file it was cut from
_BLOCK = 1 << 20
_STREAMS: dict[str, tp.Callable[..., tp.IO[bytes]]] = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
# What reading a damaged member may raise; such a member is left out (preparation reports it, as it always has).
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, RuntimeError)
_READ_ERRORS += (NotImplementedError, ValueError)


class _CapReached(Exception):
    """More bytes than `byte_cap`: the rest of the upload is not hashed."""


@dataclass
class Fingerprints:
    """`tracks`: each audio track's name in the input -> its fingerprints (sha256 hex digests: its bytes, and for a
    prepared clip without a recorded source, the clip's own bytes). `files`: how many files the input holds."""

    source: str
    kind: str
    tracks: dict[str, frozenset[str]] = field(default_factory=dict)
    primary: dict[str, str] = field(default_factory=dict)  # the one fingerprint of a track that `digest` counts
    files: int = 0
    complete: bool = True  # False: hashing stopped at the byte cap, or a member could not be read

    @property
    def hashes(self) -> frozenset[str]:
        return frozenset().union(*self.tracks.values()) if self.tracks else frozenset()

    @property
    def digest(self) -> str:
        """One sha256 of the set of tracks (names and order do not count): equal for the same tracks."""
        per_track = sorted(set(self.primary.values()))
        return hashlib.sha256("\n".join(per_track).encode()).hexdigest()

    def add(self, name: str, sha: str) -> None:
        self.tracks[name] = frozenset({sha})
        self.primary[name] = sha

    def shared_with(self, other: Fingerprints) -> list[str]:
        """The names of this input's tracks that `other` holds too, sorted."""
        theirs = other.hashes
        return sorted(name for name, h in self.tracks.items() if h & theirs)


class _Hasher:
    def __init__(self, byte_cap: int):
        self.left = byte_cap

    def stream(self, src: tp.IO[bytes]) -> str:
        h = hashlib.sha256()
        while block := src.read(_BLOCK):
            self.left -= len(block)
            if self.left < 0:
                raise _CapReached
            h.update(block)
        return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def prepared_folder(path: Path) -> Path | None:
    """The prepared dataset folder `path` names (itself, or its `dataset/`), or None."""
    for folder in (path, path / "dataset"):
        if folder.is_dir() and (folder / MANIFEST).is_file():
            return folder
    return None


def fingerprint(path: str | Path, input_name: str, byte_cap: int) -> Fingerprints:
    """The tracks of `path` (an archive, an audio file or a prepared folder) by content. Raises `InputError`
    naming `input_name` when it does not exist or is a folder that is not a prepared dataset."""
    source = Path(str(path)).expanduser()
    if not source.exists():
        raise InputError(input_name, f"{path} does not exist; give a zip/tar/gz archive or an audio file")
    folder = prepared_folder(source) if source.is_dir() else None
    if folder is not None:
        return _prepared(folder, str(path), input_name)
    if source.is_dir():
        raise InputError(
            input_name, f"{path} is a folder; zip it (e.g. `zip -r data.zip {source.name}`) and give the zip"
        )
    hasher = _Hasher(byte_cap)
    result = Fingerprints(source=str(path), kind=sniff(source))
    try:
        if result.kind == "zip":
            _zip(source, result, hasher)
        elif result.kind == "tar":
            _tar(source, "r:", result, hasher)
        elif result.kind in _STREAMS:
            _compressed(source, result, hasher)
        else:  # a single track (or something decoding will refuse): its bytes
            result.files = 1
            with open(source, "rb") as f:
                result.add(source.name, hasher.stream(f))
    except _CapReached:
        result.complete = False
        logger.warning(
            "%s: only the first %.1f GiB were fingerprinted; tracks past that are not compared", path, byte_cap / 2**30
        )
    return result


def _keep(name: str) -> bool:
    return classify(name) is None and posixpath.splitext(name)[1].lower() in AUDIO_EXTENSIONS


def _member(result: Fingerprints, name: str, opener: tp.Callable[[], tp.IO[bytes] | None], hasher: _Hasher) -> None:
    result.files += 1
    if not _keep(name):
        return
    try:
        src = opener()
        if src is None:
            return
        with src:
            result.add(name, hasher.stream(src))
    except _CapReached:
        raise
    except _READ_ERRORS:
        result.complete = False


def _zip(path: Path, result: Fingerprints, hasher: _Hasher) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        result.complete = False
        return
    with zf:
        for info in zf.infolist():
            if info.is_dir() or info.flag_bits & 0x1:  # encrypted members are skipped by unpack too
                continue
            _member(result, info.filename.replace("\\", "/").lstrip("/"), lambda i=info: zf.open(i), hasher)


def _tar(path: Path | None, mode: str, result: Fingerprints, hasher: _Hasher, fileobj: tp.IO[bytes] | None = None):
    try:
        with tarfile.open(path, mode, fileobj=fileobj) as tf:
            for member in tf:
                if member.isreg():
                    _member(result, member.name.lstrip("/"), lambda m=member: tf.extractfile(m), hasher)
    except _CapReached:
        raise
    except _READ_ERRORS:
        result.complete = False


def _compressed(path: Path, result: Fingerprints, hasher: _Hasher) -> None:
    """A compressed stream: a tar inside (streamed), else one track (its decompressed bytes, as unpack stores it)."""
    opener = _STREAMS[result.kind]
    try:
        with opener(path, "rb") as probe:
            head = probe.read(512)
        if len(head) >= 262 and head[257:262] == b"ustar":
            with opener(path, "rb") as stream:
                _tar(None, "r|", result, hasher, fileobj=stream)
            return
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip inside needs seeking: unpack handles it, not hashed
            result.complete = False
            return
        result.files = 1
        with opener(path, "rb") as stream:
            result.add(path.name, hasher.stream(stream))
    except _CapReached:
        raise
    except _READ_ERRORS:
        result.complete = False


def _prepared(folder: Path, source: str, input_name: str) -> Fingerprints:
    """A prepared folder: each clip's recorded source fingerprint (its track), and each clip's own bytes (so two
    copies of a folder prepared before fingerprints were recorded still match)."""
    result = Fingerprints(source=source, kind="prepared")
    manifest = folder / MANIFEST
    tracks: dict[str, set[str]] = {}
    sources: dict[str, str] = {}
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            clip = Path(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            raise InputError(input_name, f"{manifest} line {n} is not an AudioMeta record") from None
        local = folder / CLIPS_DIR / clip.name
        clip = local if local.is_file() else clip
        if not clip.is_file():
            raise InputError(input_name, f"{manifest} line {n}: clip {clip} is missing")
        result.files += 1
        info: dict = {}
        sidecar = clip.with_suffix(".json")
        if sidecar.is_file():
            try:
                info = json.loads(sidecar.read_text(encoding="utf-8"))
            except ValueError:
                info = {}
        info = info if isinstance(info, dict) else {}
        track = str(info.get("source") or clip.name)
        hashes = tracks.setdefault(track, set())
        if isinstance(info.get(SOURCE_KEY), str):
            hashes.add(info[SOURCE_KEY])
            sources[track] = info[SOURCE_KEY]
        hashes.add(file_sha256(clip))
    result.tracks = {name: frozenset(h) for name, h in tracks.items()}
    # A track's recorded source is what the upload it came from is fingerprinted by; without one, its clips.
    result.primary = {
        name: sources.get(name) or hashlib.sha256("".join(sorted(h)).encode()).hexdigest() for name, h in tracks.items()
    }
    return result
