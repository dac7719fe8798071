"""Validation (training/evaluate.py): the split by track, the validation loss, best weights, early stop, resume,
the report, and DDP evaluation against one process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import random
import tarfile
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.params import InputError
from core.versions import load_musicgen
from evaluation.frechet import fmt_distance
from preprocessing import load_prepared
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training import fsdp as fsdp_mod
from training.dist import DistInfo
from training.evaluate import MIN_TRACKS, EvalContext, split_by_track, track_of
from training.loop import TrainStep, train_loop
from training.run import check_inputs, run_training, setup_training

# Six one-clip tracks: with the default validation_split (0.1) one track is held out.
SIX = [{"seconds": 2.2 + 0.3 * i, "freq": 200.0 + 60 * i, "description": f"tone {i}"} for i in range(6)]


def _clips(tracks: int, per_track: int) -> list:
    return [
        SimpleNamespace(path=f"/data/t{t:02d}_{c:03d}.wav", source=f"t{t:02d}.mp3", duration=30.0, info={})
        for t in range(tracks)
        for c in range(per_track)
    ]


def _tar_json(tar, name: str) -> dict:
    with tarfile.open(tar) as archive:
        return json.load(archive.extractfile(name))


def _tar_weights(tar) -> dict[str, torch.Tensor]:
    with tarfile.open(tar) as archive:
        data = archive.extractfile("state_dict.bin").read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["best_state"]


# ------------------------------------------------------------------------------------------------ the split


def test_the_split_holds_out_whole_tracks_from_the_seed():
    clips = _clips(20, 3)
    split = split_by_track(clips, 0.1, seed=42)
    held = set(split.info["validation_tracks"])
    assert len(held) == 2 and split.info["mode"] == "split"
    # every clip of a track on one side: no neighbouring clip of a held-out track is trained on
    assert {track_of(c) for c in split.validation} == held
    assert not held & {track_of(c) for c in split.train}
    assert len(split.validation) == 6 and len(split.train) == 54
    # deterministic: the same seed picks the same tracks whatever the clip order; other seeds pick others
    again = split_by_track(list(reversed(clips)), 0.1, seed=42)
    assert again.info["validation_tracks"] == split.info["validation_tracks"]
    picks = {tuple(split_by_track(clips, 0.1, seed=s).info["validation_tracks"]) for s in range(8)}
    assert len(picks) > 1


def test_the_split_needs_enough_tracks_and_says_so(caplog):
    assert len(split_by_track(_clips(MIN_TRACKS, 2), 0.1, seed=0).info["validation_tracks"]) == 1  # at least one
    assert len(split_by_track(_clips(MIN_TRACKS, 2), 0.9, seed=0).info["validation_tracks"]) == MIN_TRACKS - 1
    with caplog.at_level(logging.INFO):
        few = split_by_track(_clips(MIN_TRACKS - 1, 2), 0.1, seed=0)
        off = split_by_track(_clips(10, 1), 0.0, seed=0)
    assert few.validation == [] and len(few.train) == 2 * (MIN_TRACKS - 1) and few.info["mode"] == "off"
    assert f"Validation off: {MIN_TRACKS - 1} track(s)" in caplog.text and "validation_path" in caplog.text
    assert off.validation == [] and "Validation off (validation_split=0)" in caplog.text


def test_validation_path_cannot_be_the_training_data(tmp_path):
    dataset = make_prepared(tmp_path / "prepared", SIX[:2])
    with pytest.raises(InputError, match="validation_path"):
        check_inputs(tiny_params(dataset, validation_path=str(dataset)))


# ------------------------------------------------------------------------------------------------ the loss


def _context(lm, step: TrainStep) -> EvalContext:
    trainable = [p for p in lm.parameters() if p.requires_grad]
    return EvalContext(
        forward=lambda codes, mask, attributes: step(codes, mask, attributes, None, True),
        modules=step,
        dist=DistInfo(),
        device="cpu",
        micro_batch=1,
        autocast=contextlib.nullcontext(),
        weights=trainable,
        exported=trainable,
        params=trainable,
        sharded=False,
        gather=lambda piece, p: piece,
        shard_of=fsdp_mod.shard_of,
    )


def test_the_validation_loss_is_the_training_loss_without_condition_dropout(tmp_path):
    specs = [{"seconds": 2.0, "freq": 200.0 + 60 * i, "description": f"tone {i}"} for i in range(6)]
    dataset = make_prepared(tmp_path / "prepared", specs)
    params = tiny_params(dataset, validation_split=0.5, segment_duration=1.0, cfg_p=1.0)
    setup = setup_training(params, load_prepared(dataset), tmp_path / "work", DistInfo())
    evaluator, lm = setup.evaluator, setup.model.lm
    assert len(evaluator.tokens) == 3 and len(evaluator.crops) == 6  # 3 clips of 2 s, tiled by 1 s crops
    assert {c.path for c in evaluator.tokens.clips}.isdisjoint(c.path for c in setup.clips)
    step = TrainStep(lm)
    lm.train()
    lm.cfg_dropout.p = 1.0  # training would drop every condition: the evaluation must not
    torch.manual_seed(0)
    rng_before, python_before = torch.get_rng_state(), random.getstate()
    metrics = evaluator.evaluate(0, _context(lm, step))
    # training sees no trace of the evaluation
    assert torch.equal(torch.get_rng_state(), rng_before) and random.getstate() == python_before
    assert lm.training and step.training and lm.cfg_dropout.p == 1.0
    # the training loss of every crop as one batch, with the conditions (p=0) and with none (p=1)
    batch = evaluator.tokens.make_batch(evaluator.crops)
    with torch.no_grad():
        lm.cfg_dropout.p = 0.0
        conditional = float(step(batch.codes, batch.mask, batch.attributes))
        lm.cfg_dropout.p = 1.0
        unconditional = float(step(batch.codes, batch.mask, batch.attributes))
    assert metrics["val_loss"] == pytest.approx(conditional, rel=1e-5)
    assert metrics["val_loss_uncond"] == pytest.approx(unconditional, rel=1e-5)
    assert metrics["val_loss"] != pytest.approx(metrics["val_loss_uncond"], rel=1e-4)  # the conditions matter
    per_codebook = [metrics[f"val_loss_q{k}"] for k in range(4)]
    assert np.mean(per_codebook) == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert 0 < metrics["val_tokens"] <= float(batch.mask.sum())  # the positions valid in the pattern and the mask


def test_musicgen_style_is_evaluated_with_its_own_audio_as_style(tmp_path):
    """The style conditioner keeps its training behaviour (the example's own audio as style: eval mode would read
    the silent placeholder) and its random excerpts are the same at every evaluation."""
    dataset = make_prepared(tmp_path / "prepared", SIX)
    params = tiny_params(dataset, model_version="tiny-style", validation_split=0.5)
    setup = setup_training(params, load_prepared(dataset), tmp_path / "work", DistInfo())
    lm = setup.model.lm
    lm.train()
    step = TrainStep(lm)
    first = setup.evaluator.evaluate(0, _context(lm, step))
    second = setup.evaluator.evaluate(0, _context(lm, step))
    assert first["val_loss"] == second["val_loss"] and np.isfinite(first["val_loss"])
    from training.style import style_conditioners

    conditioner = next(iter(style_conditioners(lm).values()))
    source, calls = conditioner.audio_source, []
    conditioner.audio_source = lambda x: calls.append(1) or source(x)  # the clip audio is read for the style
    setup.evaluator.evaluate(0, _context(lm, step))
    assert calls and conditioner.training  # and its mode is back as it was


# ------------------------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def six_tracks(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("six") / "prepared", SIX)


@pytest.fixture(scope="module")
def validated_run(six_tracks, tmp_path_factory):
    """A default-split run: 2 epochs x 6 steps, evaluations once per epoch (eval_every 0), checkpoints every 6;
    the stand-in discogs-effnet graph present (a second Fréchet distance, computed in essentia's worker)."""
    from preprocessing.analysis import ENV_MODELS
    from tests.preprocessing import fake_essentia

    out = tmp_path_factory.mktemp("validated")
    params = tiny_params(six_tracks, epochs=2, updates_per_epoch=6, save_every=6, optimizer="adamw", lr=3e-3)
    logs = _Lines()  # the evaluation's log lines (a module fixture cannot use caplog)
    evaluate_logger = logging.getLogger("training.evaluate")
    level = evaluate_logger.level
    evaluate_logger.addHandler(logs)
    evaluate_logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(ENV_MODELS, str(fake_essentia.write_models(tmp_path_factory.mktemp("essentia"))))
            tar = run_training(params, out)
    finally:
        evaluate_logger.removeHandler(logs)
        evaluate_logger.setLevel(level)
    return {"params": params, "out": out, "tar": tar, "logs": logs.lines}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_run_reports_its_validation(validated_run):
    info = _tar_json(validated_run["tar"], "finetune.json")
    validation = info["validation"]
    split = validation["split"]
    assert split["mode"] == "split" and split["tracks"] == 6 and len(split["validation_tracks"]) == 1
    assert split["training_clips"] == 5 and split["validation_clips"] == 1 and info["training"]["clips"] == 5
    assert [e["step"] for e in validation["evaluations"]] == [0, 6, 12]  # the base model, each epoch's end
    for e in validation["evaluations"]:
        assert {"val_loss", "val_loss_uncond", "val_loss_q0", "val_loss_uncond_q3", "val_tokens"} <= set(e)
    assert validation["base_loss"] == validation["evaluations"][0]["val_loss"]
    assert validation["final_loss"] < validation["base_loss"] - 1.0  # the tones are easy to learn
    assert validation["exported_step"] == validation["best_step"] == info["training"]["exported_step"] == 12
    metrics = json.loads((validated_run["out"] / "metrics.json").read_text())
    assert metrics == _tar_json(validated_run["tar"], "metrics.json")
    assert metrics["exported_step"] == 12 and len(metrics["training"]) == 12
    assert metrics["validation"]["evaluations"] == validation["evaluations"]
    # the checkpoint keeps the evaluation history
    state = ckpt.load_checkpoint(ckpt.find_checkpoint(validated_run["out"] / "checkpoints"))
    assert [e["step"] for e in state["evaluation"]["history"]] == [0, 6, 12]
    assert state["evaluation"]["best_is_current"] and state["evaluation"]["best"] is None  # no second copy


def test_the_report_page_is_self_contained(validated_run):
    import base64
    from html.parser import HTMLParser

    with tarfile.open(validated_run["tar"]) as archive:
        page = archive.extractfile("report.html").read()
    assert page == (validated_run["out"] / "report.html").read_bytes()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.sources, self.rows, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "src" in attrs or "href" in attrs:
                self.sources.append((tag, attrs.get("src") or attrs.get("href")))
            if tag == "tr" and attrs.get("class") == "exported":
                self.rows.append(tag)
            if tag == "svg":
                self.rows.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    parsed = Collect()
    parsed.feed(page.decode())
    text = " ".join(parsed.text)
    assert all(src.startswith("data:") for _, src in parsed.sources)  # nothing to fetch: opens offline, anywhere
    kinds = [(tag, src.split(";")[0]) for tag, src in parsed.sources]
    during = json.loads((validated_run["out"] / "metrics.json").read_text())["validation"]["samples_during_training"]
    timeline = [f for e in during["entries"] for f in e.get("files") or []]  # as many as the time bound allowed
    assert len(timeline) >= 2 and during["entries"][0]["step"] == 0  # the base model's are always made
    # 2 samples, a training clip; the samples during training (MP3); 2 x (base, fine-tuned)
    assert (
        kinds
        == [("audio", "data:audio/wav")] * 3
        + [("audio", "data:audio/mpeg")] * len(timeline)
        + [("audio", "data:audio/wav")] * 4
    )
    for _, src in parsed.sources:
        data = base64.b64decode(src.split(",", 1)[1])
        assert data.startswith(b"RIFF" if src.startswith("data:audio/wav") else (b"ID3", b"\xff\xfb", b"\xff\xf3"))
    assert parsed.rows.count("svg") == 1 and "validation loss" in text  # the curves, inline (legend text)
    validation = _tar_json(validated_run["tar"], "finetune.json")["validation"]
    assert f"from {validation['base_loss']:.3f} (base model)" in text and "at step 12" in text
    assert parsed.rows.count("tr") == 1  # the exported evaluation, highlighted
    assert "held-out tracks" in text and validation["split"]["validation_tracks"][0] in text
    assert "training clip (track" in text and "tone " in text  # a training clip to compare the samples with
    # base vs fine-tuned on held-out prompts: the Fréchet distances and the copy check
    audio = validation["audio"]
    held = int(validation["split"]["validation_tracks"][0][len("track") :][:2])  # trackNN.wav: its description
    assert audio["prompts"] == [f"tone {held}"] * 2
    assert audio["frechet_base"] >= 0 and audio["frechet_finetuned"] >= 0
    assert audio["frechet_base"] != audio["frechet_finetuned"]
    assert len(audio["copy_check"]["samples"]) == 2 and audio["copy_check"]["reference"] > 0
    assert f"{audio['frechet_finetuned']:.3f}" in text and "Base vs fine-tuned, on held-out prompts" in text
    # the second Fréchet row, in discogs-effnet space (the stand-in graph's 1280-d embeddings)
    effnet = audio["effnet"]
    assert "skipped" not in effnet, effnet
    assert effnet["vectors"]["base"] == effnet["vectors"]["finetuned"] == 2  # a 0.5 s sample fills one patch
    assert effnet["frechet_base"] > 0 and effnet["frechet_finetuned"] > 0
    assert "discogs-effnet (essentia)" in text and f"{effnet['frechet_finetuned']:.3f}" in text
    # the log says the same distances as the report, with their significant digits (these are about 0.003)
    check = next(line for line in validated_run["logs"] if line.startswith("Audio check on the held-out prompts"))
    assert f"{fmt_distance(audio['frechet_base'])} (base) -> {fmt_distance(audio['frechet_finetuned'])}" in check
    check = next(line for line in validated_run["logs"] if line.startswith("Audio check in discogs-effnet space"))
    assert f"{fmt_distance(effnet['frechet_base'])} (base) -> {fmt_distance(effnet['frechet_finetuned'])}" in check
    assert "Base vs fine-tuned" in text and "not measured (forgetting_check" in text  # auto is off on CPU
    metrics = json.loads((validated_run["out"] / "metrics.json").read_text())
    assert metrics["validation"]["audio"]["effnet"] == effnet  # metrics.json has the whole table too


class _Page(HTMLParser):
    """report.html as data: its tables (rows of cell texts), the verdict, and the chart's points."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.verdict = ""
        self.line: list[tuple[float, float]] = []
        self.dots: list[tuple[float, float]] = []
        self._cell: list[str] | None = None
        self._in_verdict = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p" and "verdict" in (attrs.get("class") or ""):
            self._in_verdict = True
        elif tag == "polyline":
            self.line = [tuple(map(float, xy.split(","))) for xy in attrs["points"].split()]
        elif tag == "circle":
            self.dots.append((float(attrs["cx"]), float(attrs["cy"])))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "p":
            self._in_verdict = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_verdict:
            self.verdict += data

    def table(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0] and t[0][0] == first_header)


def test_the_reports_numbers_are_the_metrics(validated_run):
    """Every number report.html shows (verdict, base vs fine-tuned, evaluations, the curve, the run) is the one
    metrics.json and finetune.json hold: a person reading the page reads the run."""
    metrics = json.loads((validated_run["out"] / "metrics.json").read_text())
    training = _tar_json(validated_run["tar"], "finetune.json")["training"]
    page = _Page((validated_run["out"] / "report.html").read_text())
    validation, history = metrics["validation"], metrics["training"]
    evaluations = validation["evaluations"]

    base, best, step = validation["base_loss"], validation["best_loss"], metrics["exported_step"]
    assert evaluations[0]["step"] == 0 and base == evaluations[0]["val_loss"]
    assert best == min(e["val_loss"] for e in evaluations) and step == 12
    assert f"from {base:.3f} (base model) to {best:.3f} at step {step}, {100 * (base - best) / base:.1f} % lower" in (
        page.verdict
    ), page.verdict

    def four(value):
        return f"{value:.4f}"

    by_step = {e["step"]: e for e in evaluations}
    rows = {row[0]: row[1:] for row in page.table("")[1:]}  # base vs fine-tuned: base, exported, last, flag
    for name, key in (("validation loss", "val_loss"), ("validation loss, unconditional", "val_loss_uncond")):
        assert rows[name][:3] == [four(by_step[0][key]), four(by_step[step][key]), four(evaluations[-1][key])]

    table = page.table("step")
    codebooks = [h for h in table[0] if h.startswith("val_loss_q")]
    assert codebooks == ["val_loss_q0", "val_loss_q1", "val_loss_q2", "val_loss_q3"]  # tiny: 4 codebooks
    assert [row[0] for row in table[1:]] == [str(e["step"]) for e in evaluations]
    for row, e in zip(table[1:], evaluations, strict=True):
        assert row[1:] == [four(e[k]) for k in ("val_loss", "val_loss_uncond", *codebooks)], row

    # the curve: a point per step and a dot per evaluation, all placed by one affine map of step and loss (the
    # page rounds coordinates to 0.1)
    assert len(page.line) == len(history) and len(page.dots) == len(evaluations)
    (x0, y0), (x1, y1) = page.line[0], page.line[-1]
    (s0, l0), (s1, l1) = (history[0]["step"], history[0]["loss"]), (history[-1]["step"], history[-1]["loss"])
    for (x, y), h in zip(page.line, history, strict=True):
        assert x == pytest.approx(x0 + (x1 - x0) * (h["step"] - s0) / (s1 - s0), abs=0.15)
        assert y == pytest.approx(y0 + (y1 - y0) * (h["loss"] - l0) / (l1 - l0), abs=0.15)
    for (x, y), e in zip(page.dots, evaluations, strict=True):
        assert x == pytest.approx(x0 + (x1 - x0) * (e["step"] - s0) / (s1 - s0), abs=0.15)
        assert y == pytest.approx(y0 + (y1 - y0) * (e["val_loss"] - l0) / (l1 - l0), abs=0.15)

    run = dict(page.table("steps"))  # the Run table: finetune.json's training summary
    assert run["steps"] == str(len(history)) == str(training["steps"])
    assert run["first_loss"] == str(training["first_loss"]) == str(history[0]["loss"])
    assert run["final_loss"] == str(training["final_loss"]) == str(history[-1]["loss"])
    assert run["exported_step"] == str(step) and run["clips"] == "5"


def test_the_evaluations_go_to_wandb(six_tracks, tmp_path, monkeypatch):
    import wandb

    from tests.training.test_publish import WANDB_KEY, _wandb_history_and_config, _wandb_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    wandb.teardown()  # wandb reads its environment once per process
    try:
        params = tiny_params(
            six_tracks, epochs=1, updates_per_epoch=4, eval_every=2, save_every=0, sample_duration=0.0,
            wandb_api_key=WANDB_KEY,
        )  # fmt: skip
        run_training(params, tmp_path / "out")
    finally:
        wandb.teardown()
    history, _ = _wandb_history_and_config(tmp_path / "out")
    evaluations = [h for h in history if "val_loss" in h]
    assert [h["step"] for h in evaluations] == [0, 2, 4]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["validation"]["evaluations"]
    for logged, saved in zip(evaluations, metrics, strict=True):
        for key in ("val_loss", "val_loss_uncond", "val_loss_q0", "val_loss_uncond_q3"):
            assert logged[key] == pytest.approx(saved[key], rel=1e-9), key
    # the run's summary: the report's headline, so wandb's run list shows which fine-tunes worked
    validation = json.loads((tmp_path / "out" / "metrics.json").read_text())["validation"]
    summary = _wandb_summary(tmp_path / "out")
    assert summary["exported_step"] == validation["exported_step"]
    assert summary["val_loss_base"] == pytest.approx(validation["base_loss"], rel=1e-9)
    assert summary["val_loss_best"] == pytest.approx(validation["best_loss"], rel=1e-9)
    assert summary["flags"] == (", ".join(validation["flags"]) or "none")


def test_forgetting_is_measured_on_prior_preservations_other_genres(six_tracks, tmp_path):
    params = tiny_params(
        six_tracks, prior_preservation=True, class_samples=0, dissimilar_samples=1, epochs=1, updates_per_epoch=4,
        eval_every=2, save_every=0, sample_duration=0.0,
    )  # fmt: skip
    tar = run_training(params, tmp_path / "out")
    validation = _tar_json(tar, "finetune.json")["validation"]
    assert validation["forgetting"]["clips"] == 5  # one example of another genre per training track
    assert validation["forgetting"]["source"] == "prior_preservation"  # auto: on, nothing more to generate
    losses = [e["forget_loss"] for e in validation["evaluations"]]
    assert len(losses) == 3 and all(np.isfinite(losses)) and validation["forgetting"]["base_loss"] == losses[0]
    assert "forgetting" in (tmp_path / "out" / "report.html").read_text()


def test_evaluation_does_not_change_the_training(validated_run, six_tracks, tmp_path):
    """The same training clips without validation (validation_path elsewhere, the same 5 tracks): same losses and
    weights: the evaluation takes nothing from the training's random streams or modes."""
    split = _tar_json(validated_run["tar"], "finetune.json")["validation"]["split"]
    lines = (six_tracks / "data.jsonl").read_text().splitlines()
    sources = [track_of(c) for c in load_prepared(six_tracks).clips]
    train_only = tmp_path / "train"  # the same clip files, the held-out track's line left out of the manifest
    train_only.mkdir()
    kept = [line for line, source in zip(lines, sources, strict=True) if source not in split["validation_tracks"]]
    (train_only / "data.jsonl").write_text("\n".join(kept) + "\n")
    params = dataclasses.replace(validated_run["params"], dataset_path=str(train_only), validation_split=0.0)
    run_training(params, tmp_path / "plain")
    plain = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "plain" / "checkpoints"))
    validated = ckpt.load_checkpoint(ckpt.find_checkpoint(validated_run["out"] / "checkpoints"))
    assert plain["evaluation"] is None
    assert [h["loss"] for h in plain["history"]] == pytest.approx([h["loss"] for h in validated["history"]], abs=1e-6)
    for k, v in validated["model"].items():
        torch.testing.assert_close(plain["model"][k], v, atol=1e-6, rtol=1e-5)


def test_validation_path_validates_on_other_tracks(tmp_path):
    """An archive of other tracks: prepared like dataset_path (into work-validation/), every training track trains
    (even with 5+ of them), the split says where the validation came from."""
    import zipfile

    import soundfile as sf

    from tests.helpers import tone

    train = make_prepared(tmp_path / "train", SIX)
    upload = tmp_path / "held_out.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for i, freq in enumerate((250.0, 410.0)):
            buffer = io.BytesIO()
            sf.write(buffer, tone(6.0, 32000, 1, freq=freq, seed=10 + i), 32000, format="WAV", subtype="PCM_16")
            archive.writestr(f"other{i}.wav", buffer.getvalue())
            archive.writestr(f"other{i}.txt", f"other tone {i}")
    params = tiny_params(train, validation_path=str(upload), epochs=1, updates_per_epoch=4, save_every=0)
    info = _tar_json(run_training(params, tmp_path / "out"), "finetune.json")
    split = info["validation"]["split"]
    assert split["mode"] == "path" and split["validation_path"] == "held_out.zip"
    assert split["validation_tracks"] == ["other0.wav", "other1.wav"] and split["validation_clips"] == 2
    assert info["training"]["clips"] == 6  # no track of dataset_path held out
    assert (tmp_path / "out" / "work-validation" / "dataset" / "data.jsonl").is_file()
    assert [e["step"] for e in info["validation"]["evaluations"]] == [0, 4]
    with pytest.raises(InputError, match="validation_path"):  # a bad upload names the validation input
        run_training(dataclasses.replace(params, validation_path=str(tmp_path / "missing.zip")), tmp_path / "bad")


def _absurd(dataset, **overrides):
    """adamw at lr 0.09 (just under the refused 0.1) with a warmup: the first small steps help, then it wrecks the
    model."""
    values = {"epochs": 1, "updates_per_epoch": 12, "optimizer": "adamw", "lr": 0.09, "warmup": 4, "eval_every": 3}
    values.update(overrides)
    return tiny_params(dataset, **values)


def test_the_best_evaluation_is_exported_and_early_stop(six_tracks, tmp_path):
    params = _absurd(six_tracks, save_every=0, sample_duration=0.0)
    setup = setup_training(params, load_prepared(six_tracks), tmp_path / "work", DistInfo())
    lm = setup.model.lm
    at_evaluation = {}

    def remember(metrics):  # the weights each evaluation saw
        if "val_loss" in metrics:
            at_evaluation[metrics["step"]] = {k: v.detach().clone() for k, v in lm.state_dict().items()}

    result = train_loop(
        lm,
        setup.tokens,
        params,
        setup.plan,
        DistInfo(),
        tmp_path / "ck",
        on_metrics=remember,
        evaluator=setup.evaluator,
    )
    summary = result.evaluation
    losses = {e["step"]: e["val_loss"] for e in summary["evaluations"]}
    assert sorted(at_evaluation) == sorted(losses) == [0, 3, 6, 9, 12]
    best = min(losses, key=losses.get)
    assert summary["best_step"] == summary["exported_step"] == best < 12
    assert losses[12] > 2 * losses[best]  # the validation loss rose (the tones' codes are few: it stays small)
    for k, v in at_evaluation[best].items():
        assert torch.equal(result.state_dict[k], v), k
    assert not all(torch.equal(at_evaluation[12][k], v) for k, v in at_evaluation[best].items())

    # early_stop_patience=1: the run stops at the first evaluation that does not improve
    first_worse = next(s for s in sorted(losses) if s > best)
    stopped = dataclasses.replace(params, early_stop_patience=1)
    setup = setup_training(stopped, load_prepared(six_tracks), tmp_path / "work", DistInfo())
    lm = setup.model.lm
    result = train_loop(lm, setup.tokens, stopped, setup.plan, DistInfo(), tmp_path / "ck2", evaluator=setup.evaluator)
    assert result.steps == len(result.history) == first_worse < 12
    assert result.evaluation["stopped_early_at"] == first_worse and result.evaluation["exported_step"] == best
    for k, v in at_evaluation[best].items():
        assert torch.equal(result.state_dict[k], v), k


def test_a_finished_runs_checkpoint_keeps_the_evaluations(six_tracks, tmp_path):
    """The checkpoint kept when an export fails (training.loop.finished_state: the exported weights, no optimizer)
    resumes to the same evaluations, exported step and weights."""
    from training.loop import finished_state

    params = _absurd(six_tracks, save_every=0, sample_duration=0.0)
    setup = setup_training(params, load_prepared(six_tracks), tmp_path / "work", DistInfo())
    lm = setup.model.lm
    result = train_loop(lm, setup.tokens, params, setup.plan, DistInfo(), tmp_path / "ck", evaluator=setup.evaluator)
    kept = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path / "kept", result.steps, finished_state(result, params)))
    again = setup_training(params, load_prepared(six_tracks), tmp_path / "work", DistInfo())
    resumed = train_loop(
        again.model.lm, again.tokens, params, again.plan, DistInfo(), tmp_path / "ck2", resume_state=kept,
        evaluator=again.evaluator,
    )  # fmt: skip
    assert resumed.evaluation["exported_step"] == result.evaluation["exported_step"] < 12
    assert resumed.evaluation["evaluations"] == result.evaluation["evaluations"]
    for k, v in result.state_dict.items():
        assert torch.equal(resumed.state_dict[k], v), k


def test_lora_keeps_only_the_adapters_of_the_best_evaluation(six_tracks, tmp_path):
    # alpha/rank 32 at lr 0.09: the adapters learn fast, then overshoot; the best evaluation is step 6 of 12
    # (measured: 6.03, 5.17, 3.080, 3.101, 3.091), so the exported adapters are neither the start's nor the last
    params = _absurd(six_tracks, method="lora", lora_rank=2, lora_alpha=64.0, save_every=0, sample_duration=0.0)
    setup = setup_training(params, load_prepared(six_tracks), tmp_path / "work", DistInfo())
    lm = setup.model.lm
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    at_evaluation = {}

    def remember(metrics):
        if "val_loss" in metrics:
            at_evaluation[metrics["step"]] = {k: v.detach().clone() for k, v in lm.state_dict().items()}

    evaluator = setup.evaluator
    result = train_loop(
        lm, setup.tokens, params, setup.plan, DistInfo(), tmp_path / "ck", on_metrics=remember, evaluator=evaluator
    )
    best = result.evaluation["best_step"]
    assert result.evaluation["exported_step"] == best and sorted(at_evaluation) == [0, 3, 6, 9, 12]
    # only the adapters were copied (a few % of the LM), and they are the best evaluation's
    kept = sum(t.numel() for t in evaluator.best)
    assert len(evaluator.best) == len(trainable) and kept < 0.2 * sum(v.numel() for v in lm.state_dict().values())
    assert best == 6, result.evaluation["evaluations"]
    for k, v in at_evaluation[best].items():
        assert torch.equal(result.state_dict[k], v), k
    # trained adapters (LoRA starts from B = 0), and not the last ones
    assert all(result.state_dict[n].any() for n in trainable if n.endswith("lora_B"))
    assert not all(torch.equal(result.state_dict[n], at_evaluation[12][n]) for n in trainable)


def test_with_ema_the_average_is_evaluated_and_kept(six_tracks, tmp_path):
    params = tiny_params(six_tracks, ema=True, epochs=1, updates_per_epoch=6, eval_every=3, optimizer="adamw", lr=3e-3)
    runs = {}
    for name, validate in (("plain", False), ("validated", True)):
        setup = setup_training(params, load_prepared(six_tracks), tmp_path / "work", DistInfo())
        evaluator = setup.evaluator if validate else None
        lm = setup.model.lm
        result = train_loop(lm, setup.tokens, params, setup.plan, DistInfo(), tmp_path / name, evaluator=evaluator)
        runs[name] = (result, setup.evaluator, [n for n, p in lm.named_parameters() if p.requires_grad], lm)
    plain, (validated, evaluator, names, lm) = runs["plain"][0], runs["validated"]
    # the EMA was swapped in for each evaluation and the trained weights back: the training did not change
    assert [h["loss"] for h in validated.history] == [h["loss"] for h in plain.history]
    for k, v in runs["plain"][3].state_dict().items():  # the trained (raw) weights end the same too
        assert torch.equal(lm.state_dict()[k], v), k
    # the tones are easy to learn: every evaluation of the average improves (measured: 6.033, 6.006, 5.896), so
    # the best is the last and the validated run exports exactly the EMA the plain run exports
    losses = [e["val_loss"] for e in validated.evaluation["evaluations"]]
    assert losses == sorted(losses, reverse=True) and validated.evaluation["best_step"] == 6, losses
    kept = dict(zip(names, evaluator.best, strict=True))
    for k, v in kept.items():  # exported: the EMA of the best evaluation
        assert torch.equal(validated.state_dict[k], v), k
    for k, v in plain.state_dict.items():
        assert torch.equal(validated.state_dict[k], v), k
    # what was evaluated at step 6 is the average: the plain run's exported EMA, evaluated here, has that loss
    plain_lm, fresh = runs["plain"][3], runs["plain"][1]
    plain_lm.load_state_dict(plain.state_dict)
    again = fresh.evaluate(6, _context(plain_lm, TrainStep(plain_lm)))["val_loss"]
    assert again == pytest.approx(losses[-1], abs=1e-5) and again != pytest.approx(losses[0], abs=1e-3)


def test_resume_keeps_the_evaluations_and_the_best_weights(six_tracks, tmp_path):
    params = _absurd(six_tracks, save_every=3, sample_duration=0.0)
    straight = run_training(params, tmp_path / "straight")
    mid = tmp_path / "straight" / "checkpoints" / "checkpoint-00000009.pt"
    saved = ckpt.load_checkpoint(mid)["evaluation"]
    assert [e["step"] for e in saved["history"]] == [0, 3, 6, 9]
    assert saved["best_step"] < 9 and saved["best"] is not None  # the early best is in the checkpoint
    resumed = run_training(dataclasses.replace(params, resume_from=str(mid)), tmp_path / "resumed")
    a, b = _tar_json(straight, "finetune.json")["validation"], _tar_json(resumed, "finetune.json")["validation"]
    assert [e["step"] for e in b["evaluations"]] == [0, 3, 6, 9, 12]
    for x, y in zip(a["evaluations"], b["evaluations"], strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5)
    assert a["exported_step"] == b["exported_step"] == saved["best_step"]
    a_weights, b_weights = _tar_weights(straight), _tar_weights(resumed)
    for k, v in a_weights.items():
        assert torch.equal(b_weights[k], v), k
    # the early best (step 3, measured 0.060 against 0.171 at step 6) reached the resumed run only through the
    # step-9 checkpoint's copy of its weights, and those are what both tars hold (fp16)
    assert saved["best_step"] == 3 and not saved["best_is_current"]
    names = [n for n, _ in load_musicgen("tiny", "cpu").lm.named_parameters()]  # method full: all of them train
    assert len(saved["best"]) == len(names)
    for name, best in zip(names, saved["best"], strict=True):
        assert torch.equal(b_weights[name], best.half()), name


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_evaluate_like_one(parallel, tmp_path, capfd):
    """DDP / FSDP over 2 gloo processes: the crops are dealt out over the ranks (one per batch there, two per batch
    in one process; FSDP pads the shorter rank) and the sums all-reduced; the evaluations, the exported step and the
    weights match one process."""
    # 1.5 s clips (the crops shortened to them): one crop each; 3 clips held out: one rank gets fewer
    specs = [{"seconds": 1.5, "freq": 200.0 + 60 * i, "description": f"d{i}"} for i in range(6)]
    dataset = make_prepared(tmp_path / "prepared", specs)
    params = tiny_params(
        dataset, batch_size=2, epochs=1, updates_per_epoch=4, eval_every=2, validation_split=0.5, save_every=4,
        sample_duration=0.0, optimizer="adamw", lr=3e-3, parallel=parallel,
    )  # fmt: skip
    ddp = run_training(params, tmp_path / "ddp", nproc=2)
    log = capfd.readouterr().err
    assert "All 2 ranks hold identical weights" in log and f"{parallel.upper()}" in log, log[-3000:]
    single = run_training(params, tmp_path / "single", nproc=1)
    a, b = _tar_json(ddp, "finetune.json")["validation"], _tar_json(single, "finetune.json")["validation"]
    assert a["crops"] == b["crops"] == 3
    assert [e["step"] for e in a["evaluations"]] == [e["step"] for e in b["evaluations"]] == [0, 2, 4]
    for x, y in zip(a["evaluations"], b["evaluations"], strict=True):
        for key in ("val_loss", "val_loss_uncond", "val_loss_q0", "val_loss_q3", "val_tokens"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    assert a["exported_step"] == b["exported_step"]
    for k, v in _tar_weights(single).items():
        torch.testing.assert_close(_tar_weights(ddp)[k].float(), v.float(), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_fsdp_checkpoints_and_resumes_the_best_weights(six_tracks, tmp_path, capfd):
    """Under FSDP the kept best tensors are this rank's shards: a checkpoint gathers them whole, a resume cuts them
    again; resumed under FSDP the export is the straight run's, and it is the single-process run's."""
    params = _absurd(six_tracks, save_every=3, sample_duration=0.0, parallel="fsdp")
    straight = run_training(params, tmp_path / "straight", nproc=2)
    assert "FSDP" in capfd.readouterr().err
    mid = tmp_path / "straight" / "checkpoints" / "checkpoint-00000009.pt"
    saved = ckpt.load_checkpoint(mid)["evaluation"]
    assert saved["best_step"] < 9 and saved["best"] is not None  # gathered from both ranks' shards
    lm = load_musicgen("tiny", "cpu").lm
    base, names = lm.state_dict(), [n for n, _ in lm.named_parameters()]
    assert [tuple(b.shape) for b in saved["best"]] == [tuple(base[n].shape) for n in names]  # whole tensors
    resumed = run_training(dataclasses.replace(params, resume_from=str(mid)), tmp_path / "resumed", nproc=2)
    single = run_training(dataclasses.replace(params, parallel="auto"), tmp_path / "single", nproc=1)
    a, b, c = (_tar_json(t, "finetune.json")["validation"] for t in (straight, resumed, single))
    assert a["exported_step"] == b["exported_step"] == c["exported_step"] == saved["best_step"]
    weights = [_tar_weights(t) for t in (straight, resumed, single)]
    for k in names:
        assert torch.equal(weights[1][k], weights[0][k]), k
        torch.testing.assert_close(weights[0][k].float(), weights[2][k].float(), atol=2e-3, rtol=1e-3)
