"""Safe unpacking of an uploaded dataset: the format is sniffed from the content, every member is checked before
anything is extracted, and only regular audio and text files are written, to paths proven to lie inside the
extraction folder.

What is refused (the whole upload, with an error naming the member): paths with `..` or absolute paths, links
pointing outside the archive, device files and FIFOs, more than `max_files` files, more than `max_bytes` of content,
a compressed (gz/bz2/xz) stream that expands past the byte cap or `max_ratio` times its size. A zip member
compressed more than `max_ratio` times (zip bomb) is refused on its own: never extracted, reported, the rest kept.
What is skipped (and counted): `__MACOSX/`, AppleDouble `._*`, `.DS_Store`, other dotfiles, links that
stay inside, encrypted members, members that cannot be read or expand past their declared size, a second member of
the same name (or one clashing with a folder), and every file that is neither audio nor a `.txt` description.

Names are kept (NFC) as the tracks' identity; on disk a name component over `MAX_COMPONENT_BYTES` (filesystems
allow 255 bytes: 86 CJK characters already pass that) or a path over `MAX_STORED_PATH_BYTES` is stored under a
shortened unique name (`Unpacked.renamed` lists them, `Unpacked.path(rel)` finds them).
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import hashlib
import logging
import lzma
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import typing as tp
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from core.errors import DiskError, write_failed
from core.params import InputError
from core.progress import progress_bar
from preprocessing.params import is_url, url_message

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".aif", ".aiff", ".aifc"}
)
TEXT_EXTENSIONS = frozenset({".txt"})
# A member must expand to at least this much before its compression ratio is judged: tiny files (an empty
# text file, a short repeated line) legitimately compress by large factors.
RATIO_FLOOR_BYTES = 1 << 20
COPY_BLOCK = 1 << 20
INPUT = "dataset_path"
# Filesystems allow 255 bytes per name (ext4, xfs, btrfs, APFS); stay well below so a shortened name plus its
# digest still fits, and so eCryptfs-like filesystems (~143) only lose the odd member instead of the run.
MAX_COMPONENT_BYTES = 200
# PATH_MAX is 4096 bytes including the work folder in front; deeper member paths are stored flattened.
MAX_STORED_PATH_BYTES = 1024


@dataclass
class Skipped:
    path: str
    category: str  # macos_junk, hidden, non_audio, link, special, encrypted, duplicate, unreadable, + later stages
    reason: str

    def to_dict(self) -> dict:
        return {"file": self.path, "category": self.category, "reason": self.reason}


@dataclass
class Unpacked:
    """What an upload holds once unpacked. Paths are relative to `root`, POSIX style, NFC-normalized."""

    root: Path
    kind: str  # zip, tar, tar.gz, tar.bz2, tar.xz, gz, audio
    audio: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    files_in_upload: int = 0
    bytes_unpacked: int = 0
    # logical name -> where it lies under `root`, for the names too long to be stored as they are
    stored: dict[str, str] = field(default_factory=dict)
    # The names taken so far, as files and as folders: duplicates and file/folder clashes are judged on the names
    # as uploaded, not on what the disk happens to allow (shortened names differ for a file and a folder).
    _files: set[str] = field(default_factory=set, repr=False)
    _folders: set[str] = field(default_factory=set, repr=False)

    def path(self, rel: str) -> Path:
        """Where the member `rel` (a name from `audio` / `texts`) lies on disk."""
        return self.root / self.stored.get(rel, rel)

    @property
    def renamed(self) -> list[dict]:
        """The members stored under a shortened name, for the report."""
        return [
            {"file": rel, "stored_as": stored, "reason": "name too long for the filesystem (255 bytes per name)"}
            for rel, stored in sorted(self.stored.items())
        ]


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_files: int
    max_ratio: float


class _Refused(InputError):
    def __init__(self, message: str):
        super().__init__(INPUT, message)


# --------------------------------------------------------------------------------------------- format sniffing

_AUDIO_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"RIFF"),
    (0, b"RF64"),
    (0, b"fLaC"),
    (0, b"OggS"),
    (0, b"FORM"),
    (0, b"ID3"),
    (4, b"ftyp"),
    (0, b"caff"),
)


def sniff(path: Path) -> str:
    """`zip`, `gzip`, `bzip2`, `xz`, `tar`, `audio` (a known audio signature) or `unknown`, from the bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if any(head[off : off + len(magic)] == magic for off, magic in _AUDIO_MAGIC):
        return "audio"
    # MPEG audio (mp3 without ID3, ADTS AAC): a frame sync.
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "audio"
    if zipfile.is_zipfile(path):  # self-extracting or prefixed zips
        return "zip"
    try:
        with tarfile.open(path, "r:") as tf:  # old (v7) tars have no magic
            if tf.next() is not None:
                return "tar"
    except (tarfile.TarError, OSError, ValueError):
        pass
    return "unknown"


# ------------------------------------------------------------------------------------------------ member rules


def classify(relpath: str) -> tuple[str, str] | None:
    """None for a file to keep (audio or text), else `(category, reason)` for one to skip."""
    parts = relpath.split("/")
    name = parts[-1]
    if "__MACOSX" in parts[:-1]:
        return "macos_junk", "macOS metadata folder (__MACOSX)"
    if name.startswith("._"):
        return "macos_junk", "macOS AppleDouble file (._*)"
    if name == ".DS_Store":
        return "macos_junk", "macOS folder settings (.DS_Store)"
    if any(p.startswith(".") for p in parts):
        return "hidden", "hidden file or folder (name starts with '.')"
    ext = posixpath.splitext(name)[1].lower()
    if ext in AUDIO_EXTENSIONS or ext in TEXT_EXTENSIONS:
        return None
    return "non_audio", f"not an audio file ({ext or 'no extension'})"


def safe_relpath(name: str) -> str:
    """A member name as a clean relative POSIX path; refuses absolute paths and `..` (path traversal)."""
    if "\x00" in name:
        raise _Refused(f"the archive is unsafe: member {name!r} has a NUL byte in its name; nothing was extracted")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise _Refused(
            f"the archive is unsafe: member {name!r} has an absolute path; nothing was extracted. "
            "Re-create the archive with relative paths (e.g. `zip -r data.zip my_tracks/`)."
        )
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(
            f"the archive is unsafe: member {name!r} points outside the archive folder ('..', path traversal); "
            "nothing was extracted. Re-create the archive from the folder holding your tracks."
        )
    return unicodedata.normalize("NFC", "/".join(parts))


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _digest(text: str, n: int) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def _short_component(part: str, keep_ext: bool) -> str:
    """`part` itself when it fits, else a prefix + `~` + a digest of the whole stem (+ the extension): unique for
    distinct names, and still readable."""
    if len(part.encode("utf-8")) <= MAX_COMPONENT_BYTES:
        return part
    stem, ext = posixpath.splitext(part) if keep_ext else (part, "")
    if len(ext.encode("utf-8")) > 16:  # not a real extension
        stem, ext = part, ""
    digest = _digest(stem, 12)
    room = MAX_COMPONENT_BYTES - len(ext.encode("utf-8")) - len(digest) - 1
    return f"{_truncate_utf8(stem, room)}~{digest}{ext}"


def stored_relpath(rel: str) -> str:
    """Where a member named `rel` (from `safe_relpath`) is written under the extraction folder: `rel` unless a
    component is over `MAX_COMPONENT_BYTES` or the path over `MAX_STORED_PATH_BYTES` (then folders are replaced by
    one digest folder). Deterministic and injective (up to the digest), so duplicates still collide."""
    parts = rel.split("/")
    short = [_short_component(p, keep_ext=i == len(parts) - 1) for i, p in enumerate(parts)]
    stored = "/".join(short)
    if len(stored.encode("utf-8")) > MAX_STORED_PATH_BYTES:
        stored = f"~{_digest('/'.join(parts[:-1]), 16)}/{short[-1]}"
    return stored


def _inside(root: Path, rel: str) -> Path:
    dest = root / rel
    resolved = dest.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise _Refused(f"the archive is unsafe: member {rel!r} resolves outside the extraction folder")
    return dest


def _check_totals(n_files: int, total_bytes: int, limits: Limits) -> None:
    if n_files > limits.max_files:
        raise _Refused(
            f"the archive holds more than {limits.max_files} files (the max_files limit); nothing was extracted. "
            "Split the dataset or raise max_files."
        )
    if total_bytes > limits.max_bytes:
        raise _Refused(
            f"the archive content adds up to {total_bytes / 2**30:.2f} GiB, over the "
            f"{limits.max_bytes / 2**30:.2f} GiB limit (max_unpacked_gb); nothing was extracted. "
            "Upload less audio (or compressed formats like mp3/flac) or raise max_unpacked_gb."
        )


class _Oversize(Exception):
    """A member gave more bytes than its header declared (corrupt, or a bomb): it is not kept."""


# A write that fails for these reasons fails for every member after it too: the whole run stops (one line naming
# the file), instead of skipping each member as "cannot be extracted" and training on what happened to fit.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _disk_error(e: OSError, path: Path) -> DiskError | None:
    return write_failed(path, e, "the unpacked file") if e.errno in _DISK_ERRNOS else None


def _write(out: tp.IO[bytes], block: bytes, dest: Path) -> None:
    try:
        out.write(block)
    except OSError as e:  # reading the member failed elsewhere; this is our disk
        raise write_failed(dest, e, "the unpacked file") from None


def _copy_capped(src: tp.IO[bytes], dest: Path, declared: int, budget: int, bar: tqdm) -> int:
    """Copy a member, never writing more than it declared nor more than what is left of the byte budget. The file
    is created exclusively (FileExistsError: a duplicate, nothing touched) and removed again on any failure."""
    written = 0
    limit = min(declared, budget)
    try:
        out = open(dest, "xb")  # noqa: SIM115 - closed by the `with out:` below
    except OSError as e:
        raise (_disk_error(e, dest) or e) from None
    with out:
        try:
            while True:
                block = src.read(COPY_BLOCK)
                if not block:
                    break
                written += len(block)
                if written > limit:
                    raise _Oversize()
                _write(out, block, dest)
                bar.update(len(block))
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                dest.unlink()
            raise
    return written


# What reading one member may raise when its data is damaged (each codec has its own error type).
_MEMBER_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # a zip compression method Python does not have (deflate64, ppmd, ...)
    RuntimeError,  # zipfile: encrypted member without the flag we check
    ValueError,
)


def _extract(
    open_src: tp.Callable[[], tp.IO[bytes] | None],
    root: Path,
    rel: str,
    declared: int,
    budget: int,
    bar: tqdm,
    result: Unpacked,
) -> int:
    """Write one planned member; a member that cannot be written is skipped with its reason (never raised), so
    one bad member costs only itself. Returns the bytes written (0 when skipped)."""
    parts = rel.split("/")
    parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
    if rel in result._files:
        result.skipped.append(Skipped(rel, "duplicate", "a file with this name was already extracted"))
        return 0
    if rel in result._folders:
        result.skipped.append(Skipped(rel, "conflict", "a folder of the same name was already extracted"))
        return 0
    if parents & result._files:
        result.skipped.append(Skipped(rel, "conflict", "its folder clashes with a file of the same name"))
        return 0
    result._folders |= parents
    stored = stored_relpath(rel)
    dest = _inside(root, stored)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        result.skipped.append(Skipped(rel, "conflict", "its folder clashes with a file of the same name"))
        return 0
    except OSError as e:
        if (disk := _disk_error(e, dest.parent)) is not None:
            raise disk from None
        result.skipped.append(Skipped(rel, "unreadable", f"its folder cannot be created ({e.strerror or e})"))
        return 0
    if dest.is_dir():
        result.skipped.append(Skipped(rel, "conflict", "a folder of the same name was already extracted"))
        return 0
    try:
        src = open_src()
        if src is None:
            result.skipped.append(Skipped(rel, "unreadable", "cannot be extracted"))
            return 0
        with src:
            written = _copy_capped(src, dest, declared, budget, bar)
    except FileExistsError:
        result.skipped.append(Skipped(rel, "duplicate", "a file with this name was already extracted"))
        return 0
    except DiskError:
        raise
    except _Oversize:
        reason = f"expands past its declared size of {declared} bytes (damaged, or a zip bomb); not extracted"
        logger.warning("Skipping archive member %s: %s", rel, reason)
        result.skipped.append(Skipped(rel, "unreadable", reason))
        return 0
    except _MEMBER_ERRORS as e:
        logger.warning("Skipping archive member %s: cannot be extracted (%s)", rel, e)
        result.skipped.append(Skipped(rel, "unreadable", f"cannot be extracted ({e})"))
        return 0
    result._files.add(rel)
    if stored != rel:
        logger.warning("Archive member %s: name too long for the filesystem, stored as %s", rel, stored)
        result.stored[rel] = stored
    result.bytes_unpacked += written
    _record(rel, result)
    return written


# ------------------------------------------------------------------------------------------------------- zip


def _zip_name(info: zipfile.ZipInfo) -> str:
    """Member name; names written as UTF-8 without the UTF-8 flag (common) are decoded as UTF-8."""
    name = info.filename
    if not info.flag_bits & 0x800:
        with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
            name = name.encode("cp437").decode("utf-8")
    return name


def _unpack_zip(path: Path, root: Path, limits: Limits, result: Unpacked) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise _Refused(f"the zip archive cannot be read ({e}); re-create it") from None
    with zf:
        files = [i for i in zf.infolist() if not i.is_dir()]
        result.files_in_upload = len(files)
        _check_totals(len(files), sum(i.file_size for i in files), limits)
        plan: list[tuple[zipfile.ZipInfo, str]] = []
        for info in files:
            name = _zip_name(info)
            rel = safe_relpath(name)
            mode = info.external_attr >> 16
            if not rel:
                continue
            if info.file_size > RATIO_FLOOR_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                # Refused, not extracted. Only the member: music never compresses this much (the only audio
                # that does is digital silence, which would be skipped anyway), so the rest is still usable.
                ratio = info.file_size / max(info.compress_size, 1)
                reason = (
                    f"zip bomb guard: compressed {ratio:.0f}:1 ({info.file_size} bytes from {info.compress_size}), "
                    f"over max_compression_ratio={limits.max_ratio:g}; not extracted"
                )
                logger.warning("Refusing archive member %s: %s", rel, reason)
                result.skipped.append(Skipped(rel, "zip_bomb", reason))
                continue
            if stat.S_ISLNK(mode):
                result.skipped.append(Skipped(rel, "link", "symbolic link (links are not followed)"))
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                result.skipped.append(Skipped(rel, "special", "not a regular file"))
                continue
            skip = classify(rel)
            if skip:
                result.skipped.append(Skipped(rel, *skip))
                continue
            if info.flag_bits & 0x1:
                result.skipped.append(Skipped(rel, "encrypted", "encrypted (password-protected) member"))
                continue
            plan.append((info, rel))
        budget = limits.max_bytes
        with progress_bar(
            total=sum(i.file_size for i, _ in plan), unit="B", unit_scale=True, desc="Unpacking", mininterval=1
        ) as bar:
            for info, rel in plan:
                budget -= _extract(lambda info=info: zf.open(info), root, rel, info.file_size, budget, bar, result)


def _record(rel: str, result: Unpacked) -> None:
    if posixpath.splitext(rel)[1].lower() in TEXT_EXTENSIONS:
        result.texts.append(rel)
    else:
        result.audio.append(rel)


# ------------------------------------------------------------------------------------------------------- tar


def _tar_name(name: str) -> str:
    """tarfile decodes names as UTF-8 with surrogateescape; a name whose bytes are not UTF-8 (old Windows or
    Latin-1 tars) is read as Latin-1 instead, so every name is a printable string that JSON and the report can hold
    (Latin-1 maps each byte to one character: distinct names stay distinct)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("latin-1")
    return name


def _check_tar_end(path: Path, offset: int, result: Unpacked) -> None:
    """tarfile stops quietly at the first damaged header past the first one; what follows would be lost without a
    word. Data (anything but the zero padding) after where reading stopped is reported."""
    with open(path, "rb") as f:
        f.seek(offset)
        rest = f.read(1 << 20)
    if rest.strip(b"\x00"):
        reason = (
            f"the tar archive is damaged at byte {offset} of {path.stat().st_size}: the members after that point "
            "cannot be read and are missing; re-create the archive to include them"
        )
        logger.warning("Dataset archive: %s", reason)
        result.skipped.append(Skipped("(rest of the archive)", "damaged", reason))


def _unpack_tar(path: Path, root: Path, limits: Limits, result: Unpacked) -> None:
    try:
        tf = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the `with tf:` below
    except (tarfile.TarError, OSError) as e:
        raise _Refused(f"the tar archive cannot be read ({e}); re-create it") from None
    with tf:
        plan: list[tuple[tarfile.TarInfo, str]] = []
        n_files, total = 0, 0
        try:
            for member in tf:
                if member.isdir():
                    continue
                n_files += 1
                _check_totals(n_files, total, limits)  # stop reading headers as soon as a cap is passed
                rel = safe_relpath(_tar_name(member.name))
                if member.issym() or member.islnk():
                    _check_link(member, rel)
                    result.skipped.append(Skipped(rel, "link", "link (links are not followed)"))
                    continue
                if member.ischr() or member.isblk() or member.isfifo():
                    raise _Refused(
                        f"the archive is unsafe: member {member.name!r} is a device file or FIFO; nothing was extracted"
                    )
                if member.issparse() or not member.isreg():
                    result.skipped.append(Skipped(rel, "special", "not a plain regular file"))
                    continue
                total += member.size
                # tarfile's own 'data' filter as a second opinion on every member we will write.
                try:
                    tarfile.data_filter(member, str(root))
                except tarfile.FilterError as e:
                    message = f"the archive is unsafe: member {member.name!r}: {e}; nothing was extracted"
                    raise _Refused(message) from None
                skip = classify(rel)
                if skip:
                    result.skipped.append(Skipped(rel, *skip))
                    continue
                plan.append((member, rel))
        except tarfile.TarError as e:
            raise _Refused(f"the tar archive is damaged ({e}); re-create it") from None
        _check_tar_end(path, tf.offset, result)
        result.files_in_upload = n_files
        _check_totals(n_files, total, limits)
        budget = limits.max_bytes
        with progress_bar(
            total=sum(m.size for m, _ in plan), unit="B", unit_scale=True, desc="Unpacking", mininterval=1
        ) as bar:
            for member, rel in plan:
                budget -= _extract(lambda m=member: tf.extractfile(m), root, rel, member.size, budget, bar, result)


def _check_link(member: tarfile.TarInfo, rel: str) -> None:
    """Refuse a link whose target lies outside the archive; links inside are merely skipped."""
    target = member.linkname.replace("\\", "/")
    if member.issym():
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    else:  # hard links name a path from the archive root
        joined = posixpath.normpath(target)
    if target.startswith("/") or joined == ".." or joined.startswith("../"):
        raise _Refused(
            f"the archive is unsafe: member {member.name!r} is a link to {member.linkname!r}, outside the archive; "
            "nothing was extracted. Archive the files themselves, not links to them."
        )


# ------------------------------------------------------------------------------------------ compressed streams

_OPENERS: dict[str, tp.Callable[..., tp.IO[bytes]]] = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
_SUFFIX = {"gzip": "gz", "bzip2": "bz2", "xz": "xz"}


def _decompress_capped(kind: str, src: Path, dest: Path, limits: Limits) -> int:
    """Stream-decompress with a byte cap and a whole-stream ratio cap (a stream's stated size can't be trusted)."""
    compressed = max(src.stat().st_size, 1)
    cap = min(limits.max_bytes, max(int(limits.max_ratio * compressed), RATIO_FLOOR_BYTES))
    written = 0
    try:
        with _OPENERS[kind](src, "rb") as fin, open(dest, "wb") as fout:
            while True:
                block = fin.read(COPY_BLOCK)
                if not block:
                    break
                written += len(block)
                if written > cap:
                    which = (
                        f"the {limits.max_bytes / 2**30:.2f} GiB limit (max_unpacked_gb)"
                        if cap == limits.max_bytes
                        else f"{limits.max_ratio:g} times its compressed size (max_compression_ratio)"
                    )
                    raise _Refused(f"the compressed upload expands past {which}; refused (decompression bomb guard)")
                _write(fout, block, dest)
    except DiskError:
        dest.unlink(missing_ok=True)
        raise
    except (OSError, EOFError, lzma.LZMAError) as e:
        dest.unlink(missing_ok=True)
        if isinstance(e, OSError) and (disk := _disk_error(e, dest)) is not None:
            raise disk from None
        raise _Refused(f"the {kind} stream is damaged ({e}); re-create it") from None
    except _Refused:
        dest.unlink(missing_ok=True)
        raise
    return written


def _gzip_original_name(path: Path) -> str | None:
    """The file name stored in a gzip header (FNAME), if any."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if len(head) < 10 or head[:2] != b"\x1f\x8b":
        return None
    flags, pos = head[3], 10
    if flags & 0x04:  # FEXTRA
        if len(head) < pos + 2:
            return None
        pos += 2 + int.from_bytes(head[pos : pos + 2], "little")
    if not flags & 0x08:  # FNAME
        return None
    end = head.find(b"\x00", pos)
    if end < 0:
        return None
    name = head[pos:end].decode("latin-1").replace("\\", "/").split("/")[-1]
    return name or None


# -------------------------------------------------------------------------------------------------------- entry


def _unpack_compressed(kind: str, src: Path, dest: Path, limits: Limits) -> Unpacked:
    """A gzip/bzip2/xz stream: decompressed (capped) to a staging file, then a tar, a zip or a single track."""
    stem = _gzip_original_name(src) if kind == "gzip" else None
    if not stem:
        stem = src.name
        for suffix in (".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
    stem = unicodedata.normalize("NFC", stem.replace("\\", "/").split("/")[-1].replace("\x00", ""))
    if stem in ("", ".", ".."):
        stem = "upload"
    stored = _short_component(stem, keep_ext=True)
    # A fresh folder of our own beside `dest` (never one that happens to be there: that one is not ours to delete).
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.decompressed-", dir=dest.parent))
    try:
        inner = staging / stored
        with progress_bar(desc=f"Decompressing ({_SUFFIX[kind]})", unit="B", unit_scale=True, mininterval=1) as bar:
            size = _decompress_capped(kind, src, inner, limits)
            bar.update(size)
        inner_kind = sniff(inner)
        if inner_kind == "tar":
            result = Unpacked(root=dest, kind=f"tar.{_SUFFIX[kind]}")
            _unpack_tar(inner, dest, limits, result)
        elif inner_kind == "zip":
            result = Unpacked(root=dest, kind=f"zip.{_SUFFIX[kind]}")
            _unpack_zip(inner, dest, limits, result)
        elif inner_kind in _OPENERS:
            raise _Refused("the upload is compressed twice (e.g. .gz inside .gz); compress it once")
        else:
            # A single compressed track (song.wav.gz): its only file; decoding decides whether it is audio.
            result = Unpacked(root=dest, kind=_SUFFIX[kind], files_in_upload=1, bytes_unpacked=size)
            shutil.move(str(inner), _inside(dest, stored))
            result.audio.append(stem)
            if stored != stem:
                result.stored[stem] = stored
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def unpack(dataset_path: str | Path, dest: Path, limits: Limits) -> Unpacked:
    """Unpack `dataset_path` into `dest` (created; must be empty) and list what it holds.

    A single audio file is not copied: `root` is then its folder and `audio` names just that file.
    """
    if is_url(str(dataset_path)):
        raise InputError(INPUT, url_message(str(dataset_path)))
    src = Path(dataset_path)
    if not src.exists():
        raise InputError(INPUT, f"{src} does not exist; pass the path of a zip/tar/gz archive or an audio file")
    if src.is_dir():
        raise InputError(INPUT, f"{src} is a folder; zip it (e.g. `zip -r data.zip {src.name}`) and pass the zip")
    if src.stat().st_size == 0:
        raise InputError(INPUT, f"{src.name} is an empty file")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise RuntimeError(f"unpack folder {dest} is not empty")
    kind = sniff(src)
    logger.info("Dataset %s: detected %s", src.name, kind if kind != "unknown" else "no archive signature (audio?)")
    if kind in _OPENERS:
        result = _unpack_compressed(kind, src, dest, limits)
    elif kind == "zip":
        result = Unpacked(root=dest, kind="zip")
        _unpack_zip(src, dest, limits, result)
    elif kind == "tar":
        result = Unpacked(root=dest, kind="tar")
        _unpack_tar(src, dest, limits, result)
    else:
        # Not an archive: a single track, read in place (nothing copied). Decoding will tell if it is audio.
        result = Unpacked(root=src.parent, kind="audio", files_in_upload=1, audio=[src.name])
        beside = src.with_suffix(".txt")
        if beside != src and beside.is_file():
            result.texts.append(beside.name)
    result.audio.sort()
    result.texts.sort()
    logger.info(
        "Unpacked %s: %d files, %d audio, %d text, %d skipped",
        result.kind,
        result.files_in_upload,
        len(result.audio),
        len(result.texts),
        len(result.skipped),
    )
    return result
