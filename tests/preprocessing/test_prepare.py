"""End to end: synthesized uploads in every archive type and audio format -> clips, sidecars, manifest, report."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.params import InputError, from_kwargs
from preprocessing import PrepareParams, load_prepared, prepare
from tests.preprocessing import fake_essentia
from tests.preprocessing.audio_files import chord_with_beat, track, write_audio

ROOT = Path(__file__).resolve().parents[2]
SR = 32000
A_MINOR_100 = ((220.0, 261.63, 329.63), 100)
C_MAJOR_128 = ((261.63, 329.63, 392.0), 128)


def params(path, **kw) -> PrepareParams:
    kw.setdefault("drop_vocals", False)
    kw.setdefault("auto_labeling", False)
    return from_kwargs(PrepareParams, dataset_path=str(path), **kw)


def _zip_folder(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return dest


# The main upload: every format, nested unicode folders, a 75 s, a 12 s, a 48 kHz mono, 4 channels, float/24/32-bit,
# plus what must be skipped: a corrupt file, a silent one, a 3 s one, macOS junk, a dotfile and a PDF.
TRACKS = {
    "Rock/Ünïcødé 曲 1.wav": dict(seconds=75, sr=44100, channels=2),  # -> 30 + 30 + 15
    "mono48k.flac": dict(seconds=40, sr=48000, channels=1),  # -> 30 + 10
    "short12.ogg": dict(seconds=12, sr=22050, channels=2),  # -> 12
    "deep/er/folder/x.mp3": dict(seconds=7, sr=44100, channels=2),
    "deep/y.opus": dict(seconds=7, sr=48000, channels=2),
    "deep/z.m4a": dict(seconds=7, sr=44100, channels=2),
    "deep/w.aac": dict(seconds=7, sr=44100, channels=1),
    "deep/v.aiff": dict(seconds=7, sr=16000, channels=1),
    "bits/f32.wav": dict(seconds=6, sr=44100, channels=2, subtype="FLOAT"),
    "bits/i24.wav": dict(seconds=6, sr=96000, channels=2, subtype="PCM_24"),
    "bits/i32.wav": dict(seconds=6, sr=8000, channels=1, subtype="PCM_32"),
    "bits/quad.wav": dict(seconds=6, sr=44100, channels=4),
}
EXPECTED_CLIPS = {"Rock/Ünïcødé 曲 1.wav": [30, 30, 15], "mono48k.flac": [30, 10], "short12.ogg": [12]}


@pytest.fixture(scope="module")
def upload(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("upload-src")
    for i, (rel, spec) in enumerate(TRACKS.items()):
        spec = dict(spec)
        data = track(spec.pop("seconds"), spec["sr"], spec["channels"], freq=200 + 30 * i, seed=i)
        write_audio(src / rel, data, spec["sr"], spec.get("subtype"))
    (src / "Rock" / "Ünïcødé 曲 1.txt").write_text("\ufeff\n   \n  heavy   guitar riff \nsecond line\n", "utf-8")
    (src / "deep" / "y.txt").write_text("\n\n")  # empty: falls back to auto-labels
    (src / "broken.mp3").write_bytes(np.random.default_rng(0).bytes(20000))
    hiss = 2e-4 * np.random.default_rng(1).uniform(-1, 1, (SR * 10, 2))  # below -70 dBFS: silent
    sf.write(str(src / "silence.wav"), hiss.astype(np.float32), SR, subtype="FLOAT")
    sf.write(str(src / "tiny3s.wav"), track(3, 44100, 1), 44100)
    (src / "__MACOSX" / "deep").mkdir(parents=True)
    (src / "__MACOSX" / "deep" / "._y.opus").write_bytes(b"\x00\x05\x16\x07junk")
    (src / "deep" / "._z.m4a").write_bytes(b"\x00\x05\x16\x07junk")
    (src / ".DS_Store").write_bytes(b"junk")
    (src / ".cache").mkdir()
    (src / ".cache" / "old.wav").write_bytes(b"junk")
    (src / "liner notes.pdf").write_bytes(b"%PDF-1.4")
    return _zip_folder(src, tmp_path_factory.mktemp("upload") / "dataset.zip")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return fake_essentia.write_models(tmp_path_factory.mktemp("essentia"))


@pytest.fixture(scope="module")
def prepared(upload, models, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    dataset = prepare(params(upload, auto_labeling=True, essentia_models=str(models), trigger="mgft"), work)
    return work, dataset


def test_clips_per_track(prepared):
    work, dataset = prepared
    assert dataset.folder == work / "dataset" and dataset.manifest == work / "dataset" / "data.jsonl"
    by_track: dict[str, list] = {}
    for clip in dataset.clips:
        by_track.setdefault(clip.source, []).append(clip)
    assert sorted(by_track) == sorted(TRACKS)
    for rel, spec in TRACKS.items():
        durations = [round(c.duration, 3) for c in by_track[rel]]
        assert durations == EXPECTED_CLIPS.get(rel, [pytest.approx(spec["seconds"], abs=0.1)]), rel
    for clip in dataset.clips:
        data, sr = sf.read(str(clip.path), dtype="float32", always_2d=True)
        info = sf.info(str(clip.path))
        assert (sr, info.subtype, info.format) == (SR, "PCM_16", "WAV")
        assert data.shape == (round(clip.duration * SR), clip.channels)
        assert np.abs(data).max() > 0.05
        assert clip.path.parent == dataset.folder / "clips"
        assert clip.sample_rate == SR
        want_channels = 1 if TRACKS[clip.source]["channels"] == 1 else 2  # stereo kept, 4 channels -> 2
        assert clip.channels == want_channels, clip.source
    assert len({c.path.name.casefold() for c in dataset.clips}) == len(dataset.clips)
    names = sorted(c.path.name for c in by_track["Rock/Ünïcødé 曲 1.wav"])
    assert names == ["Rock__Ünïcødé_曲_1_000.wav", "Rock__Ünïcødé_曲_1_001.wav", "Rock__Ünïcødé_曲_1_002.wav"]


def test_resampled_content_matches_the_source(prepared, upload, tmp_path):
    """The 48 kHz mono track: its first clip is the source resampled to 32 kHz (same tone, same level)."""
    _, dataset = prepared
    clip = next(c for c in dataset.clips if c.source == "mono48k.flac" and c.info["clip_index"] == 0)
    with zipfile.ZipFile(upload) as zf:
        source, sr = sf.read(zf.open("mono48k.flac"), dtype="float32")
    got, _ = sf.read(str(clip.path), dtype="float32")
    assert sr == 48000
    # Compare spectra: same dominant frequency and RMS within 1 %.
    spec_src = np.abs(np.fft.rfft(source[: 5 * sr]))
    spec_got = np.abs(np.fft.rfft(got[: 5 * SR]))
    assert abs(np.argmax(spec_src) / 5 - np.argmax(spec_got) / 5) <= 0.2
    rms = lambda x: float(np.sqrt(np.mean(x**2)))  # noqa: E731
    assert rms(got[: 30 * SR]) == pytest.approx(rms(source[: 30 * sr]), rel=0.01)


def test_skipped_files_are_reported_with_reasons(prepared):
    _, dataset = prepared
    report = dataset.report
    by_file = {s["file"]: s for s in report["skipped"]}
    assert by_file["broken.mp3"]["category"] == "corrupt" and "broken.mp3" in by_file["broken.mp3"]["reason"]
    assert by_file["silence.wav"]["category"] == "silent"
    assert by_file["tiny3s.wav"]["category"] == "too_short"
    assert by_file["liner notes.pdf"]["category"] == "non_audio"
    assert by_file[".DS_Store"]["category"] == "macos_junk"
    assert by_file["deep/._z.m4a"]["category"] == "macos_junk"
    assert by_file["__MACOSX/deep/._y.opus"]["category"] == "macos_junk"
    assert by_file[".cache/old.wav"]["category"] == "hidden"
    assert report["skipped_counts"] == {
        "macos_junk": 3,
        "hidden": 1,
        "non_audio": 1,
        "corrupt": 1,
        "silent": 1,
        "too_short": 1,
    }
    assert report["tracks_found"] == len(TRACKS) + 3 and report["tracks_used"] == len(TRACKS)
    assert report["clips"] == len(dataset.clips)
    assert report["total_seconds"] == pytest.approx(sum(c.duration for c in dataset.clips))
    assert report["source_seconds"] == pytest.approx(sum(s["seconds"] for s in TRACKS.values()), abs=0.5)
    assert json.loads((dataset.folder / "report.json").read_text()) == report
    assert {t["file"]: t["sample_rate"] for t in report["tracks"]}["bits/i24.wav"] == 96000


def test_descriptions_text_file_auto_labels_and_trigger(prepared):
    _, dataset = prepared
    for clip in dataset.clips:
        assert clip.description == clip.info["description"]
        assert clip.description.startswith("mgft, ")
    txt = [c for c in dataset.clips if c.source == "Rock/Ünïcødé 曲 1.wav"]
    assert {c.description for c in txt} == {"mgft, heavy guitar riff"}  # first non-empty line, BOM dropped
    assert {c.info["description_source"] for c in txt} == {"text_file"}
    auto = [c for c in dataset.clips if c.source == "deep/y.opus"]  # its .txt is empty
    assert auto[0].info["description_source"] == "auto_labels"
    assert auto[0].description.startswith(f"mgft, {fake_essentia.EXPECTED_CAPTION_TAGS}, in ")
    assert auto[0].description.endswith(" bpm")
    assert dataset.report["descriptions"] == {"text_file": 1, "auto_labels": len(TRACKS) - 1}
    assert dataset.report["unmatched_text_files"] == []
    assert dataset.report["labels"]["genre"] == {
        g: len(TRACKS) - 1 for g in ("jazz", "bossa nova", "electronic", "house")
    }
    assert dataset.report["warnings"] == []


def test_manifest_and_sidecars_follow_audiocraft(prepared):
    _, dataset = prepared
    lines = [json.loads(line) for line in dataset.manifest.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(dataset.clips)
    for line, clip in zip(lines, dataset.clips, strict=True):
        assert list(line) == ["path", "duration", "sample_rate", "amplitude", "weight", "info_path"]
        assert line["path"] == str(clip.path.resolve()) and Path(line["path"]).is_absolute()
        assert (line["sample_rate"], line["amplitude"], line["weight"], line["info_path"]) == (SR, None, None, None)
        sidecar = json.loads(clip.path.with_suffix(".json").read_text(encoding="utf-8"))
        for key in ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "description", "name", "instrument"):
            assert key in sidecar
        assert sidecar == clip.info


def test_audiocraft_music_dataset_reads_it(prepared, tmp_path, monkeypatch):
    from audiocraft.data.music_dataset import MusicDataset, MusicInfo
    from audiocraft.environment import AudioCraftEnvironment

    # The audiocraft wheel ships without config/teams/*.yaml, which its datasets read for path mappers.
    (tmp_path / "teams.yaml").write_text("default: {}\n")
    monkeypatch.setenv("AUDIOCRAFT_CONFIG", str(tmp_path / "teams.yaml"))
    monkeypatch.setenv("AUDIOCRAFT_CLUSTER", "default")
    monkeypatch.setattr(AudioCraftEnvironment, "_instance", None)
    _, dataset = prepared
    ds = MusicDataset.from_meta(
        dataset.folder,
        segment_duration=None,  # one item per clip, whole clip
        sample_rate=SR,
        channels=1,
        shuffle=False,
        return_info=True,
        info_fields_required=True,
    )
    assert len(ds) == len(dataset.clips)
    by_path = {str(c.path.resolve()): c for c in dataset.clips}
    for index in (0, len(ds) - 1):
        wav, info = ds[index]
        assert isinstance(info, MusicInfo)
        clip = by_path[info.meta.path]
        assert wav.shape == (1, round(clip.duration * SR))
        assert info.description == clip.description
        assert info.key == clip.info["key"].lower() and info.bpm == clip.info["bpm"]
        assert info.to_condition_attributes().text["description"] == clip.description


def test_load_prepared_round_trip_and_moved_folder(prepared, tmp_path):
    _, dataset = prepared
    again = load_prepared(dataset.folder)
    assert [(c.path, c.duration, c.channels, c.description, c.source) for c in again.clips] == [
        (c.path, c.duration, c.channels, c.description, c.source) for c in dataset.clips
    ]
    assert again.report == dataset.report
    moved = tmp_path / "moved"
    shutil.copytree(dataset.folder, moved)
    relocated = load_prepared(moved)
    assert all(c.path.parent == moved / "clips" and c.path.is_file() for c in relocated.clips)
    with pytest.raises(InputError, match="not a prepared dataset"):
        load_prepared(tmp_path)


def _small_tracks(folder: Path) -> list[Path]:
    a = write_audio(folder / "album" / "a.flac", track(8, 44100, 2, seed=1), 44100)
    b = write_audio(folder / "b.mp3", track(6, 48000, 1, freq=330, seed=2), 48000)
    return [a, b]


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tgz-misnamed", "gz-single", "single-file", "single-m4a"])
def test_every_archive_type(tmp_path, kind):
    src = tmp_path / "src"
    files = _small_tracks(src)
    upload = tmp_path / "upload"
    if kind in ("tar", "tar.gz", "tgz-misnamed"):
        mode = "w" if kind == "tar" else "w:gz"
        upload = tmp_path / ("upload.zip" if kind == "tgz-misnamed" else f"upload.{kind}")
        with tarfile.open(upload, mode) as tf:
            for f in files:
                tf.add(f, f.relative_to(src).as_posix())
        expected = {"album/a.flac": [8.0], "b.mp3": [6.0]}
    elif kind == "gz-single":
        with open(files[0], "rb") as raw, gzip.open(upload, "wb") as gz:
            gz.write(raw.read())
        expected = {"upload": [8.0]}
    elif kind == "single-file":
        upload = files[1]
        expected = {"b.mp3": [6.0]}
    else:
        written = write_audio(tmp_path / "song.m4a", track(9, 44100, 2), 44100)
        upload = written.rename(tmp_path / "cog-tmp-name")  # Cog hands files over without their extension
        expected = {"cog-tmp-name": [9.0]}
    dataset = prepare(params(upload), tmp_path / "work")
    got: dict[str, list[float]] = {}
    for c in dataset.clips:
        got.setdefault(c.source, []).append(round(c.duration, 1))
    assert got == {k: [pytest.approx(v, abs=0.1) for v in vs] for k, vs in expected.items()}
    assert not (tmp_path / "work" / "unpacked").exists()  # the unpacked copy is cleaned up
    assert all(p.is_file() for p in files)  # the user's files are untouched


def test_one_same_description_wins_and_unconditional_is_allowed(tmp_path):
    src = tmp_path / "src"
    _small_tracks(src)
    (src / "b.txt").write_text("ignored when one_same_description is set")
    (src / "album" / "orphan.txt").write_text("no track of that name")
    upload = _zip_folder(src, tmp_path / "d.zip")
    dataset = prepare(params(upload, one_same_description="  dreamy synthwave  ", trigger="zq"), tmp_path / "w1")
    assert {c.description for c in dataset.clips} == {"zq, dreamy synthwave"}
    assert dataset.report["descriptions"] == {"one_same_description": 2}
    assert dataset.report["unmatched_text_files"] == ["album/orphan.txt"]
    plain = prepare(params(upload), tmp_path / "w2")  # no labels, no text for a.flac: unconditional
    assert {c.source: c.description for c in plain.clips} == {
        "album/a.flac": "",
        "b.mp3": "ignored when one_same_description is set",
    }
    # key/bpm are still measured (they are info fields, whatever the description is)
    assert all(c.info["key"] and c.info["bpm"] for c in plain.clips)


def test_key_and_bpm_and_missing_models_warning(tmp_path, caplog):
    src = tmp_path / "src"
    write_audio(src / "am100.wav", chord_with_beat(*A_MINOR_100, seconds=20), 44100)
    write_audio(src / "cmaj128.flac", chord_with_beat(*C_MAJOR_128, seconds=20, seed=3), 44100)
    upload = _zip_folder(src, tmp_path / "k.zip")
    empty = tmp_path / "no-models"
    empty.mkdir()
    dataset = prepare(params(upload, auto_labeling=True, essentia_models=str(empty)), tmp_path / "work")
    info = {c.source: c.info for c in dataset.clips}
    assert info["am100.wav"]["key"] == "A minor" and info["am100.wav"]["bpm"] == pytest.approx(100, abs=1.5)
    assert info["cmaj128.flac"]["key"] == "C major" and info["cmaj128.flac"]["bpm"] == pytest.approx(128, abs=1.5)
    assert info["am100.wav"]["genre"] is None and info["am100.wav"]["moods"] is None
    assert info["am100.wav"]["description"] == f"in A minor, {round(info['am100.wav']['bpm'])} bpm"
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "essentia model files missing" in r.message]
    assert len(warnings) == 1 and str(empty) in warnings[0].message
    assert len(dataset.report["warnings"]) == 1


def test_missing_label_models_are_not_mentioned_when_every_track_has_its_description(tmp_path, caplog):
    """Tags only describe tracks without a description of their own: with a text file for every track (or
    one_same_description) the missing essentia models change nothing, and the 400-character warning stays out of
    the log and the report; key and bpm are still measured."""
    src = tmp_path / "src"
    write_audio(src / "am100.wav", chord_with_beat(*A_MINOR_100, seconds=10), 44100)
    (src / "am100.txt").write_text("dusty piano loop")
    upload = _zip_folder(src, tmp_path / "k.zip")
    empty = tmp_path / "no-models"
    empty.mkdir()
    for extra in ({}, {"one_same_description": "one text for all"}):
        caplog.clear()
        work = tmp_path / f"work{len(extra)}"
        dataset = prepare(params(upload, auto_labeling=True, essentia_models=str(empty), **extra), work)
        assert not [r for r in caplog.records if "essentia model files missing" in r.getMessage()]
        assert not [w for w in dataset.report["warnings"] if "essentia" in w]
        assert dataset.clips[0].info["key"] == "A minor"


def test_label_list_not_matching_the_model_is_caught(tmp_path):
    models = fake_essentia.write_models(tmp_path / "models", instrument_classes=fake_essentia.INSTRUMENTS[:-1])
    src = tmp_path / "src"
    write_audio(src / "song.wav", chord_with_beat(*A_MINOR_100, seconds=10), 44100)
    dataset = prepare(
        params(_zip_folder(src, tmp_path / "s.zip"), auto_labeling=True, essentia_models=str(models)), tmp_path / "w"
    )
    clip = dataset.clips[0]
    assert clip.info["instrument"] is None  # that head is off
    assert clip.info["genre"] == "jazz, bossa nova, electronic, house" and clip.info["moods"]
    (warning,) = dataset.report["warnings"]
    assert "instruments" in warning and "outputs 40 values" in warning and "lists 39 classes" in warning


def test_nothing_usable_lists_what_was_found(tmp_path):
    upload = tmp_path / "junk.zip"
    with zipfile.ZipFile(upload, "w") as zf:
        zf.writestr("notes.pdf", b"%PDF")
        zf.writestr("__MACOSX/._song.wav", b"junk")
        zf.writestr("song.wav", b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
        quiet = tmp_path / "quiet.flac"  # -80 dBFS
        sf.write(str(quiet), np.full((SR * 8, 1), 1e-4, np.float32), SR, format="FLAC")
        zf.write(quiet, "quiet.flac")
    with pytest.raises(InputError) as err:
        prepare(params(upload), tmp_path / "work")
    message = str(err.value)
    assert err.value.name == "dataset_path"
    assert "no usable audio in junk.zip" in message
    for expected in ("notes.pdf: not an audio file", "song.wav: cannot be decoded", "quiet.flac: silent", "._song"):
        assert expected in message
    report = json.loads((tmp_path / "work" / "dataset" / "report.json").read_text())
    assert report["clips"] == 0 and report["skipped_counts"]["corrupt"] == 1


def test_no_audio_at_all_and_bad_inputs(tmp_path):
    upload = tmp_path / "docs.zip"
    with zipfile.ZipFile(upload, "w") as zf:
        zf.writestr("a/readme.md", b"hi")
    with pytest.raises(InputError, match="(?s)no usable audio.*readme.md: not an audio file"):
        prepare(params(upload), tmp_path / "w1")
    not_audio = tmp_path / "upload"
    not_audio.write_bytes(b"just some text, neither an archive nor audio" * 10)
    with pytest.raises(InputError, match="neither an archive"):
        prepare(params(not_audio), tmp_path / "w2")
    with pytest.raises(InputError, match="min_clip_seconds"):
        prepare(params(upload, chunk_seconds=5, min_clip_seconds=8), tmp_path / "w3")
    with pytest.raises(InputError, match="no training data"):
        prepare(from_kwargs(PrepareParams, drop_vocals=False), tmp_path / "w4")
    with pytest.raises(InputError, match="device"):
        from_kwargs(PrepareParams, dataset_path="x.zip", device="tpu")
    assert not (tmp_path / "w3").exists() and not (tmp_path / "w4").exists()  # refused before writing anything


def test_rerun_replaces_its_own_output_only(tmp_path):
    src = tmp_path / "src"
    _small_tracks(src)
    upload = _zip_folder(src, tmp_path / "d.zip")
    first = prepare(params(upload, chunk_seconds=4, min_clip_seconds=2), tmp_path / "work")
    assert len(first.clips) == 4  # 8 s -> 4 + 4 ; 6 s -> 4 + 2
    second = prepare(params(upload), tmp_path / "work")
    assert len(second.clips) == 2 and len(list((second.folder / "clips").glob("*.wav"))) == 2
    foreign = tmp_path / "other" / "dataset"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("mine")
    with pytest.raises(InputError, match="not a prepared dataset"):
        prepare(params(upload), tmp_path / "other")
    assert (foreign / "precious.txt").read_text() == "mine"


def test_cli(tmp_path):
    src = tmp_path / "src"
    _small_tracks(src)
    upload = _zip_folder(src, tmp_path / "d.zip")
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "preprocessing", str(upload), str(tmp_path / "out"), "--no-drop_vocals",
         "--auto_labeling", "false", "--trigger", "tok", "--chunk_seconds", "5", "--min_clip_seconds", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Prepared 4 clips" in run.stdout and str(tmp_path / "out" / "dataset" / "data.jsonl") in run.stdout
    dataset = load_prepared(tmp_path / "out" / "dataset")
    assert [c.duration for c in dataset.clips] == [5.0, 3.0, 5.0, pytest.approx(1.0, abs=0.1)]  # mp3 pads a little
    assert {c.description for c in dataset.clips} == {"tok"}
    bad = subprocess.run(
        [sys.executable, "-m", "preprocessing", "--dataset_path", str(tmp_path / "missing.zip"),
         "--output_dir", str(tmp_path / "out2"), "--drop_vocals", "false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "Invalid input 'dataset_path'" in bad.stderr and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
