"""The key and bpm that preparation writes, against the truth of a score: pieces rendered from scores we write
(`bench/key_tempo_set.py`), uploaded at 44.1 kHz as a user's files are, prepared, and scored as `bench/key_tempo.py`
scores the full set (MIREX weighted key score, tempo Acc1/Acc2). Also: the tempo's octave decision on pieces whose
beat is known, the demo's descriptions name the key and tempo preparation finds in its audio, and key/bpm analysis
does not run when nothing would use it."""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bench.key_tempo import CLIP_RATE, load_worker
from bench.key_tempo_set import SOURCE_RATE, compose, make_set, mirex_key_score, render, tempo_acc
from core.params import from_kwargs
from preprocessing import PrepareParams, demo, prepare

# A set of its own (neither the seed the methods were chosen on, 0, nor the benchmark's report set, 1): 12 pieces
# of 20 s, all timbres, 60-150 bpm.
PIECES, SEED, SECONDS = 12, 2, 20.0
PADS = Path("/usr/share/games/singularity/music/lose/March Thee to Dis.ogg")  # Debian's singularity-music


def _params(path: Path, **kw) -> PrepareParams:
    kw.setdefault("drop_vocals", False)
    return from_kwargs(PrepareParams, dataset_path=str(path), **kw)


def _zip(files: dict[str, bytes], dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return dest


def _wav(audio: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, audio, SOURCE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scores_prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scores")
    scores = make_set(PIECES, SEED, SECONDS)
    files = {}
    for s in scores:
        files[f"{s.name}.wav"] = _wav(render(s))
        files[f"{s.name}.txt"] = b"a piece from a score\n"  # described: no tags wanted, key and bpm still measured
    dataset = prepare(_params(_zip(files, tmp / "scores.zip"), auto_labeling=True), tmp / "work")
    labels = {c.source.removesuffix(".wav"): c.info for c in dataset.clips}
    return scores, labels


def test_key_and_tempo_of_pieces_rendered_from_scores(scores_prepared):
    scores, labels = scores_prepared
    assert set(labels) == {s.name for s in scores}
    keys = [mirex_key_score(s.key, labels[s.name]["key"]) for s in scores]
    tempi = [tempo_acc(s.bpm, labels[s.name]["bpm"]) for s in scores]
    table = [(s.name, s.key, labels[s.name]["key"], s.bpm, labels[s.name]["bpm"]) for s in scores]
    mirex, acc1, acc2 = np.mean(keys), np.mean([a[0] for a in tempi]), np.mean([a[1] for a in tempi])
    print(f"MIREX {mirex:.3f}, Acc1 {acc1:.3f}, Acc2 {acc2:.3f}: {table}")
    # The goals of the full benchmark (key MIREX >= 0.95, Acc2 >= 0.95, Acc1 >= 0.85) at the size of this set.
    assert mirex >= 0.95, table
    assert acc2 >= 0.95, table
    assert acc1 >= 0.85, table  # Percival's reading alone: 0.833 here (10 of 12; one slow piece read doubled)


def test_the_tempo_octave_decision_on_pieces_whose_beat_is_known():
    """`beats_are_half_beats` on pieces composed at a known tempo (32 kHz, as the clips): a slow piece's eighth
    notes are half-beats (with drums, and sustained voices without), its quarter notes are not; a fast piece's
    quarter notes are not; a drum kit alone, whose kick and snare alternate on the beats, gives no evidence (its
    chroma is noise and silence, not notes), so Percival's reading would stand."""
    worker = load_worker()
    rng = np.random.default_rng(0)
    for timbre, drums in (("piano", True), ("voice", False), ("strings", False)):
        audio = render(compose(f"slow_{timbre}", 2, "minor", 66.0, timbre, drums, 16.0, rng), CLIP_RATE)
        assert worker.beats_are_half_beats(audio, CLIP_RATE, 132.0), timbre
        assert not worker.beats_are_half_beats(audio, CLIP_RATE, 66.0), timbre
    for timbre, drums in (("marimba", True), ("organ", False)):
        audio = render(compose(f"fast_{timbre}", 7, "major", 140.0, timbre, drums, 16.0, rng), CLIP_RATE)
        assert not worker.beats_are_half_beats(audio, CLIP_RATE, 140.0), timbre
    for bpm in (130.0, 140.0):
        kit = compose(f"kit_{bpm}", 0, "major", bpm, "pluck", True, 16.0, rng)
        kit.notes = []
        assert not worker.beats_are_half_beats(render(kit, CLIP_RATE), CLIP_RATE, bpm), bpm


@pytest.mark.skipif(not PADS.is_file(), reason="Debian's singularity-music is not installed")
def test_the_tempo_octave_stands_on_real_music_whose_pitch_barely_changes():
    """A track of sustained pads (singularity-music's "March Thee to Dis": its chroma changes by 0.003 on average)
    carries no evidence about its beat in its chroma: Percival's 100 bpm is not halved."""
    import essentia.standard as es

    worker = load_worker()
    audio = es.MonoLoader(filename=str(PADS), sampleRate=CLIP_RATE)()[: CLIP_RATE * 60]
    bpm = worker.estimate_bpm(audio, CLIP_RATE)
    assert bpm == pytest.approx(100.0, abs=1.0)


def test_the_demo_describes_the_key_and_tempo_preparation_finds(tmp_path):
    """Every demo description ("..., 88 bpm, E minor") names the key preparation finds in the track, and a tempo
    within 4 % of the one it measures."""
    upload = demo.write_demo(tmp_path / "demo.zip", tracks=8, seconds=16.0)
    dataset = prepare(_params(upload, auto_labeling=True), tmp_path / "work")
    found = {}
    for clip in dataset.clips:
        bpm, key = re.search(r", (\d+) bpm, (\w+ minor)$", clip.description).groups()
        found[clip.source] = (key, clip.info["key"], int(bpm), clip.info["bpm"])
    assert len(found) == 8
    for source, (key, measured_key, bpm, measured_bpm) in found.items():
        assert measured_key == key, found
        assert measured_bpm is not None and abs(measured_bpm - bpm) <= 0.04 * bpm, (source, found)


def test_no_key_or_bpm_analysis_when_nothing_would_use_it(tmp_path, caplog):
    """auto_labeling off and every track described: no essentia worker runs (one log line says so); one track
    without its description, and key and bpm are measured again (they go into its clips' info)."""
    scores = make_set(2, 5, 8.0)
    files = {f"{s.name}.wav": _wav(render(s)) for s in scores}
    described = {**files, **{f"{s.name}.txt": b"a described piece\n" for s in scores}}
    with caplog.at_level(logging.INFO, logger="preprocessing.prepare"):
        dataset = prepare(_params(_zip(described, tmp_path / "a.zip"), auto_labeling=False), tmp_path / "w1")
    skipped = [r for r in caplog.records if r.getMessage().startswith("Key/bpm analysis skipped")]
    assert len(skipped) == 1
    assert {c.info["key"] for c in dataset.clips} == {None} and {c.info["bpm"] for c in dataset.clips} == {None}
    assert {c.description for c in dataset.clips} == {"a described piece"}

    caplog.clear()
    one_missing = {k: v for k, v in described.items() if k != f"{scores[1].name}.txt"}
    with caplog.at_level(logging.INFO, logger="preprocessing.prepare"):
        dataset = prepare(_params(_zip(one_missing, tmp_path / "b.zip"), auto_labeling=False), tmp_path / "w2")
    assert not [r for r in caplog.records if r.getMessage().startswith("Key/bpm analysis skipped")]
    assert all(c.info["key"] and c.info["bpm"] for c in dataset.clips)


def test_the_scores_the_benchmark_gives():
    """MIREX's weights and the tempo accuracies on cases worked out by hand."""
    cases = {
        ("C major", "C major"): 1.0,
        ("C major", "G major"): 0.5,  # a fifth up
        ("C major", "F major"): 0.5,  # a fifth down
        ("A minor", "E minor"): 0.5,
        ("C major", "A minor"): 0.3,  # relative
        ("A minor", "C major"): 0.3,
        ("F# minor", "A major"): 0.3,
        ("C major", "C minor"): 0.2,  # parallel
        ("C major", "G minor"): 0.0,
        ("C major", "D major"): 0.0,
        ("C major", None): 0.0,
        ("Eb major", "D# major"): 1.0,  # enharmonic spelling
    }
    for (truth, estimate), weight in cases.items():
        assert mirex_key_score(truth, estimate) == weight, (truth, estimate)
    assert tempo_acc(100, 103.9) == (True, True) and tempo_acc(100, 96.1) == (True, True)
    assert tempo_acc(100, 104.5) == (False, False)
    assert tempo_acc(100, 201) == (False, True) and tempo_acc(100, 49.5) == (False, True)
    assert tempo_acc(100, 300) == (False, True) and tempo_acc(100, 33.4) == (False, True)
    assert tempo_acc(100, 150) == (False, False) and tempo_acc(100, None) == (False, False)
