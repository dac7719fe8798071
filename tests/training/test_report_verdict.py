"""The report's opening (a sentence per question a musician asks, each with its threshold) and the samples made
during training (the report's timeline, the tar, the folder beside it, metrics.json, wandb)."""

from __future__ import annotations

import json
import tarfile
from html import unescape

import pytest

from core.versions import load_musicgen
from evaluation.frechet import fmt_distance
from tests.training.conftest import make_prepared, tiny_params
from tests.training.test_validation import SIX, _Page
from training import evaluate
from training.report import (
    CLOSER_MIN,
    PROMPT_GAIN_KEPT,
    comparison_rows,
    headline,
    render_html,
    summary_lines,
    verdicts,
)
from training.run import run_training

QUESTIONS = [
    "Closer to your music?",
    "Still follows prompts?",
    "Forgot other music?",
    "Copies your clips?",
    "Healthy audio?",
]


def _finetune(model_version: str = "small", **changes) -> dict:
    """A finetune.json as the export writes it: validation with 3 evaluations, forgetting, the audio check."""
    evaluations = [
        {"step": 0, "val_loss": 5.0, "val_loss_uncond": 5.6},
        {"step": 10, "val_loss": 4.0, "val_loss_uncond": 4.5},
        {"step": 20, "val_loss": 4.1, "val_loss_uncond": 4.6},
    ]
    validation = {
        "split": {"validation_tracks": ["a.wav", "b.wav"]},
        "base_loss": 5.0,
        "best_loss": 4.0,
        "final_loss": 4.1,
        "exported_step": 10,
        "evaluations": evaluations,
        "flags": [],
        "forgetting": {"base_loss": 3.0, "exported_loss": 3.05, "final_loss": 3.1, "threshold": 0.05, "clips": 8},
        "audio": {
            "frechet_base": 2.0,
            "frechet_finetuned": 1.0,
            "copy_check": {"ratio": 0.5, "copies": 0, "samples": [{"copy": False}, {"copy": False}]},
            "clap": {
                "skipped": "laion/larger_clap_music is not in the Hugging Face cache (...); add it with `hf download`"
            },
        },
    }
    for key, value in changes.items():
        validation[key] = value
    return {"model_version": model_version, "method": "lora", "validation": validation}


def _answers(finetune: dict) -> dict[str, tuple[str, str]]:
    return {question: (kind, text) for question, kind, text in verdicts(finetune)}


def test_the_verdict_answers_each_question_with_its_threshold():
    answers = _answers(_finetune())
    assert list(answers) == QUESTIONS  # a real model: no test-model line
    kind, text = answers["Closer to your music?"]
    assert kind == "" and "5.000 (base model) to 4.000 at step 10, 20.0 % lower" in text
    assert f"counted closer from {100 * CLOSER_MIN:.0f} % lower" in text
    assert "2.000 (base) -> 1.000 (fine-tuned)" in text  # the EnCodec Fréchet distance, lower is closer
    kind, text = answers["Still follows prompts?"]
    assert kind == "" and "by 0.600 with the base model and 0.500 with the fine-tune" in text
    assert f"flagged under {100 * PROMPT_GAIN_KEPT:.0f} % of the base's" in text
    # CLAP absent: skipped, why, and how to add it
    assert "CLAP prompt adherence skipped: laion/larger_clap_music is not in the Hugging Face cache" in text
    assert "hf download" in text
    kind, text = answers["Forgot other music?"]
    assert kind == "" and "3.000 (base) -> 3.050 (exported), under the +5 % that is flagged" in text
    kind, text = answers["Copies your clips?"]
    assert kind == "" and text.startswith("No: 0 of 2") and "closer than 0.5 x" in text
    assert answers["Healthy audio?"][0] == "skip" and "Not measured" in answers["Healthy audio?"][1]


def test_a_test_model_says_its_numbers_mean_nothing():
    (question, kind, text), *rest = verdicts(_finetune("tiny"))
    assert question == "Test model" and kind == "warn"
    assert "tiny is a tiny test model with random weights" in text and "mean nothing about music" in text
    assert [q for q, _, _ in rest] == QUESTIONS
    assert verdicts(_finetune("tiny-melody"))[0][0] == "Test model"
    assert all(q != "Test model" for q, _, _ in verdicts(_finetune("melody")))


def test_each_flag_turns_its_answer():
    # a gain under the threshold: the model ignores its prompts
    evaluations = [
        {"step": 0, "val_loss": 5.0, "val_loss_uncond": 5.6},
        {"step": 10, "val_loss": 4.0, "val_loss_uncond": 4.0 + 0.6 * PROMPT_GAIN_KEPT - 0.01},
    ]
    kind, text = _answers(_finetune(evaluations=evaluations))["Still follows prompts?"]
    assert kind == "warn" and "listens to its prompts much less" in text
    # a gain still above it: no flag
    evaluations[1]["val_loss_uncond"] = 4.0 + 0.6 * PROMPT_GAIN_KEPT + 0.01
    assert _answers(_finetune(evaluations=evaluations))["Still follows prompts?"][0] == ""
    # near copies
    audio = _finetune()["validation"]["audio"]
    audio["copy_check"] = {"ratio": 0.5, "copies": 1, "samples": [{"copy": True}, {"copy": False}]}
    kind, text = _answers(_finetune(audio=audio))["Copies your clips?"]
    assert kind == "warn" and text.startswith("Yes: 1 of 2")
    # forgetting up
    forgetting = {"base_loss": 3.0, "exported_loss": 3.5, "final_loss": 3.6, "threshold": 0.05, "exported_up": True}
    answers = _answers(_finetune(forgetting=forgetting, flags=["forgetting up"]))
    assert answers["Forgot other music?"][0] == "warn" and "Forgetting up" in answers["Forgot other music?"][1]
    # not measured: says how
    answers = _answers(_finetune(forgetting=None))
    assert (
        answers["Forgot other music?"][0] == "skip" and "set forgetting_check=on" in answers["Forgot other music?"][1]
    )
    # CLAP: the fine-tune stopped following prompts of other genres, or the held-out ones
    clap = {"adherence_drop": 0.05, "forget_adherence_base": 0.30, "forget_adherence_finetuned": 0.26}
    audio = {**_finetune()["validation"]["audio"], "clap": clap}
    answers = _answers(_finetune(audio=audio))
    assert (
        answers["Forgot other music?"][0] == ""
        and "0.300 (base) -> 0.260 (fine-tuned)" in answers["Forgot other music?"][1]
    )
    clap["forget_adherence_finetuned"] = 0.24
    assert _answers(_finetune(audio=audio, forgetting=None))["Forgot other music?"][0] == "warn"
    clap.update(adherence_base=0.4, adherence_finetuned=0.34)
    kind, text = _answers(_finetune(audio=audio))["Still follows prompts?"]
    assert kind == "warn" and "0.400 (base) -> 0.340 (fine-tuned), flagged when it falls by more than 0.05" in text
    # under CLOSER_MIN lower: not closer
    kind, text = _answers(_finetune(best_loss=4.99))["Closer to your music?"]
    assert kind == "warn" and f"under the {100 * CLOSER_MIN:.0f} %" in text
    # the samples moved away from the held-out music
    audio = _finetune()["validation"]["audio"]
    audio["frechet_finetuned"] = 3.0
    assert _answers(_finetune(audio=audio))["Closer to your music?"][0] == "warn"


def test_the_page_opens_with_the_answers():
    finetune = _finetune("tiny")
    page = _Page(render_html(finetune, [{"step": 1, "loss": 5.0, "lr": 1e-3}], []).decode())
    for question, _, text in verdicts(finetune):
        assert f"{question} {text}" in page.verdict


def _health(flags: list[list[str]], measures: list[dict], correlations: list[float], indistinguishable: bool) -> dict:
    thresholds = {"silence": 0.25, "clipping": 0.001, "dc": 0.02, "noise": 0.3, "loop": 0.9}
    return {
        "finetuned": [{"flags": f, "measures": m} for f, m in zip(flags, measures, strict=True)],
        "correlations": correlations,
        "indistinguishable": indistinguishable,
        "thresholds": {**thresholds, "indistinguishable_correlation": 0.9},
    }


def test_each_answer_opens_with_yes_no_or_not_measured():
    answers = _answers(_finetune())
    assert answers["Closer to your music?"][1].startswith("Yes: on 2 held-out track(s)")
    assert answers["Still follows prompts?"][1].startswith("Yes: the prompts lower")
    assert _answers(_finetune(best_loss=4.99))["Closer to your music?"][1].startswith("Not clearly: ")
    never = _answers(_finetune(best_loss=5.0, exported_step=0))["Closer to your music?"]
    assert never[0] == "warn" and never[1].startswith("No: the fine-tune never beat the base model")
    evaluations = [
        {"step": 0, "val_loss": 5.0, "val_loss_uncond": 5.6},
        {"step": 10, "val_loss": 4.0, "val_loss_uncond": 4.1},
    ]
    kind, text = _answers(_finetune(evaluations=evaluations))["Still follows prompts?"]
    assert kind == "warn" and text.startswith("No: the prompts lower")
    kind, text = _answers(_finetune(evaluations=[]))["Still follows prompts?"]
    assert kind == "skip" and text.startswith("Not measured: CLAP prompt adherence skipped")


def test_the_prompts_gain_is_read_as_a_share_of_the_bases():
    kind, text = _answers(_finetune())["Still follows prompts?"]  # gains 0.6 (base) and 0.5 (fine-tuned)
    assert kind == "" and "0.500 with the fine-tune, 83 % of the base's gain (flagged under 50 %" in text
    # a fine-tune whose prompts no longer matter: 0.000, never a negative zero
    evaluations = [
        {"step": 0, "val_loss": 5.0, "val_loss_uncond": 5.6},
        {"step": 10, "val_loss": 4.0, "val_loss_uncond": 3.99996},
    ]
    kind, text = _answers(_finetune(evaluations=evaluations))["Still follows prompts?"]
    assert kind == "warn" and "0.000 with the fine-tune, 0 % of the base's gain" in text and "-0" not in text


def test_a_small_distance_keeps_its_digits_and_says_its_change():
    """The demo's EnCodec Fréchet distances are about 0.0007: printed to 3 decimals, every change read 0.001 ->
    0.001. They keep 3 significant digits, and the change is said in % of the base's."""
    assert fmt_distance(0.000734241) == "0.000734" and fmt_distance(2.0) == "2.000" and fmt_distance(None) == "-"
    audio = {**_finetune()["validation"]["audio"], "frechet_base": 0.000734, "frechet_finetuned": 0.000712}
    finetune = _finetune(audio=audio)
    kind, text = _answers(finetune)["Closer to your music?"]
    assert kind == "" and "0.000734 (base) -> 0.000712 (fine-tuned), 3 % lower." in text
    row = next(r for r in comparison_rows(finetune["validation"]) if r[0].startswith("Fréchet distance to"))
    assert row[1:3] == ("0.000734", "0.000712") and row[4] == "fine-tuned vs base: 3 % lower"
    # under CLOSER_MIN apart: unchanged, not flagged; farther: flagged
    audio["frechet_finetuned"] = 0.000734 * (1 + CLOSER_MIN / 2)
    kind, text = _answers(_finetune(audio=audio))["Closer to your music?"]
    assert kind == "" and f"unchanged (under {100 * CLOSER_MIN:.0f} % apart)" in text
    audio["frechet_finetuned"] = 0.000734 * (1 + 2 * CLOSER_MIN)
    kind, text = _answers(_finetune(audio=audio))["Closer to your music?"]
    assert kind == "warn" and "2 % higher" in text


def test_healthy_audio_says_each_flag_in_words_with_its_measure_and_threshold():
    calm = {"silent_fraction": 0.0, "clipped_fraction": 0.0, "dc_offset": 0.001, "spectral_flatness": 0.01}
    measures = [
        {**calm, "dc_offset": 0.038, "spectral_flatness": 0.56, "loop_correlation": 0.2},
        {**calm, "dc_offset": 0.041, "loop_correlation": 0.97, "silent_fraction": 0.4},
    ]
    health = _health([["dc", "noise"], ["silence", "dc", "loop"]], measures, [0.95, 0.93], True)
    during = {"entries": [{"step": 0, "flags": ["dc (prompt 1)"]}, {"step": 10, "flags": ["loop (prompt 2)"]}]}
    audio = {**_finetune()["validation"]["audio"], "health": health}
    answers = _answers(_finetune(audio=audio, samples_during_training=during))
    kind, text = answers["Healthy audio?"]
    assert kind == "warn" and text.startswith("No: a DC offset in samples 1 and 2 of 2 (the waveform sits 3.8, 4.1 % ")
    assert "of full scale off centre, music under 0.1 %; flagged over 2 %)" in text
    assert "noise in sample 1 of 2 (spectral flatness 0.56, where white noise measures 0.56" in text
    assert "silence in sample 2 of 2 (silent for 40 % of it; flagged over 25 %)" in text
    assert "a loop in sample 2 of 2 (it repeats itself with a correlation of 0.97, 1 for an exact replay" in text
    assert "indistinguishable (base/fine-tuned pairs correlate 0.95, 0.93, 1 for the same audio; flagged over 0.9)" in (
        text
    )
    assert "step 0 (the base model): a DC offset (prompt 1); step 10: a loop (prompt 2)" in text
    assert "dc" not in text.replace("DC", "")  # no bare flag name
    # the fine-tune's gain in loss is not audible: the closer answer takes its yes back and says why
    kind, text = answers["Closer to your music?"]
    assert kind == "warn" and text.startswith("Not clearly: ") and "cannot be told from the base model's" in text
    assert _answers(_finetune())["Closer to your music?"][1].startswith("Yes: ")
    # healthy samples: each threshold with its unit
    health = _health([[], []], [calm, calm], [0.2, 0.3], False)
    audio = {**_finetune()["validation"]["audio"], "health": health}
    kind, text = _answers(_finetune(audio=audio))["Healthy audio?"]
    assert kind == "" and text.startswith("Yes: none of the 2 fine-tuned samples has silence, clipping, a DC offset")
    assert "a DC offset 2 % of full scale" in text and "base/fine-tuned correlation 0.9" in text


def test_the_result_line_says_which_flags_it_means():
    """The log's last line holds two kinds of flags: the loss's (validation, forgetting) and the samples' health.
    "no flags" before "sample flags: dc" read as a contradiction; each part names its kind."""
    validation = {"base_loss": 5.0, "best_loss": 4.0, "final_loss": 4.1, "flags": [], "sample_flags": ["dc (2 of 2)"]}
    assert headline(validation, 10).endswith("last 4.1000; no loss flags; sample flags: dc (2 of 2)")
    validation.update(flags=["validation up"], sample_flags=[])
    assert headline(validation, 10).endswith("; flags: validation up; samples healthy")


def test_clap_s_how_to_is_said_once():
    """CLAP absent: its reason and how to add it (a long line) is said under "Still follows prompts?" only; the
    distance's line points there."""
    texts = [text for _, _, text in verdicts(_finetune("tiny"))]
    assert sum(text.count("hf download") for text in texts) == 1
    closer = _answers(_finetune())["Closer to your music?"][1]
    assert "CLAP distance skipped: the CLAP model is not installed (how to add it: Still follows prompts?)" in closer
    forgot = _answers(_finetune(forgetting=None))["Forgot other music?"][1]
    assert "the CLAP model is not installed (how to add it: Still follows prompts?)" in forgot


def test_the_report_fits_its_page_in_a_browser(tmp_path):
    """The page in headless Chromium: its tables (the timeline's players and long prompts, the held-out table's
    four columns) stay inside the text's width, as the verdicts do; a step whose samples were skipped says why
    across the prompts' columns."""
    import numpy as np
    import torch
    from PIL import Image

    from tests.helpers import render_in_chromium

    prompt = "zzq lofi, mellow electric piano chords, sine bass, soft kick and snare, 81 bpm, G minor"
    finetune = _finetune("tiny")
    validation = finetune["validation"]
    for evaluation in validation["evaluations"]:  # tiny's 4 codebooks
        evaluation.update({f"val_loss_q{k}": evaluation["val_loss"] for k in range(4)})
    validation["audio"].update(
        prompts=[prompt, prompt],
        copy_check={
            "ratio": 0.5,
            "reference": 0.0063,
            "copies": 0,
            "samples": [{"nearest": "demo_track_06_000.wav", "distance": 0.0055, "copy": False}] * 2,
        },
    )
    validation["samples_during_training"] = {
        "prompts": [prompt, prompt],
        "seconds": 2.0,
        "bound_share": 0.05,
        "spent_s": 8.4,
        "entries": [
            {"step": 0, "files": ["samples/during/a.mp3", "samples/during/b.mp3"], "flags": ["dc (prompt 1)"]},
            {"step": 10, "skipped": "over the bound: samples may cost 5 % of the training time"},
        ],
    }
    wav = torch.zeros(1, 32000)
    comparison = {"base": [wav, wav], "finetuned": [wav, wav], "rate": 32000}
    timeline = {"samples/during/a.mp3": b"ID3", "samples/during/b.mp3": b"ID3"}
    html = render_html(finetune, [{"step": 1, "loss": 5.0, "lr": 1e-3}], [], None, comparison, timeline).decode()
    page = tmp_path / "report.html"
    page.write_text(html)
    codebooks = "val_loss_q0..val_loss_q3: the loss on each of EnCodec's codebooks, val_loss_q0 the coarsest"
    assert codebooks in unescape(html)  # the per-codebook columns say what they are
    skipped = next(t for t in _Page(html).tables if t and t[0][:2] == ["step", "validation loss"] and len(t[0]) == 5)
    assert skipped[2] == ["10", "4.0000", "over the bound: samples may cost 5 % of the training time", ""]
    assert "(again, sample 2 of this prompt)" in skipped[0][3]  # the same held-out description, sampled twice
    console = render_in_chromium(page, tmp_path / "page.png", width=1200, height=2600)
    assert not [line for line in console if "rror" in line], console
    pixels = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)
    drawn = (pixels < 250).any(axis=2)  # anything but the white page
    verdict_box = np.nonzero((np.abs(pixels - [0xFF, 0xF4, 0xE5]) <= 2).all(axis=2))[1]  # the warn boxes' colour
    right = int(verdict_box.max())  # the verdicts span the text's width: nothing may reach past them
    beyond = drawn[:, right + 3 : pixels.shape[1] - 20]  # (the last 20 px: a scrollbar)
    assert not beyond.any(), f"drawn {int(beyond.sum())} px right of the text's width (x > {right})"


@pytest.fixture(scope="module")
def tiny_model():
    return load_musicgen("tiny", "cpu").musicgen


def test_samples_during_training_are_fixed_and_bounded(tiny_model):
    samples = evaluate.TrainingSamples(tiny_model, ["calm piano", "fast drums"], 0.5, seed=3, sampler_precision="auto")
    first = samples.sample(0, 0.0)  # the base model's: always made
    assert first["files"] == ["samples/during/step_000000_0.mp3", "samples/during/step_000000_1.mp3"]
    assert samples.spent > 0 and first["seconds"] > 0
    # no training time yet to spend 5 % of: skipped, and the entry says the bound
    skipped = samples.sample(2, 0.0)
    assert (
        "files" not in skipped
        and f"may cost {100 * evaluate.TIMELINE_SHARE:.0f} % of the training" in (skipped["skipped"])
    )
    # within the bound: made, from the same seed, so the same weights give the same audio
    again = samples.sample(4, samples.spent / evaluate.TIMELINE_SHARE * 3)
    assert again["files"] == ["samples/during/step_000004_0.mp3", "samples/during/step_000004_1.mp3"]
    for i in range(2):
        assert samples.audio[again["files"][i]] == samples.audio[first["files"][i]]
    assert [e["step"] for e in samples.summary()["entries"]] == [0, 2, 4]
    # the run's last evaluation: made over the bound, so the timeline ends with the fine-tune as it ended
    last = samples.sample(6, 0.0, final=True)
    assert last["files"] == ["samples/during/step_000006_0.mp3", "samples/during/step_000006_1.mp3"]


def test_the_timeline_is_thinned_keeping_its_ends(tiny_model, monkeypatch):
    monkeypatch.setattr(evaluate, "TIMELINE_KEPT", 3)
    samples = evaluate.TrainingSamples(tiny_model, ["calm piano"], 0.2, seed=0, sampler_precision="auto")
    for step in (0, 2, 3, 10, 20):
        samples.sample(step, 1e9)
    kept = [e["step"] for e in samples.entries if e["files"]]
    assert kept == [0, 10, 20] and len(samples.audio) == 3  # 2 and 3 were the closest-spaced
    assert [e["step"] for e in samples.entries if e.get("thinned")] == [2, 3]


def test_samples_clap_and_health_reach_the_report_tar_log_and_wandb(tmp_path, monkeypatch):
    """One run with the tiny CLAP in the Hugging Face cache (as the image bakes the real one): the samples during
    training, CLAP's metrics and the health flags land in metrics.json, the tar, report.html, the log's result line
    and wandb. (About 40 s: a whole run with wandb offline, the one way to see all five places at once.)"""
    import wandb
    from huggingface_hub import constants

    from core.tiny import save_clap_hub
    from tests.training.test_publish import WANDB_KEY, _wandb_history_and_config, _wandb_summary

    save_clap_hub(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    # every evaluation samples (the tiny model trains 4 steps in about a second: 5 % of it is no time)
    monkeypatch.setattr(evaluate, "TIMELINE_SHARE", 1000.0)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    dataset = make_prepared(tmp_path / "six", SIX)
    wandb.teardown()
    try:
        params = tiny_params(
            dataset, epochs=1, updates_per_epoch=4, eval_every=2, save_every=0, wandb_api_key=WANDB_KEY
        )
        tar = run_training(params, tmp_path / "out")
    finally:
        wandb.teardown()
    out = tmp_path / "out"
    during = json.loads((out / "metrics.json").read_text())["validation"]["samples_during_training"]
    assert [e["step"] for e in during["entries"]] == [0, 2, 4]
    files = [f for e in during["entries"] for f in e["files"]]
    assert len(files) == 6 and during["seconds"] == 0.5
    with tarfile.open(tar) as archive:
        members = set(archive.getnames())
    for name in files:
        assert name in members and (out / name).read_bytes().startswith((b"ID3", b"\xff\xfb", b"\xff\xf3"))  # MP3
    page = _Page((out / "report.html").read_text())
    table = page.table("step")  # the evaluations' table comes first: find the timeline by its prompts
    timeline = next(t for t in page.tables if t and t[0][:2] == ["step", "validation loss"] and len(t[0]) == 5)
    assert [row[0] for row in timeline[1:]] == ["0", "2", "4"] and table is not timeline
    html = (out / "report.html").read_text()
    assert html.count("src='data:audio/mpeg;base64,") == 6 and "Samples during training" in html
    history, _ = _wandb_history_and_config(out)
    logged = [h for h in history if "samples_during/1/_type" in h]  # one audio per prompt, at each evaluation
    assert [h["step"] for h in logged] == [0, 2, 4]
    assert all(h["samples_during/1/_type"] == "audio-file" for h in logged)
    assert [h["samples_during/0/caption"] for h in logged] == [f"step {s}: {during['prompts'][0]}" for s in (0, 2, 4)]
    assert [h["samples_during/flags"] for h in logged] == [", ".join(e["flags"]) or "none" for e in during["entries"]]

    validation = json.loads((out / "metrics.json").read_text())["validation"]
    clap, health = validation["audio"]["clap"], validation["audio"]["health"]
    assert "skipped" not in clap and clap["model"] == "laion/larger_clap_music"
    assert -1 <= clap["adherence_base"] <= 1 and -1 <= clap["adherence_finetuned"] <= 1
    assert len(clap["copy_check"]["samples"]) == 2 and "1 held-out clip(s)" in clap["distance_skipped"]
    assert len(health["base"]) == len(health["finetuned"]) == 2 and len(health["correlations"]) == 2
    assert validation["sample_flags"] == evaluate.sample_flags(health)
    answers = {q: text for q, _, text in verdicts({"model_version": "tiny", "validation": validation})}
    assert (
        f"{clap['adherence_base']:.3f} (base) -> {clap['adherence_finetuned']:.3f} (fine-tuned)"
        in (answers["Still follows prompts?"])
    )
    assert answers["Still follows prompts?"] in page.verdict and answers["Healthy audio?"] in page.verdict
    result = summary_lines(tar)[1]  # the log's result line
    flags = validation["sample_flags"]
    assert (f"; sample flags: {', '.join(flags)}" if flags else "; samples healthy") in result
    assert _wandb_summary(out)["sample_flags"] == (", ".join(flags) or "none")
    assert len(clap["forget_prompts"]) == evaluate.CLAP_FORGET_PROMPTS and clap["forget_adherence_finetuned"] <= 1
    assert f"{clap['forget_adherence_base']:.3f} (base)" in answers["Forgot other music?"]


def test_predicts_result_line_carries_the_samples_health_flags(tmp_path):
    """The tiny model's random weights make noise: predict's `Wrote ...` line names the flags its sample measures."""
    import soundfile as sf
    import torch

    from evaluation.health import sample_health
    from tests.test_predict import run_cli

    out = run_cli("--model_version", "tiny", "--prompt", "lofi beat", "--duration", "2", "--seed", "3",
                  "--output", str(tmp_path / "out.wav"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data, rate = sf.read(str(tmp_path / "out.wav"), dtype="float32", always_2d=True)
    flags = sample_health(torch.from_numpy(data.T.copy()), rate).flags
    assert flags, "the tiny model's sample should measure unhealthy (random weights)"
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("Wrote ")]
    assert line.endswith(f"; health flags: {', '.join(flags)} (evaluation/health.py's thresholds)"), line
