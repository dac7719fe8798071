"""The transformers format (core/weights/transformers_format.py), checked against the models themselves: the
transformers model built from our LM gives the LM's next-token logits (text, stereo, melody; T5-conditioned tiny
models in audiocraft's real format), export -> import is bitwise, and a MusicGen saved by transformers itself
imports and samples with audiocraft."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from audiocraft.models import MusicGen
from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

from core import tiny, versions
from core.catalogue import spec
from core.weights import transformers_format as tf
from tests.helpers import tone

TOL = 1e-4  # fp32, after the condition projection
DESCRIPTION = "calm piano with soft drums"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """audiocraft MusicGens by family: `tiny-t5` (text), and tiny-stereo / tiny-melody with T5 text."""
    root = tmp_path_factory.mktemp("t5-variants")
    found = {"text": versions.load_musicgen("tiny-t5", "cpu").musicgen}
    for family, base in (("stereo", "tiny-stereo"), ("melody", "tiny-melody")):
        found[family] = versions.load_musicgen(str(tiny.build_t5_variant(root / base, base)), "cpu").musicgen
    found["melody-folder"] = root / "tiny-melody"  # carries the tiny htdemucs its chroma conditioner loads
    return found


def _codes(lm, steps: int = 10, seed: int = 0) -> torch.Tensor:
    """`[1, K, S]` a sequence as the LM sees it: random codes with the special token (`card`) where the delay
    pattern puts it (the first steps of the delayed codebooks)."""
    gen = torch.Generator().manual_seed(seed)
    K, card = lm.num_codebooks, lm.card
    seq = torch.randint(0, card, (1, K, steps), generator=gen)
    delays = lm.cfg.codebooks_pattern.delay.delays
    for k, d in enumerate(delays):
        seq[:, k, :d] = card
    return seq


def _oracle(musicgen, hf, melody_wav: torch.Tensor | None = None) -> float:
    """max |logits(audiocraft LM) - logits(transformers)| for the same codes and description."""
    lm = musicgen.lm.eval()
    seq = _codes(lm)
    text = ConditioningAttributes(text={"description": DESCRIPTION})
    captured = {}
    if melody_wav is not None:
        text.wav["self_wav"] = WavCondition(
            melody_wav[None], torch.tensor([melody_wav.shape[-1]]), [32000], [None], [None]
        )
        proj = lm.condition_provider.conditioners["self_wav"].output_proj

        def keep_chroma(module, args, output):  # returns None: the output stays as it is
            captured["chroma"] = args[0]

        hook = proj.register_forward_hook(keep_chroma)
    with torch.no_grad():
        conditions = lm.condition_provider(lm.condition_provider.tokenize([text]))
        ours = lm(seq, [], condition_tensors=conditions)  # [B, K, S, card]
        tokens = tf.text_tokenizer(lm)([DESCRIPTION], return_tensors="pt")
        extra = {}
        if melody_wav is not None:
            hook.remove()
            chroma = captured["chroma"]  # [B, T, n_chroma]: what the chroma conditioner projects
            hf.config.chroma_length = chroma.shape[1]  # transformers repeats shorter chroma: give it all of it
            extra["input_features"] = chroma
        theirs = hf(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            decoder_input_ids=seq.reshape(-1, seq.shape[-1]),
            **extra,
        ).logits
    # MusicgenMelody returns logits for the prepended conditions too; audiocraft's LM drops them: the last S
    theirs = theirs[:, -seq.shape[-1] :]
    assert theirs.shape == (seq.shape[1], seq.shape[2], lm.card)
    return float((ours[0] - theirs).abs().max())


@pytest.mark.parametrize("family", ["text", "stereo", "melody"])
def test_transformers_model_gives_our_lm_next_token_logits(models, family):
    musicgen = models[family]
    hf = tf.to_transformers(musicgen.lm, musicgen.compression_model)
    expected = {"text": "MusicgenForConditionalGeneration", "stereo": "MusicgenForConditionalGeneration"}
    assert type(hf).__name__ == expected.get(family, "MusicgenMelodyForConditionalGeneration")
    assert hf.config.decoder.audio_channels == (2 if family == "stereo" else 1)
    assert hf.config.decoder.num_codebooks == musicgen.lm.num_codebooks
    text_encoder = hf.text_encoder  # tied as transformers ties it (one tensor, saved once)
    assert text_encoder.shared.weight.data_ptr() == text_encoder.encoder.embed_tokens.weight.data_ptr()
    wav = torch.from_numpy(tone(2.0)).T if family == "melody" else None
    diff = _oracle(musicgen, hf, wav)
    assert diff <= TOL, f"{family}: max abs logit difference {diff}"


@pytest.mark.parametrize("family", ["text", "stereo", "melody"])
def test_export_then_import_is_bitwise(models, family, tmp_path):
    musicgen = models[family]
    hf = tf.to_transformers(musicgen.lm, musicgen.compression_model)
    folder = tf.save_transformers(hf, tmp_path / "hf", tokenizer=tf.text_tokenizer(musicgen.lm))
    assert tf.is_transformers_folder(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    # the melody LM's chroma conditioner asks demucs for htdemucs: the tiny model's own, as when it was loaded
    with tiny.tiny_demucs(models["melody-folder"]) if family == "melody" else contextlib.nullcontext():
        lm, compression, cfg = tf.from_transformers(folder)
    for ours, back in ((musicgen.lm, lm), (musicgen.compression_model, compression)):
        ours_sd = ours.state_dict() if family != "stereo" or ours is musicgen.lm else ours.model.state_dict()
        back_sd = back.state_dict()
        assert set(ours_sd) == set(back_sd)
        different = [k for k in ours_sd if not torch.equal(ours_sd[k], back_sd[k])]
        assert not different, different[:5]
    original = musicgen.lm.cfg
    assert cfg["fuser"]["cross"] == list(original.fuser.cross) and cfg["fuser"]["prepend"] == list(
        original.fuser.prepend
    )
    assert cfg["codebooks_pattern"]["delay"]["delays"] == list(original.codebooks_pattern.delay.delays)
    assert cfg["channels"] == original.channels
    assert cfg["dataset"]["segment_duration"] == original.dataset.segment_duration == 30.0
    t5 = lm.condition_provider.conditioners["description"]
    assert t5.t5_tokenizer(DESCRIPTION).input_ids == tf.text_tokenizer(musicgen.lm)(DESCRIPTION).input_ids


@pytest.mark.parametrize("kind", [{}, {"stereo": True}, {"melody": True}], ids=["text", "stereo", "melody"])
def test_a_musicgen_saved_by_transformers_imports_and_samples(kind, tmp_path):
    folder = tiny.save_transformers_tiny(tmp_path / "hf", **kind)
    assert tf.is_transformers_folder(folder)
    lm, compression, cfg = tf.from_transformers(folder)
    assert cfg["conditioners"]["description"]["model"] == "t5"
    assert cfg["transformer_lm"]["n_q"] == (8 if kind.get("stereo") else 4)
    assert cfg["dataset"]["segment_duration"] == 30.0  # max_length 1500 frames, as facebook's repos write it
    musicgen = MusicGen("transformers-tiny", compression, lm)
    musicgen.set_generation_params(duration=0.2, top_k=50)
    if kind.get("melody"):
        melody = torch.from_numpy(tone(1.0)).T
        wav = musicgen.generate_with_chroma(["lofi beat"], melody[None], 32000)
    else:
        wav = musicgen.generate(["lofi beat"])
    assert wav.shape == (1, 2 if kind.get("stereo") else 1, 6400) and torch.isfinite(wav).all()
    if not kind:  # the imported LM is the transformers model: same logits the other way round
        hf = tf._load_model(folder)
        assert _oracle(musicgen, hf) <= TOL


def test_unsupported_reason_names_what_transformers_cannot_hold():
    for name in ("tiny-t5", "small", "melody", "stereo-small", "stereo-melody-large"):
        assert tf.unsupported_reason(spec(name)) is None, name
    style, lut, micro = (tf.unsupported_reason(spec(n)) for n in ("tiny-style", "tiny", "tiny-micro"))
    assert "Style" in style and "lookup table" in lut and "no text encoder" in micro
    assert "no text encoder" in tf.unsupported_reason(spec("micro"))
    assert "Style" in tf.unsupported_reason(spec("style"))
    # the LM config is the authoritative check, for folders the catalogue does not name
    assert "not the T5" in tf.unsupported_reason(tiny.lm_cfg("tiny"))
    assert "style" in tf.unsupported_reason(tiny.lm_cfg("tiny-style"))
    for base in ("tiny-stereo", "tiny-melody"):
        assert tf.unsupported_reason(tiny.t5_variant_cfg(base)) is None
    cross_melody = tiny.lm_cfg("tiny-melody")
    cross_melody["conditioners"]["description"] = {"model": "t5", "t5": tiny.t5_conditioner_cfg()}
    assert "fuser layout" in tf.unsupported_reason(cross_melody)  # text by cross-attention: not MusicgenMelody's


def test_to_transformers_refuses_what_it_cannot_hold():
    musicgen = versions.load_musicgen("tiny", "cpu").musicgen
    with pytest.raises(ValueError, match="lookup table|not the T5"):
        tf.to_transformers(musicgen.lm, musicgen.compression_model)


def test_save_never_replaces_a_folder_that_is_not_an_export(models, tmp_path):
    musicgen = models["text"]
    hf = tf.to_transformers(musicgen.lm, musicgen.compression_model)
    taken = tmp_path / "out"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tf.save_transformers(hf, taken)
    assert (taken / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind
    first = tf.save_transformers(hf, tmp_path / "hf")
    again = tf.save_transformers(hf, tmp_path / "hf")  # an earlier export is replaced
    assert first == again and tf.is_transformers_folder(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_is_transformers_folder(tmp_path):
    assert not tf.is_transformers_folder(tiny.ensure_tiny("tiny"))  # audiocraft's checkpoint format
    (tmp_path / "config.json").write_text("{not json")
    assert not tf.is_transformers_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert not tf.is_transformers_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "musicgen_melody"}))
    assert tf.is_transformers_folder(tmp_path)


@pytest.mark.parametrize("family", ["text", "stereo", "melody"])
def test_our_export_loads_and_generates_in_transformers(models, family, tmp_path):
    """What a user of the export runs: `from_pretrained` of the folder, its processor, `generate`, audio out."""
    from transformers import AutoProcessor

    musicgen = models[family]
    hf = tf.to_transformers(musicgen.lm, musicgen.compression_model)
    folder = tf.save_transformers(hf, tmp_path / "hf", tokenizer=tf.text_tokenizer(musicgen.lm))
    model = tf._load_model(folder)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=["lofi beat"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    audio = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    channels = 2 if family == "stereo" else 1
    assert audio.shape[:2] == (1, channels) and audio.shape[-1] > 0 and torch.isfinite(audio).all()
