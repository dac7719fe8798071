"""Property-based: generated archives (zip and tar, several compressions) with hostile names (unicode, over-long,
duplicate, case- and normalization-colliding, `../` traversal, absolute, file/folder clashes), random sizes and
damaged members, thrown at `unpack`. Whatever the archive:

- no exception escapes but our own `InputError` (a refusal naming the input);
- nothing is written outside the target folder (and a refusal writes nothing at all);
- every member that is good (a safe name, audio or text, the first of its name, readable) is unpacked, under a
  name the filesystem takes, with its exact bytes; nothing else is listed.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import re
import tarfile
import tempfile
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core.params import InputError
from preprocessing.unpack import Limits, classify, unpack

LIMITS = Limits(max_bytes=1 << 30, max_files=1000, max_ratio=200.0)
FORMATS = ("zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "zip.gz")
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


@dataclass
class Member:
    name: str
    data: bytes
    broken: bool


# ------------------------------------------------------------------------------------------------------ generation

_letters = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00")
plain = st.text(_letters, min_size=1, max_size=12)
special = st.sampled_from(["曲" * 86, "a" * 300, "ß" * 130, "Café", "Cafe\u0301", "SONG", "song", ".hidden", "."])
component = st.one_of(plain, plain, special)
extension = st.sampled_from([".wav", ".mp3", ".flac", ".txt", ".WAV", ".Txt", ".pdf", ""])
# What makes a name unsafe (the whole archive is then refused): traversal, an absolute path, a drive letter.
HOSTILE = ("../", "a/../../", "/", "\\", "C:/", "..\\")


@st.composite
def member_name(draw) -> str:
    parts = draw(st.lists(component, min_size=1, max_size=4))
    sep = draw(st.sampled_from(["/", "/", "/", "\\"]))
    return sep.join(parts) + draw(extension)


def _variant(name: str, how: str) -> str:
    if how == "upper":
        return name.upper()
    if how == "swapcase":
        return name.swapcase()
    if how == "nfd":
        return unicodedata.normalize("NFD", name)
    return name


@st.composite
def archives(draw) -> tuple[str, list[Member], str | None]:
    fmt = draw(st.sampled_from(FORMATS))
    names = draw(st.lists(member_name(), min_size=1, max_size=6))
    members = []
    for i in range(draw(st.integers(1, 9))):
        # Drawn from a few names, so duplicates, case and NFC/NFD twins and file/folder clashes come up often.
        base = draw(st.sampled_from(names))
        if draw(st.booleans()):  # a file inside a folder named like another member
            base = f"{draw(st.sampled_from(names))}/{draw(member_name())}"
        name = _variant(base, draw(st.sampled_from(["same", "same", "same", "upper", "swapcase", "nfd"])))
        size = draw(st.sampled_from([0, 1, 37, 4096, 30000]))
        rng = random.Random(draw(st.integers(0, 2**32)))
        body = bytes(size) if draw(st.booleans()) else rng.randbytes(size)
        data = f"{i}:".encode() + body  # distinct per member: a duplicate must not be mistaken for its first
        members.append(Member(name, data, broken=draw(st.integers(0, 9)) == 0))
    if draw(st.integers(0, 4)) == 0:  # one archive in five carries one unsafe name somewhere
        victim = draw(st.sampled_from(members))
        victim.name = draw(st.sampled_from(HOSTILE)) + victim.name
    truncate = draw(st.sampled_from([None] * 8 + [0.5, 0.9]))
    return fmt, members, truncate


def _build_zip(members: list[Member], methods: list[int]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for m, method in zip(members, methods, strict=True):
            info = zipfile.ZipInfo(m.name)  # a raw ZipInfo keeps `..`, `/` and `\\` as given
            info.compress_type = method
            zf.writestr(info, m.data)
    raw = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        infos = zf.infolist()
    for m, info in zip(members, infos, strict=True):
        if m.broken and info.compress_size > 0:  # flip a byte inside its compressed data: CRC or codec error
            name_len, extra_len = (
                int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
                (int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")),
            )
            start = info.header_offset + 30 + name_len + extra_len
            raw[start + info.compress_size // 2] ^= 0x5A
        else:
            m.broken = False
    return bytes(raw)


def _build_tar(members: list[Member]) -> tuple[bytes, int | None]:
    """The tar, and the index of the first member whose header is damaged (tar has no index: what follows is lost)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.size = len(m.data)
            tf.addfile(info, io.BytesIO(m.data))
    raw = bytearray(buf.getvalue())
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
        offsets = [t.offset for t in tf.getmembers()]
    first_broken = next((i for i, m in enumerate(members) if m.broken), None)
    if first_broken is not None:
        off = offsets[first_broken]
        raw[off + 148 : off + 156] = b"0000000\x00"  # a wrong header checksum
    return bytes(raw), first_broken


def build(fmt: str, members: list[Member], methods: list[int]) -> tuple[bytes, int | None]:
    if fmt.startswith("zip"):
        raw, stop = _build_zip(members, methods), None
    else:
        raw, stop = _build_tar(members)
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
    suffix = fmt.split(".")[-1]
    return (compress[suffix](raw) if suffix in compress else raw), stop


# ---------------------------------------------------------------------------------------------------------- oracle


def logical(name: str) -> str:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return unicodedata.normalize("NFC", "/".join(parts))


def unsafe(name: str) -> bool:
    unified = name.replace("\\", "/")
    return unified.startswith("/") or bool(re.match(r"^[A-Za-z]:", unified)) or ".." in unified.split("/")


def expected_members(members: list[Member]) -> dict[str, bytes] | None:
    """What `unpack` must give for these members (read in order): None = the whole archive refused."""
    if any(unsafe(m.name) for m in members):
        return None
    good: dict[str, bytes] = {}
    files: set[str] = set()
    folders: set[str] = set()
    for m in members:
        rel = logical(m.name)
        if not rel or classify(rel) is not None:
            continue
        parts = rel.split("/")
        parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if rel in files or rel in folders or parents & files:
            continue  # a duplicate, or a clash between a file and a folder: the first one stays
        folders |= parents
        if m.broken:
            continue  # damaged: skipped, its name stays free
        files.add(rel)
        good[rel] = m.data
    return good


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------------------------ test


# 50 examples run in a few seconds; MGFT_HYPOTHESIS_EXAMPLES=2000 searches harder (a few minutes).
@settings(
    max_examples=int(os.environ.get("MGFT_HYPOTHESIS_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=archives(), methods_seed=st.integers(0, 2**16))
def test_unpack_survives_generated_archives(case, methods_seed):
    fmt, members, truncate = case
    rng = random.Random(methods_seed)
    methods = [rng.choice(ZIP_METHODS) for _ in members]
    raw, tar_stop = build(fmt, members, methods)
    if truncate is not None:
        raw = raw[: int(len(raw) * truncate)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "upload.bin").write_bytes(raw)
        box = tmp / "box"
        dest = box / "sub" / "out"
        box.mkdir()
        try:
            result = unpack(tmp / "upload.bin", dest, LIMITS)
        except InputError as e:
            result, refusal = None, e
        # Nothing outside the target folder: in `box`, only `dest` and the folders above it.
        outside = {p for p in _tree(box) if not (p == "sub" or p == "sub/out" or p.startswith("sub/out/"))}
        assert outside == set(), outside
        assert sorted(p.name for p in tmp.iterdir()) == ["box", "upload.bin"]
        assert not any(p.is_symlink() for p in box.rglob("*"))
        considered = members if tar_stop is None else members[:tar_stop]
        want = expected_members(considered)
        if result is None:
            event("refused")
            assert refusal.name == "dataset_path"
            # Every refusal is decided before extraction: nothing was written.
            assert not dest.exists() or not any(p.is_file() for p in dest.rglob("*"))
            # ... and has a cause: an unsafe name, a cut archive, or a tar whose very first header is damaged.
            assert want is None or truncate is not None or tar_stop == 0, f"refused a sound {fmt}: {refusal}"
            return
        assert want is not None or truncate is not None, "an archive with an unsafe name was not refused"
        listed = result.audio + result.texts
        event(f"{fmt}: unpacked {'none' if not listed else 'some'}")  # --hypothesis-show-statistics shows the mix
        for s in result.skipped:
            event(f"skipped: {s.category}")
        if result.stored:
            event("stored under a shortened name")
        assert len(listed) == len(set(listed))
        for rel in listed:  # whatever is listed is a member, with its bytes, at a name the filesystem took
            on_disk = result.path(rel)
            assert on_disk.resolve().is_relative_to(dest.resolve())
            assert on_disk.read_bytes() in {m.data for m in members if logical(m.name) == rel}
            assert all(len(part.encode()) <= 255 for part in on_disk.relative_to(dest).parts)
        if truncate is None:
            assert {rel: result.path(rel).read_bytes() for rel in listed} == want
            on_disk_files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
            assert on_disk_files == {result.path(rel).relative_to(dest).as_posix() for rel in listed}
            if tar_stop is not None:
                assert any(s.category == "damaged" for s in result.skipped)
