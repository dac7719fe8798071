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
