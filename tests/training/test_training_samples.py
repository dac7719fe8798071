"""Samples during training (training/evaluate.py `TrainingSamples`) for melody, style and FSDP runs: each prompt
conditioned as predict would condition it, the training's conditioner set-up back as it was, the trained weights
bitwise the same with and without samples, and under FSDP every rank taking part in gathering the LM for rank 0."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile

import pytest
import torch

from core.versions import load_musicgen
from preprocessing import load_prepared
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training import evaluate
from training.melody import melody_conditioners
from training.run import run_training
from training.style import prepare_style_training

# Six one-clip tracks, held out by half: 3 validation clips, each with its own description.
SIX = [{"seconds": 2.0 + 0.2 * i, "freq": 200.0 + 90 * i, "description": f"tone {i}"} for i in range(6)]


@pytest.fixture(scope="module")
def six_tracks(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("six") / "prepared", SIX)


def _held_out(dataset, n: int = 2) -> list:
    return load_prepared(dataset).clips[:n]


# ------------------------------------------------------------------------------------------------ melody and style


def test_melody_samples_take_their_clips_melody_and_give_the_cached_chroma_back(six_tracks):
    """Each prompt's melody is the audio of the held-out clip it describes (another clip's melody: other audio); the
    chroma conditioner leaves generation with the training's cache and masking as they were."""
    model = load_musicgen("tiny-melody", "cpu").musicgen
    held = _held_out(six_tracks)
    prompts = evaluate.audio_prompts(held, 2)
    conditions = evaluate.sample_conditions(model, held, prompts)
    assert conditions.kind == "melody" and conditions.clips == [c.path.name for c in held]
    assert conditions.audio[0].shape == (model.audio_channels, int(held[0].duration * model.sample_rate))
    cond = next(iter(melody_conditioners(model.lm).values()))
    cache = object()  # what `prepare_melody_training` installs: the training reads its chroma from it
    cond.cache, cond.match_len_on_eval, cond._use_masking = cache, False, True
    samples = evaluate.TrainingSamples(model, prompts, 0.5, seed=1, sampler_precision="auto", conditions=conditions)
    first = samples.sample(0, 0.0)  # demucs on each melody: ~5 s a call on this CPU
    assert cond.cache is cache and cond.match_len_on_eval is False and cond._use_masking is True
    swapped = dataclasses.replace(conditions, audio=conditions.audio[::-1])
    other = evaluate.TrainingSamples(model, prompts, 0.5, seed=1, sampler_precision="auto", conditions=swapped)
    changed = other.sample(0, 0.0)
    assert samples.audio[first["files"][0]] != other.audio[changed["files"][0]]  # the melody is heard
    assert samples.summary()["conditions"] == {"kind": "melody", "clips": conditions.clips}


def test_style_samples_take_an_excerpt_of_their_clip_and_give_the_conditioner_back(six_tracks):
    """Style models: the held-out clip's audio as the style audio, an excerpt of predict's default length (the
    whole clip when shorter); the frozen style conditioner is back in its training mode and settings afterwards."""
    model = load_musicgen("tiny-style", "cpu").musicgen
    (cond,) = prepare_style_training(model.lm, seed=0).values()
    held = _held_out(six_tracks)
    prompts = evaluate.audio_prompts(held, 2)
    conditions = evaluate.sample_conditions(model, held, prompts)
    assert conditions.kind == "style" and conditions.clips == [c.path.name for c in held]
    assert conditions.excerpt_s == min(evaluate.STYLE_EXCERPT_S, held[0].duration)  # clip 0 is the shortest
    model.lm.train()
    cond.last_excerpt = (5, 7)  # the last training batch's excerpt, read by its loss mask
    before = (cond.training, cond.length_subwav, cond.eval_q, cond.last_excerpt)
    samples = evaluate.TrainingSamples(model, prompts, 0.5, seed=1, sampler_precision="auto", conditions=conditions)
    first = samples.sample(0, 0.0)
    assert (cond.training, cond.length_subwav, cond.eval_q, cond.last_excerpt) == before
    # (the tiny model's random style bottleneck gives these two tones the same codes: compared with no style)
    text_only = evaluate.TrainingSamples(model, prompts, 0.5, seed=1, sampler_precision="auto")
    changed = text_only.sample(0, 0.0)
    assert samples.audio[first["files"][0]] != text_only.audio[changed["files"][0]]  # the style audio is heard


def _weights(out) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))["model"]


def _during(out) -> dict:
    return json.loads((out / "metrics.json").read_text())["validation"]["samples_during_training"]


# tiny-melody: its demucs runs on every clip for the chroma cache and on both melodies at each evaluation (~5 s a
# call on a 2-core CPU): two runs take a minute or more
@pytest.mark.parametrize("version", [pytest.param("tiny-melody", marks=pytest.mark.slow), "tiny-style"])
def test_samples_during_training_do_not_change_the_training(version, six_tracks, tmp_path, monkeypatch):
    """A melody / style run samples at every evaluation (the bound lifted) into its timeline, the first one before
    any step; the same run without samples trains to bitwise the same weights and losses."""
    params = tiny_params(
        six_tracks, model_version=version, epochs=1, updates_per_epoch=3, eval_every=2, save_every=3,
        validation_split=0.5, optimizer="adamw", lr=3e-3, segment_duration=2.0,
    )  # fmt: skip
    monkeypatch.setattr(evaluate, "TIMELINE_SHARE", 1000.0)
    tar = run_training(params, tmp_path / "on")
    during = _during(tmp_path / "on")
    assert [e["step"] for e in during["entries"]] == [0, 2, 3] and all(len(e["files"]) == 2 for e in during["entries"])
    kind = "melody" if version == "tiny-melody" else "style"
    assert during["conditions"]["kind"] == kind
    assert during["conditions"]["clips"] == ["track03_000.wav", "track04_000.wav"]  # the clips of 'tone 3', 'tone 4'
    assert [f"tone {i}" for i in (3, 4)] == during["prompts"]
    page = (tmp_path / "on" / "report.html").read_text()  # the timeline's columns say whose melody / style
    assert all(f"<th>tone {i} ({kind} of track0{i}_000.wav)</th>" in page for i in (3, 4))
    with tarfile.open(tar) as archive:
        assert {f for e in during["entries"] for f in e["files"]} <= set(archive.getnames())
    monkeypatch.setattr(evaluate, "training_samples", lambda *a, **k: None)  # samples off, nothing else
    shutil.copytree(tmp_path / "on" / "cache", tmp_path / "off" / "cache")  # the codes and chroma, computed once
    run_training(params, tmp_path / "off")
    assert "samples_during_training" not in json.loads((tmp_path / "off" / "metrics.json").read_text())["validation"]
    on, off = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    assert on.keys() == off.keys()
    for k, v in on.items():
        assert torch.equal(v, off[k]), k
    on, off = (ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / s / "checkpoints")) for s in ("on", "off"))
    assert [h["loss"] for h in on["history"]] == [h["loss"] for h in off["history"]]


# ------------------------------------------------------------------------------------------------------------ FSDP


@pytest.mark.slow
def test_fsdp_runs_sample_during_training(six_tracks, tmp_path, capfd):
    """FSDP over 2 gloo processes: the base model's samples (step 0, always made) are generated from the LM gathered
    from both ranks' pieces, into the timeline of metrics.json and the tar, and sound exactly as one process's; the
    later evaluations are made or skipped by the time bound, every rank in step; the trained weights are bitwise
    those of the same FSDP run without samples."""
    params = tiny_params(
        six_tracks, epochs=1, updates_per_epoch=4, eval_every=2, save_every=4, validation_split=0.5,
        optimizer="adamw", lr=3e-3, parallel="fsdp",
    )  # fmt: skip
    sharded = run_training(params, tmp_path / "fsdp", nproc=2)
    log = capfd.readouterr().err
    assert "FSDP" in log and "All 2 ranks hold identical weights" in log, log[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1): the same float sums, the same samples
    try:
        single = run_training(dataclasses.replace(params, parallel="auto"), tmp_path / "single", nproc=1)
    finally:
        torch.set_num_threads(threads)
    during = _during(tmp_path / "fsdp")
    assert [e["step"] for e in during["entries"]] == [0, 2, 4]
    assert all(e.get("files") or "over the bound" in e["skipped"] for e in during["entries"])
    # the last evaluation's samples are made whatever the bound, by both strategies (the loop marks it final)
    assert during["entries"][-1]["files"] and _during(tmp_path / "single")["entries"][-1]["files"]
    first = during["entries"][0]["files"]
    assert len(first) == 2 and first == _during(tmp_path / "single")["entries"][0]["files"]
    with tarfile.open(sharded) as a, tarfile.open(single) as b:
        for name in first:
            assert a.extractfile(name).read() == b.extractfile(name).read(), name
    # without samples (nor the audio check before training, which sample_duration also turns off): the same weights
    run_training(dataclasses.replace(params, sample_duration=0.0), tmp_path / "quiet", nproc=2)
    with_samples, without = _weights(tmp_path / "fsdp"), _weights(tmp_path / "quiet")
    for k, v in with_samples.items():
        assert torch.equal(v, without[k]), k
