"""Preparation under hostile or careless input (issue 12): what is ours to delete, where we may write, oversized and
mis-encoded descriptions, names too long for the filesystem, Ctrl-C, audio over full scale or with no signal, and
the modes of the files we hand over."""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.params import InputError, from_kwargs
from preprocessing import PrepareParams, load_prepared, prepare
from preprocessing import __main__ as cli
from tests.preprocessing.audio_files import track, write_audio

# The module, not the function `preprocessing.prepare` that the package exports under the same name.
prepare_mod = importlib.import_module("preprocessing.prepare")
# Spelled out (not imported) so that this file also runs, and fails case by case, on code that predates them.
OWNED_MARKER = ".musicgen-ft-owned"  # preprocessing.prepare.OWNED_MARKER
MAX_DESCRIPTION_CHARS = 500  # preprocessing.descriptions.MAX_DESCRIPTION_CHARS
ROOT = Path(__file__).resolve().parents[2]
SR = 32000


def params(path, **kw) -> PrepareParams:
    kw.setdefault("drop_vocals", False)
    kw.setdefault("auto_labeling", False)
    return from_kwargs(PrepareParams, dataset_path=str(path), **kw)


def _zip(dest: Path, members: dict[str, bytes | Path]) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data.read_bytes() if isinstance(data, Path) else data)
    return dest


def _wav_bytes(tmp_path: Path, seconds: float = 6.0, seed: int = 0, data: np.ndarray | None = None, **kw) -> bytes:
    path = tmp_path / f"src-{seed}.wav"
    sf.write(str(path), track(seconds, 44100, 2, seed=seed) if data is None else data, 44100, **kw)
    return path.read_bytes()


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    write_audio(folder / "a.flac", track(6, 44100, 2, seed=1), 44100)
    return _zip(folder / "d.zip", {"album/a.flac": folder / "a.flac"})


# ------------------------------------------------------------------------------------- we delete only what we made


def test_dataset_inside_a_folder_we_delete_is_refused_before_anything_is_touched(tmp_path, small_zip):
    out = tmp_path / "out"
    for sub in ("unpacked", "prepare-tmp", "dataset"):
        mine = out / sub / "my_only_copy.zip"
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_bytes(small_zip.read_bytes())
        with pytest.raises(InputError, match="lies inside") as err:
            prepare(params(mine), out)
        assert err.value.name == "dataset_path" and str(mine.parent) in str(err.value)
        assert mine.read_bytes() == small_zip.read_bytes()  # on main: deleted, then "does not exist"
        mine.unlink()
        mine.parent.rmdir()
    # A dataset beside the folders we manage is fine (nothing we do touches it).
    beside = out / "tracks.zip"
    beside.write_bytes(small_zip.read_bytes())
    assert len(prepare(params(beside), out).clips) == 1
    assert beside.is_file()


@pytest.mark.parametrize("sub", ["unpacked", "prepare-tmp"])
def test_a_foreign_work_folder_is_an_error_naming_it(tmp_path, small_zip, sub):
    out = tmp_path / "out"
    precious = out / sub / "notes" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("mine")
    with pytest.raises(InputError, match="a preparation did not make") as err:
        prepare(params(small_zip), out)
    assert err.value.name == "output_dir"
    assert str(out / sub) in str(err.value) and "Move it away" in str(err.value)
    assert precious.read_text() == "mine"
    assert not (out / "dataset").exists()  # refused before anything was written


def test_our_leftovers_are_removed_and_our_folders_carry_the_marker(tmp_path, small_zip, monkeypatch):
    out = tmp_path / "out"
    # An interrupted earlier run left marked work folders (and an empty one): ours, removed.
    (out / "unpacked" / "files").mkdir(parents=True)
    (out / "unpacked" / OWNED_MARKER).write_text("x")
    (out / "unpacked" / "files" / "old.wav").write_bytes(b"RIFF")
    (out / "prepare-tmp").mkdir()
    seen = {}
    real_unpack = prepare_mod.unpack

    def spy(path, dest, limits):
        seen["marked"] = [(out / d / OWNED_MARKER).is_file() for d in ("unpacked", "prepare-tmp", "dataset")]
        seen["dest"] = dest
        return real_unpack(path, dest, limits)

    monkeypatch.setattr(prepare_mod, "unpack", spy)
    dataset = prepare(params(small_zip), out)
    assert prepare_mod.OWNED_MARKER == OWNED_MARKER
    assert seen["marked"] == [True, True, True]
    assert seen["dest"].parent == out / "unpacked"  # the upload never lands beside the marker
    assert not (out / "unpacked").exists() and not (out / "prepare-tmp").exists()
    assert (dataset.folder / OWNED_MARKER).is_file()


def test_a_prepared_dataset_holding_user_files_is_not_replaced(tmp_path, small_zip):
    out = tmp_path / "out"
    first = prepare(params(small_zip), out)
    mine = first.folder / "clips" / "my_mix.mp3"
    mine.write_bytes(b"ID3 mine")
    with pytest.raises(InputError, match=r"not a prepared dataset \(clips/my_mix.mp3\)") as err:
        prepare(params(small_zip), out)
    assert err.value.name == "output_dir"
    assert mine.read_bytes() == b"ID3 mine" and first.manifest.is_file()
    mine.unlink()
    assert len(prepare(params(small_zip), out).clips) == 1  # only ours left: replaced


def test_output_dir_that_is_a_file_or_not_writable(tmp_path, small_zip, monkeypatch, capsys):
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder") as err:
        prepare(params(small_zip), a_file)
    assert err.value.name == "output_dir" and str(a_file) in str(err.value)
    with pytest.raises(InputError, match="a part of that path is a file"):
        prepare(params(small_zip), a_file / "sub")
    assert a_file.read_text() == "x"
    # The CLI: one line, exit 2, no traceback (main raised FileExistsError).
    assert cli.main([str(small_zip), str(a_file), "--no-drop_vocals", "--no-auto_labeling"]) == 2
    err_text = capsys.readouterr().err
    assert "Invalid input 'output_dir'" in err_text and "Traceback" not in err_text
    # Not writable. Root writes anywhere (os.access says yes), so the probe write itself is made to fail too.
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
        with pytest.raises(InputError, match="is not writable"):
            prepare(params(small_zip), locked)
        locked.chmod(0o700)

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(prepare_mod.tempfile, "mkstemp", denied)
    with pytest.raises(InputError, match=r"locked is not writable \(Permission denied\)") as err:
        prepare(params(small_zip), locked)
    assert err.value.name == "output_dir" and list(locked.iterdir()) == []


def test_an_https_dataset_path_says_what_to_do(tmp_path):
    url = "https://example.com/my_tracks.zip"
    with pytest.raises(InputError, match="is a URL") as err:
        prepare(params(url), tmp_path / "out")
    message = str(err.value)
    assert err.value.name == "dataset_path" and "does not exist" not in message
    assert "Cog inputs" in message and "download it first" in message and url in message
    assert not (tmp_path / "out").exists()  # refused with the other input checks, before any folder is made


# ------------------------------------------------------------------------------------------------------ descriptions


def test_descriptions_are_bounded_and_decoded_with_a_stated_fallback(tmp_path):
    wav = _wav_bytes(tmp_path)
    huge = ("lofi piano rain " * 7000).encode()  # ~110 KB on one line (main: 64 KiB kept, tokenized untruncated)
    upload = _zip(
        tmp_path / "d.zip",
        {
            "long.wav": wav,
            "long.txt": huge,
            "latin.wav": wav,
            "latin.txt": "café música, guitarra española\n".encode("latin-1"),
            "quotes.wav": wav,
            "quotes.txt": "\u201csmoky\u201d jazz \u2013 late night".encode("cp1252"),
        },
    )
    dataset = prepare(params(upload), tmp_path / "w")
    by = {c.source: c.description for c in dataset.clips}
    assert len(by["long.wav"]) <= MAX_DESCRIPTION_CHARS and by["long.wav"].startswith("lofi piano rain lofi")
    assert by["long.wav"].endswith(("lofi", "piano", "rain"))  # cut at a word boundary
    assert by["latin.wav"] == "café música, guitarra española"  # main: "caf� m�sica" without a word
    assert by["quotes.wav"] == "\u201csmoky\u201d jazz \u2013 late night"
    warnings = dataset.report["warnings"]
    assert any("long.txt" in w and "cut to" in w and "512 tokens" in w for w in warnings), warnings
    assert any("latin.txt" in w and "not valid UTF-8" in w and "cp1252" in w for w in warnings), warnings
    assert any("quotes.txt" in w and "cp1252" in w for w in warnings), warnings
    # one_same_description and trigger: bounded as well; the trigger is kept whole, the description gives way.
    long_text = "warm analog synth pads " * 100
    dataset = prepare(params(upload, one_same_description=long_text, trigger="zq_artist"), tmp_path / "w2")
    (text,) = {c.description for c in dataset.clips}
    assert text.startswith("zq_artist, warm analog synth pads") and len(text) <= MAX_DESCRIPTION_CHARS
    cut = [w for w in dataset.report["warnings"] if w.startswith("one_same_description")]
    assert len(cut) == 1 and "with the trigger in front" in cut[0]  # once, not once per track


# ------------------------------------------------------------------------------------------------- over-long names


def test_over_long_member_and_folder_names_are_prepared_and_reported(tmp_path):
    wav = _wav_bytes(tmp_path)
    cjk = "曲" * 86  # 258 bytes: one over the filesystem's 255
    deep = "/".join(["長いフォルダ名" * 4] * 12)  # each folder 84 bytes; 1 KB of path
    upload = _zip(
        tmp_path / "long.zip",
        {
            f"{cjk}.wav": wav,
            f"{cjk}.txt": b"cjk titled track",
            f"{'d' * 300}/song.wav": wav,
            f"{deep}/deep.wav": wav,
        },
    )
    dataset = prepare(params(upload), tmp_path / "w")  # main: OSError: File name too long
    sources = sorted(c.source for c in dataset.clips)
    assert sources == sorted([f"{cjk}.wav", f"{'d' * 300}/song.wav", f"{deep}/deep.wav"])
    assert {c.source: c.description for c in dataset.clips}[f"{cjk}.wav"] == "cjk titled track"
    for clip in dataset.clips:
        assert len(clip.path.name.encode()) <= 255 and clip.path.is_file()
    shortened = dataset.report["names_shortened"]
    stored = {e["file"]: e["stored_as"] for e in shortened if "stored_as" in e}
    assert set(stored) == {f"{cjk}.wav", f"{cjk}.txt", f"{'d' * 300}/song.wav", f"{deep}/deep.wav"}
    assert all(len(part.encode()) <= 255 for s in stored.values() for part in s.split("/"))
    assert len(set(stored.values())) == len(stored)
    clip_names = {e["file"]: e["clips"] for e in shortened if "clips" in e}
    assert set(clip_names) >= {f"{cjk}.wav", f"{deep}/deep.wav"}


# ---------------------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, small_zip, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "load_audio", interrupted)
    rc = cli.main([str(small_zip), str(out), "--no-drop_vocals", "--no-auto_labeling"])
    assert rc == 130  # main: KeyboardInterrupt traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = [line for line in err.splitlines() if "interrupted" in line]  # the rest is progress bars and logs
    assert line.startswith("interrupted: preparing") and str(small_zip) in line
    assert "Run the same command again" in line and err.strip().splitlines()[-1] == line
    assert not (out / "unpacked").exists() and not (out / "prepare-tmp").exists()  # cleaned on the way out


@pytest.mark.parametrize("sig,rc,word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_in_a_real_process(tmp_path, small_zip, sig, rc, word):
    # A real signal, delivered to the process while it prepares the first track.
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "import importlib\n"
        "p = importlib.import_module('preprocessing.prepare')\n"
        "real = p.load_audio\n"
        "def load(path):\n"
        f"    os.kill(os.getpid(), signal.{sig})\n"
        "    return real(path)\n"
        "p.load_audio = load\n"
        "from preprocessing.__main__ import main\n"
        f"sys.exit(main([{str(small_zip)!r}, {str(out)!r}, '--no-drop_vocals', '--no-auto_labeling']))\n"
    )
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == rc, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"{word}: preparing")
    assert not (out / "unpacked").exists() and not (out / "prepare-tmp").exists()  # cleaned up, SIGTERM too


# ------------------------------------------------------------------------------------------------------ audio sanity


def test_float_source_above_full_scale_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(44100 * 6) / 44100
    hot = (1.2 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    hot = np.stack([hot, 0.9 * hot], axis=1)
    assert np.mean(np.abs(hot[:, 0]) > 1.0) > 0.3  # the case: main hard-clips a third of the samples
    upload = _zip(tmp_path / "hot.zip", {"hot.wav": _wav_bytes(tmp_path, data=hot, subtype="FLOAT")})
    dataset = prepare(params(upload), tmp_path / "w")
    (clip,) = dataset.clips
    got, _ = sf.read(str(clip.path), dtype="float32")
    assert np.mean(np.abs(got) >= 0.999) < 0.001  # no run of clipped samples
    assert np.max(np.abs(got)) == pytest.approx(1.0, abs=0.01)  # scaled to full scale, not below
    (entry,) = dataset.report["normalized"]
    assert entry["file"] == "hot.wav" and entry["source_peak"] == pytest.approx(float(np.abs(hot).max()), abs=1e-3)
    assert entry["gain_db"] < -1.0 and "above full scale" in entry["reason"]
    # the shape is kept: the clip is the source scaled (one gain), so its correlation with the source is ~1
    source = hot[:: 44100 // 100, 0]
    scaled = got[:: 32000 // 100, 0][: len(source)]
    assert np.corrcoef(source[: len(scaled)], scaled)[0, 1] > 0.99


def test_a_dc_only_track_or_clip_is_skipped_as_silent(tmp_path, caplog):
    rng = np.random.default_rng(1)
    dc = np.full((44100 * 8, 2), 0.5, np.float32) + 1e-6 * rng.standard_normal((44100 * 8, 2)).astype(np.float32)
    music_then_dc = np.concatenate([track(6, 44100, 2), np.full((44100 * 6, 2), -0.3, np.float32)])
    upload = _zip(
        tmp_path / "dc.zip",
        {
            "dc.wav": _wav_bytes(tmp_path, data=dc, subtype="FLOAT", seed=1),
            "half.wav": _wav_bytes(tmp_path, data=music_then_dc, subtype="FLOAT", seed=2),
        },
    )
    dataset = prepare(params(upload, chunk_seconds=5, min_clip_seconds=1), tmp_path / "w")
    skipped = {s["file"]: s for s in dataset.report["skipped"]}
    assert skipped["dc.wav"]["category"] == "silent" and "DC offset 0.5" in skipped["dc.wav"]["reason"]
    assert any("Skipping dc.wav" in r.message and "DC offset" in r.message for r in caplog.records)
    assert {c.source for c in dataset.clips} == {"half.wav"}
    # half.wav: 12 s = clips 0 (music), 1 (music to 6 s, then DC), 2 (DC only: dropped)
    assert [c.info["clip_index"] for c in dataset.clips] == [0, 1]
    assert {"track": "half.wav", "clip": 2, "reason": "silent (DC offset only)"} in dataset.report["clips_skipped"]


# ------------------------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_handed_to_users_get_the_umask_mode(tmp_path, small_zip, umask, mode):
    old = os.umask(umask)
    try:
        dataset = prepare(params(small_zip), tmp_path / "out")
    finally:
        os.umask(old)
    handed = [dataset.manifest, dataset.folder / "report.json"]
    handed += [p for c in dataset.clips for p in (c.path, c.path.with_suffix(".json"))]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in handed} == {oct(mode)}
    assert load_prepared(dataset.folder).clips  # what we wrote reads back
    assert json.loads((dataset.folder / "report.json").read_text())["clips"] == 1
