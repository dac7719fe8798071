"""MusicGen-Style's conditioner and loader (core/style.py): real checkpoint layout, tiny-style model, double CFG."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch
from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

from core import style, tiny, versions
from tests.helpers import ROOT, tone

KEYS_FILE = ROOT / "tests" / "data" / "musicgen_style_keys.json"
SR = 32000


@pytest.fixture(scope="module")
def real_layout() -> dict:
    return json.loads(KEYS_FILE.read_text())


@pytest.fixture(scope="module")
def model():
    return versions.load_musicgen("tiny-style", device="cpu").musicgen


def wav_condition(seconds: float, freq: float = 220.0, seed: int = 0) -> WavCondition:
    wav = torch.from_numpy(tone(seconds, SR, 1, freq=freq, seed=seed).T.copy())[None]  # [1, 1, T]
    return WavCondition(wav, torch.tensor([wav.shape[-1]]), sample_rate=[SR], path=[None], seek_time=[None])


def attributes(text: str | None, wav: WavCondition | None) -> ConditioningAttributes:
    if wav is None:
        wav = WavCondition(torch.zeros(1, 1, 1), torch.tensor([0]), sample_rate=[SR], path=[None], seek_time=[None])
    return ConditioningAttributes(text={"description": text}, wav={"self_wav": wav})


def test_real_checkpoint_layout_loads_into_our_conditioner(real_layout):
    """The names and shapes of facebook/musicgen-style's style conditioner (from audiocraft's public source) are
    exactly those of our conditioner built from the same config, and such a state dict loads strictly."""
    cfg = real_layout["conditioner"]["style"]
    assert cfg["model_name"] == "mert"  # MERT is not in the state dict: a stand-in with its output size is enough
    extractor = (style.TinyFeatureExtractor(dim=style.MERT_DIM), style.MERT_DIM)
    conditioner = style.build_style_conditioner(cfg, real_layout["lm_dim"], "cpu", feature_extractor=extractor)
    ours = [[k, list(v.shape)] for k, v in conditioner.state_dict().items()]
    assert ours == real_layout["keys"]

    generator = torch.Generator().manual_seed(0)
    checkpoint = {k: torch.randn(shape, generator=generator) for k, shape in real_layout["keys"]}
    checkpoint.update({k: torch.ones(1) for k, _ in real_layout["keys"] if k.endswith("inited")})
    checkpoint["batch_norm.num_batches_tracked"] = torch.tensor(1000)
    conditioner.load_state_dict(checkpoint, strict=True)
    assert torch.equal(conditioner.rvq.vq.layers[5]._codebook.embed, checkpoint["rvq.vq.layers.5._codebook.embed"])
    assert torch.equal(
        conditioner.transformer.layers[7].linear2.weight, checkpoint["transformer.layers.7.linear2.weight"]
    )


def test_real_layout_inside_the_lm(real_layout):
    """Through our LM builder (audiocraft's builders + the hook) the conditioner sits where the checkpoint has it:
    every `condition_provider.conditioners.self_wav.*` name and shape, nothing more or less; no cross-attention."""
    cfg = copy.deepcopy(tiny.lm_cfg("tiny"))
    cfg["transformer_lm"].update(dim=real_layout["lm_dim"], num_heads=24, num_layers=1, card=64)
    cfg["fuser"].update(real_layout["fuser"])
    cfg["conditioners"] = {
        "self_wav": copy.deepcopy(real_layout["conditioner"]),
        "description": {"model": "lut", "lut": {"n_bins": 16, "dim": 16, "tokenizer": "noop", "pad_idx": 0}},
    }
    assert style.is_style_cfg(cfg) and not style.is_style_cfg(tiny.lm_cfg("tiny"))
    lm = style.build_style_lm(cfg, feature_extractor=(style.TinyFeatureExtractor(dim=768), 768))
    prefix = real_layout["prefix"]
    ours = [[k[len(prefix) :], list(v.shape)] for k, v in lm.state_dict().items() if k.startswith(prefix)]
    assert ours == real_layout["keys"]
    assert not any("cross_attention" in k for k in lm.state_dict())
    assert list(lm.condition_provider.conditioners) == ["self_wav", "description"]


def test_missing_mert_is_a_clear_error(real_layout, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(versions.ModelUnavailableError) as err:
        style.build_style_conditioner(real_layout["conditioner"]["style"], 1536, "cpu")
    assert style.MERT_NAME in str(err.value) and "Hugging Face cache" in str(err.value)


def test_missing_style_checkpoint_is_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(versions.ModelUnavailableError) as err:
        versions.load_musicgen("style", device="cpu")
    message = str(err.value)
    assert "'style'" in message and "facebook/musicgen-style" in message
    assert "Hugging Face cache" in message and "local folder" in message and "network" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_tiny_style_is_a_checkpoint_folder_loaded_by_our_loader(model, tmp_path):
    folder = tiny.ensure_tiny("tiny-style")
    assert (folder / "state_dict.bin").is_file() and (folder / "compression_state_dict.bin").is_file()
    assert isinstance(model.lm, style.StyleLMModel) and not model.lm.training
    assert set(style.style_conditioners(model.lm)) == {"self_wav"}
    assert model.sample_rate == SR and model.frame_rate == 50 and model.max_duration == 30
    # Deterministic build, and a copy of the folder loads as a local model through the same (strict) loader.
    tiny._build("tiny-style", tmp_path)
    a = torch.load(folder / "state_dict.bin", weights_only=True)["best_state"]
    b = torch.load(tmp_path / "state_dict.bin", weights_only=True)["best_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    copy_dir = tmp_path / "copy"
    shutil.copytree(folder, copy_dir)
    again = versions.load_musicgen(str(copy_dir), device="cpu").musicgen
    assert isinstance(again.lm, style.StyleLMModel)
    assert all(torch.equal(v, again.lm.state_dict()[k]) for k, v in model.lm.state_dict().items())
    # The regular models still go through audiocraft's own loader.
    assert not versions.is_style_source(versions.resolve("tiny"))


def condition(lm, attrs: list[ConditioningAttributes], seed: int = 0) -> dict:
    random.seed(seed)  # the excerpt start
    with torch.no_grad():
        return lm.condition_provider(lm.condition_provider.tokenize(attrs))


def test_style_condition_changes_the_logits(model):
    lm = model.lm
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, 20), generator=torch.Generator().manual_seed(1))

    def logits(attrs):
        tensors = condition(lm, [attrs])
        with torch.no_grad():
            return lm(codes, conditions=[], condition_tensors=tensors)

    text_only = logits(attributes("lofi beat", None))
    style_a = logits(attributes("lofi beat", wav_condition(4.0, 220.0)))
    style_b = logits(attributes("lofi beat", wav_condition(4.0, 330.0, seed=5)))
    again_a = logits(attributes("lofi beat", wav_condition(4.0, 220.0)))
    assert torch.isfinite(style_a).all()
    assert not torch.allclose(text_only, style_a, atol=1e-4)
    assert not torch.allclose(style_a, style_b, atol=1e-4)
    assert torch.equal(style_a, again_a)


def test_eval_q_changes_the_condition(model):
    conditioner = model.lm.condition_provider.conditioners["self_wav"]
    wav = conditioner.tokenize(wav_condition(4.0))
    outputs = []
    try:
        for eval_q in range(1, 7):
            conditioner.set_params(eval_q=eval_q, excerpt_length=3.0)
            random.seed(3)
            with torch.no_grad():
                embeds, mask = conditioner(wav)
            outputs.append(embeds)
        # 3 s at 24 kHz -> 224 feature frames at 75 Hz -> every 15th: 15 steps (5 Hz), all valid.
        assert embeds.shape == (1, 15, model.lm.dim) and mask.bool().all()
        for i in range(6):
            for j in range(i + 1, 6):
                assert not torch.allclose(outputs[i], outputs[j], atol=1e-6), (i + 1, j + 1)
        random.seed(3)
        with torch.no_grad():
            assert torch.equal(conditioner(wav)[0], outputs[-1])
        with pytest.raises(ValueError, match="eval_q"):
            conditioner.set_params(eval_q=7)
    finally:
        conditioner.set_params(eval_q=3, excerpt_length=3.0)


def test_excerpt_length_and_null_condition(model):
    conditioner = model.lm.condition_provider.conditioners["self_wav"]
    try:
        conditioner.set_params(excerpt_length=1.5)
        random.seed(0)
        with torch.no_grad():
            embeds, _ = conditioner(conditioner.tokenize(wav_condition(2.0)))
        assert embeds.shape[1] == 8  # 1.5 s -> 112 feature frames -> 8 steps
        start, length = conditioner.last_excerpt
        assert length == int(1.5 * SR) and 0 <= start <= 2 * SR - length
        conditioner.set_params(excerpt_length=4.5)
        with pytest.raises(ValueError, match="longer than the style audio"):
            conditioner(conditioner.tokenize(wav_condition(2.0)))
    finally:
        conditioner.set_params(excerpt_length=3.0)
    # A batch of null conditions: masked out entirely.
    null = attributes(None, None).wav["self_wav"]
    embeds, mask = conditioner(conditioner.tokenize(null))
    assert not mask.any() and not embeds.any()


def test_double_cfg_reduces_to_single_cfg_when_beta_is_1():
    g = torch.Generator().manual_seed(0)
    cond, sty, null = (torch.randn(2, 4, 3, 256, generator=g) for _ in range(3))
    single = null + (cond - null) * 3.0  # audiocraft's LMModel._sample_next_token
    assert torch.equal(style.double_cfg_logits(cond, sty, null, 3.0, 1.0), single)
    paper = null + 3.0 * (sty + 5.0 * (cond - sty) - null)  # arXiv 2407.12563, section 4.3
    assert torch.allclose(style.double_cfg_logits(cond, sty, null, 3.0, 5.0), paper, atol=1e-4)
    assert not torch.allclose(style.double_cfg_logits(cond, sty, null, 3.0, 5.0), single, atol=1e-2)


def test_frozen_conditioner_for_fine_tuning(tmp_path):
    lm = style.load_style_lm(tiny.ensure_tiny("tiny-style"), "cpu")
    conditioner = style.freeze_style_conditioners(lm)["self_wav"]
    before = {k: v.clone() for k, v in conditioner.state_dict().items()}
    lm.train()
    assert conditioner.training and not conditioner.rvq.training and not conditioner.batch_norm.training
    assert not any(p.requires_grad for p in conditioner.parameters())
    assert any(p.requires_grad for p in lm.transformer.parameters())
    wav = conditioner.tokenize(wav_condition(10.0))
    lengths = set()
    for seed in range(6):
        random.seed(seed)
        torch.manual_seed(seed)
        conditioner(wav)
        start, length = conditioner.last_excerpt
        assert 1.5 * SR <= length <= 4.5 * SR and start + length <= 10 * SR
        lengths.add(length)
        mask = conditioner.excerpt_mask(1, 500)  # 10 s of 50 Hz frames
        first = start // 640
        assert mask.shape == (1, 4, 500) and not mask[:, :, first].any() and mask[:, :, :first].all()
        assert (~mask).sum() == 4 * (length // 640)
    assert len(lengths) > 1  # a random excerpt length per step
    after = conditioner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BatchNorm / codebook updates
