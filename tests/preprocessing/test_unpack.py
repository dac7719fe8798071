"""Safe unpacking with real archives, including hostile ones built here byte for byte."""

from __future__ import annotations

import bz2
import gzip
import io
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from core.params import InputError
from preprocessing.unpack import Limits, classify, safe_relpath, sniff, unpack

GENEROUS = Limits(max_bytes=1 << 30, max_files=1000, max_ratio=200.0)
WAV_BYTES = b"RIFF" + b"\x00" * 60  # content is not decoded here: unpacking only looks at names and sizes


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _assert_nothing_written(tmp_path: Path, dest: Path) -> None:
    assert not dest.exists() or _all_files(dest) == []
    for name in ("evil.wav", "outside.wav", "passwd"):
        assert not (tmp_path / name).exists()
        assert not (tmp_path.parent / name).exists()


def _zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)  # a raw ZipInfo keeps the name exactly as given (`..`, `/`, `\\`)
            info.compress_type = compression
            zf.writestr(info, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


# ----------------------------------------------------------------------------------------------- the good path


def test_zip_nested_unicode_and_junk_are_sorted_out(tmp_path):
    nfd = "Cafe\u0301 del Mar/Sóng ♪.wav"  # macOS writes decomposed (NFD) names
    archive = _zip(
        tmp_path / "upload.bin",
        {
            "set/a/b/c/deep.mp3": WAV_BYTES,
            nfd: WAV_BYTES,
            "Cafe\u0301 del Mar/Sóng ♪.txt": b"bossa nova guitar\n",
            "__MACOSX/set/._deep.mp3": b"x",
            "set/._deep.mp3": b"x",
            "set/.DS_Store": b"x",
            ".hidden/track.wav": WAV_BYTES,
            "docs/readme.pdf": b"%PDF",
            "set/empty_dir/": b"",
        },
    )
    result = unpack(archive, tmp_path / "out", GENEROUS)
    assert result.kind == "zip"
    assert result.audio == sorted(["Café del Mar/Sóng ♪.wav", "set/a/b/c/deep.mp3"])  # NFC on disk
    assert result.texts == ["Café del Mar/Sóng ♪.txt"]
    assert (tmp_path / "out" / "Café del Mar" / "Sóng ♪.wav").read_bytes() == WAV_BYTES
    categories = sorted(s.category for s in result.skipped)
    assert categories == ["hidden", "macos_junk", "macos_junk", "macos_junk", "non_audio"]
    assert result.files_in_upload == 8
    assert _all_files(tmp_path / "out") == sorted(
        ["Café del Mar/Sóng ♪.wav", "Café del Mar/Sóng ♪.txt", "set/a/b/c/deep.mp3"]
    )


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.bz2", "zip.gz"])
def test_compressed_and_tar_formats_are_sniffed_from_content(tmp_path, kind):
    members = [("music/one.flac", WAV_BYTES), ("music/two.wav", WAV_BYTES)]
    inner = tmp_path / "inner"
    if kind.startswith("tar"):
        _tar(inner, members)
    else:
        _zip(inner, dict(members))
    data = inner.read_bytes()
    if kind.endswith(".gz"):
        data = gzip.compress(data)
    elif kind.endswith(".bz2"):
        data = bz2.compress(data)
    upload = tmp_path / "misnamed.zip"  # the name lies, as Cog's temp names do
    upload.write_bytes(data)
    result = unpack(upload, tmp_path / "out", GENEROUS)
    assert result.kind == kind
    assert result.audio == ["music/one.flac", "music/two.wav"]
    assert not (tmp_path / ".out.decompressed").exists()  # the staging copy is gone


def test_single_gz_track_keeps_its_stored_name(tmp_path):
    upload = tmp_path / "tmpabc123"
    with open(upload, "wb") as raw, gzip.GzipFile(filename="my song.wav", fileobj=raw, mode="wb") as gz:
        gz.write(WAV_BYTES)
    result = unpack(upload, tmp_path / "out", GENEROUS)
    assert (result.kind, result.audio) == ("gz", ["my song.wav"])
    assert (tmp_path / "out" / "my song.wav").read_bytes() == WAV_BYTES


def test_single_audio_file_is_read_in_place(tmp_path):
    track = tmp_path / "song.wav"
    track.write_bytes(WAV_BYTES)
    (tmp_path / "song.txt").write_text("lofi")
    result = unpack(track, tmp_path / "out", GENEROUS)
    assert (result.kind, result.root, result.audio, result.texts) == ("audio", tmp_path, ["song.wav"], ["song.txt"])
    assert _all_files(tmp_path / "out") == []


def test_sniff(tmp_path):
    cases = {
        "a": (b"PK\x03\x04" + b"\x00" * 40, "zip"),
        "b": (gzip.compress(b"hello"), "gzip"),
        "c": (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio"),
        "d": (b"ID3\x04" + b"\x00" * 40, "audio"),
        "e": (b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 40, "audio"),
        "f": (b"hello world, not audio", "unknown"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert sniff(tmp_path / name) == expected, name
    _tar(tmp_path / "t", [("x.wav", WAV_BYTES)])
    assert sniff(tmp_path / "t") == "tar"


def test_member_rules():
    assert classify("a/__MACOSX/b.wav")[0] == "macos_junk"
    assert classify("a/._b.wav")[0] == "macos_junk"
    assert classify("a/.git/b.wav")[0] == "hidden"
    assert classify("a/b.WAV") is None and classify("a/b.txt") is None
    assert classify("a/b.mid") == ("non_audio", "not an audio file (.mid)")
    assert safe_relpath("./a//b/./c.wav") == "a/b/c.wav"


def test_duplicate_names_keep_the_first(tmp_path):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("x.wav", b"RIFF-first")
        zf.writestr("x.wav", b"RIFF-second")
    result = unpack(archive, tmp_path / "out", GENEROUS)
    assert result.audio == ["x.wav"]
    assert [s.category for s in result.skipped] == ["duplicate"]
    assert (tmp_path / "out" / "x.wav").read_bytes() == b"RIFF-first"


def test_zip_symlink_member_is_skipped_not_followed(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("music/link.wav")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
        zf.writestr("music/real.wav", WAV_BYTES)
    result = unpack(archive, tmp_path / "out", GENEROUS)
    assert result.audio == ["music/real.wav"]
    assert [(s.path, s.category) for s in result.skipped] == [("music/link.wav", "link")]
    assert not (tmp_path / "out" / "music" / "link.wav").exists()


def test_tar_link_inside_is_skipped(tmp_path):
    archive = _tar(tmp_path / "in.tar", [("a/real.wav", WAV_BYTES), _link("a/alias.wav", "real.wav")])
    result = unpack(archive, tmp_path / "out", GENEROUS)
    assert result.audio == ["a/real.wav"]
    assert [s.category for s in result.skipped] == ["link"]


# ----------------------------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "name,why",
    [
        ("../evil.wav", "path traversal"),
        ("music/../../evil.wav", "path traversal"),
        ("..\\evil.wav", "path traversal"),
        ("/tmp/evil.wav", "absolute path"),
        ("C:/evil.wav", "absolute path"),
    ],
)
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, name, why):
    archive = _zip(tmp_path / "slip.zip", {"good/first.wav": WAV_BYTES, name: WAV_BYTES})
    with pytest.raises(InputError, match=why) as err:
        unpack(archive, tmp_path / "sub" / "out", GENEROUS)
    assert err.value.name == "dataset_path"
    assert "nothing was extracted" in str(err.value)
    _assert_nothing_written(tmp_path, tmp_path / "sub" / "out")


@pytest.mark.parametrize(
    "member",
    [
        _link("music/outside.wav", "../../outside.wav"),
        _link("music/passwd", "/etc/passwd"),
        _link("music/dir", "../.."),
        _link("music/hard.wav", "../outside.wav", tarfile.LNKTYPE),
        _link("music/hard2.wav", "/etc/passwd", tarfile.LNKTYPE),
    ],
    ids=["symlink-up", "symlink-absolute", "symlink-dir", "hardlink-up", "hardlink-absolute"],
)
def test_tar_link_outside_is_refused(tmp_path, member):
    # The classic attack: a link out of the folder, then a file written "through" it.
    archive = _tar(tmp_path / "links.tar", [("music/ok.wav", WAV_BYTES), member, ("music/dir/evil.wav", WAV_BYTES)])
    with pytest.raises(InputError, match="outside the archive"):
        unpack(archive, tmp_path / "sub" / "out", GENEROUS)
    _assert_nothing_written(tmp_path, tmp_path / "sub" / "out")


def test_tar_traversal_and_device_are_refused(tmp_path):
    archive = _tar(tmp_path / "slip.tar", [("ok.wav", WAV_BYTES), ("../../evil.wav", WAV_BYTES)])
    with pytest.raises(InputError, match="path traversal"):
        unpack(archive, tmp_path / "sub" / "a", GENEROUS)
    device = tarfile.TarInfo("music/null.wav")
    device.type = tarfile.CHRTYPE
    device.devmajor, device.devminor = 1, 3
    archive = _tar(tmp_path / "dev.tar", [("ok.wav", WAV_BYTES), device])
    with pytest.raises(InputError, match="device file"):
        unpack(archive, tmp_path / "sub" / "b", GENEROUS)
    _assert_nothing_written(tmp_path, tmp_path / "sub" / "a")
    _assert_nothing_written(tmp_path, tmp_path / "sub" / "b")


def test_zip_bomb_is_refused_before_extraction(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {"ok.wav": WAV_BYTES, "bomb.wav": b"\x00" * (40 << 20)})
    info = zipfile.ZipFile(archive).getinfo("bomb.wav")
    assert info.file_size / info.compress_size > 200  # really a bomb-ish ratio (about 1000:1)
    start = time.perf_counter()
    result = unpack(archive, tmp_path / "out", GENEROUS)
    assert time.perf_counter() - start < 2.0  # judged from the central directory, never inflated
    assert result.audio == ["ok.wav"] and _all_files(tmp_path / "out") == ["ok.wav"]
    (bomb,) = result.skipped
    assert (bomb.path, bomb.category) == ("bomb.wav", "zip_bomb")
    assert "max_compression_ratio=200" in bomb.reason and "not extracted" in bomb.reason
    # Declared sizes past the total cap (the overlapping-entries kind of bomb): the whole archive is refused.
    with pytest.raises(InputError, match="max_unpacked_gb"):
        unpack(archive, tmp_path / "out2", Limits(max_bytes=20 << 20, max_files=100, max_ratio=200))
    _assert_nothing_written(tmp_path, tmp_path / "out2")


def test_gz_bomb_stops_streaming_at_the_cap(tmp_path):
    upload = tmp_path / "bomb.gz"
    upload.write_bytes(gzip.compress(b"\x00" * (40 << 20), compresslevel=9))
    with pytest.raises(InputError, match="decompression bomb"):
        unpack(upload, tmp_path / "out", GENEROUS)
    _assert_nothing_written(tmp_path, tmp_path / "out")
    assert not (tmp_path / ".out.decompressed").exists()
    # The byte cap alone (a stream whose ratio is fine but whose size is not).
    small = Limits(max_bytes=4096, max_files=10, max_ratio=1e6)
    (tmp_path / "big.gz").write_bytes(gzip.compress(bytes(range(256)) * 64))
    with pytest.raises(InputError, match="max_unpacked_gb"):
        unpack(tmp_path / "big.gz", tmp_path / "out2", small)


def test_caps_on_file_count_and_total_size(tmp_path):
    archive = _zip(tmp_path / "many.zip", {f"t{i}.wav": WAV_BYTES for i in range(5)})
    with pytest.raises(InputError, match="more than 3 files"):
        unpack(archive, tmp_path / "a", Limits(max_bytes=1 << 30, max_files=3, max_ratio=200))
    with pytest.raises(InputError, match="max_unpacked_gb"):
        unpack(archive, tmp_path / "b", Limits(max_bytes=200, max_files=100, max_ratio=200))
    tar = _tar(tmp_path / "many.tar", [(f"t{i}.wav", WAV_BYTES) for i in range(5)])
    with pytest.raises(InputError, match="more than 3 files"):
        unpack(tar, tmp_path / "c", Limits(max_bytes=1 << 30, max_files=3, max_ratio=200))
    with pytest.raises(InputError, match="max_unpacked_gb"):
        unpack(tar, tmp_path / "d", Limits(max_bytes=200, max_files=100, max_ratio=200))
    for sub in "abcd":
        _assert_nothing_written(tmp_path, tmp_path / sub)


def test_bad_paths_name_the_input(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        unpack(tmp_path / "nope.zip", tmp_path / "out", GENEROUS)
    assert err.value.name == "dataset_path"
    with pytest.raises(InputError, match="is a folder"):
        unpack(tmp_path, tmp_path / "out", GENEROUS)
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        unpack(tmp_path / "empty.zip", tmp_path / "out", GENEROUS)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(InputError, match="cannot be read"):
        unpack(tmp_path / "broken.zip", tmp_path / "out2", GENEROUS)


# ------------------------------------------------------------------------------------- names, clashes, damage (#12)


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_names_too_long_for_the_filesystem_are_stored_shortened(tmp_path, fmt):
    cjk = "曲" * 86  # 258 bytes, over the 255 a name may hold
    members = {
        f"{cjk}.wav": b"RIFF-cjk",
        f"{cjk}.txt": b"its description",
        f"{'F' * 300}/in_long_folder.wav": b"RIFF-folder",
        "/".join(["folder" * 30] * 8) + "/deep.wav": b"RIFF-deep",  # 1.4 KB of path
        "short.wav": b"RIFF-short",
    }
    archive = _zip(tmp_path / "a.zip", members) if fmt == "zip" else _tar(tmp_path / "a.tar", list(members.items()))
    result = unpack(archive, tmp_path / "out", GENEROUS)  # main: OSError: File name too long
    assert sorted(result.audio + result.texts) == sorted(members)  # the names as uploaded
    for rel, data in members.items():
        assert result.path(rel).read_bytes() == data
    assert [r["file"] for r in result.renamed] == sorted(set(members) - {"short.wav"})
    assert result.path("short.wav") == tmp_path / "out" / "short.wav"
    for entry in result.renamed:
        assert all(len(p.encode()) <= 255 for p in entry["stored_as"].split("/"))
    assert result.skipped == []


def test_a_long_name_inside_a_gz_is_shortened(tmp_path):
    upload = tmp_path / "upload.gz"
    with open(upload, "wb") as raw, gzip.GzipFile(filename="ß" * 150 + ".wav", fileobj=raw, mode="wb") as gz:
        gz.write(WAV_BYTES)
    result = unpack(upload, tmp_path / "out", GENEROUS)  # main: "the gzip stream is damaged (File name too long)"
    assert result.audio == ["ß" * 150 + ".wav"] and result.path(result.audio[0]).read_bytes() == WAV_BYTES


def test_file_and_folder_of_the_same_name_and_a_broken_member_are_skipped(tmp_path):
    archive = _zip(
        tmp_path / "clash.zip",
        {"a.wav": b"RIFF-a", "a.wav/b.wav": b"RIFF-b", "c.wav/d.wav": b"RIFF-d", "c.wav": b"RIFF-c", "g.wav": b"RIFF"},
        compression=zipfile.ZIP_STORED,
    )
    result = unpack(archive, tmp_path / "out", GENEROUS)  # main: FileExistsError traceback
    assert result.audio == ["a.wav", "c.wav/d.wav", "g.wav"]
    assert sorted((s.path, s.category) for s in result.skipped) == [("a.wav/b.wav", "conflict"), ("c.wav", "conflict")]
    assert (tmp_path / "out" / "a.wav").read_bytes() == b"RIFF-a"  # the first one kept, untouched
    # A member whose data is damaged (CRC mismatch): skipped, no partial file left, the others kept.
    data = bytearray(_zip(tmp_path / "b.zip", {"ok.wav": b"RIFF" * 100, "bad.wav": b"RIFF" * 100}).read_bytes())
    info = zipfile.ZipFile(tmp_path / "b.zip").getinfo("bad.wav")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 3] ^= 0xFF
    (tmp_path / "b.zip").write_bytes(bytes(data))
    result = unpack(tmp_path / "b.zip", tmp_path / "out2", GENEROUS)
    assert result.audio == ["ok.wav"] and [(s.path, s.category) for s in result.skipped] == [("bad.wav", "unreadable")]
    assert _all_files(tmp_path / "out2") == ["ok.wav"]


def test_a_damaged_tar_header_is_reported_not_silent(tmp_path):
    archive = _tar(tmp_path / "d.tar", [("one.wav", WAV_BYTES), ("two.wav", WAV_BYTES), ("three.wav", WAV_BYTES)])
    with tarfile.open(archive) as tf:
        offset = tf.getmember("two.wav").offset
    raw = bytearray(archive.read_bytes())
    raw[offset + 148 : offset + 156] = b"0000000\x00"  # a wrong header checksum
    archive.write_bytes(bytes(raw))
    result = unpack(archive, tmp_path / "out", GENEROUS)  # main: one.wav only, without a word
    assert result.audio == ["one.wav"]
    (damaged,) = result.skipped
    assert damaged.category == "damaged" and f"byte {offset}" in damaged.reason and "re-create" in damaged.reason


def test_a_url_is_not_reported_as_missing(tmp_path):
    with pytest.raises(InputError, match="is a URL") as err:
        unpack("https://example.com/data.zip", tmp_path / "out", GENEROUS)
    assert "does not exist" not in str(err.value) and "download it first" in str(err.value)


def test_decompression_staging_never_reuses_a_folder_that_is_there(tmp_path):
    theirs = tmp_path / ".out.decompressed"
    theirs.mkdir()
    (theirs / "precious.wav").write_bytes(b"mine")
    upload = tmp_path / "song.wav.gz"
    upload.write_bytes(gzip.compress(WAV_BYTES))
    result = unpack(upload, tmp_path / "out", GENEROUS)  # main: rmtree(.out.decompressed) took precious.wav
    assert result.audio == ["song.wav"]
    assert (theirs / "precious.wav").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.decompressed", "out", "song.wav.gz"]
