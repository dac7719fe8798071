"""The fast generation path against audiocraft's own `LMModel.generate`, on the real tiny models.

In fp32 with the same seed the tokens must be identical (sampling with top-k, with top-p, greedy; with and without
a prompt; batch 2; mono, interleaved stereo, melody with a prepended chroma condition). The quantized paths must run
and stay close (KL of next-token distributions).
"""

from __future__ import annotations

import functools
import logging
import random

import pytest
import torch
from audiocraft.modules.conditioners import ConditioningAttributes

from bench.kl import next_token_kl
from core.versions import load_musicgen
from generation.fast import FastLM, FastSampler, Int8Linear, generate_tokens, unsupported_reason
from tests.helpers import tone

GEN_LEN = 40  # frames (0.8 s at 50 Hz): enough steps for the delay pattern, the prompt region and divergence
SEED = 17


@functools.cache
def tiny_model(name: str):
    """Loaded once per test session; tests that change weights load their own copy."""
    return load_musicgen(name, "cpu").musicgen


def attributes(model, n: int, melody: bool = False) -> list[ConditioningAttributes]:
    """What MusicGen builds for `n` descriptions; for melody models sample 0 has no melody, the others a tone."""
    descriptions = [f"tiny test song {i}, 120 bpm" for i in range(n)]
    melodies = None
    if melody:
        wav = torch.from_numpy(tone(1.5, sr=model.sample_rate)).T  # [C, T]
        melodies = [None] + [wav] * (n - 1)
        attrs, _ = model._prepare_tokens_and_attributes(descriptions, None, melody_wavs=melodies)
    else:
        attrs, _ = model._prepare_tokens_and_attributes(descriptions, None)
    return attrs


def seeded(fn):
    torch.manual_seed(SEED)
    random.seed(SEED)  # demucs (melody chroma) shifts with Python's random
    return fn()


SETTINGS = {
    "top_k": dict(use_sampling=True, top_k=50, top_p=0.0, temp=1.0),
    "top_p": dict(use_sampling=True, top_k=0, top_p=0.8, temp=0.9),
    "greedy": dict(use_sampling=False, top_k=0, top_p=0.0, temp=1.0),
}


def both(model, attrs, prompt, setting: str, cfg_coef: float = 3.0):
    lm = model.lm
    kw = SETTINGS[setting]
    ours = seeded(lambda: generate_tokens(lm, attrs, prompt, GEN_LEN, cfg_coef=cfg_coef, **kw))
    theirs = seeded(lambda: lm.generate(prompt, attrs, max_gen_len=GEN_LEN, cfg_coef=cfg_coef, **kw))
    return ours, theirs


@pytest.mark.parametrize("name", ["tiny", "tiny-stereo", "tiny-melody"])
@pytest.mark.parametrize("setting", ["top_k", "top_p", "greedy"])
@pytest.mark.parametrize("with_prompt", [False, True], ids=["no-prompt", "prompt"])
def test_identical_tokens_to_audiocraft(name, setting, with_prompt):
    model = tiny_model(name)
    lm = model.lm
    assert unsupported_reason(lm) is None
    # tiny-melody: no melody here (its chroma, ~940 frames, is still prepended); a real one in the next test.
    attrs = attributes(model, 2)
    prompt = None
    if with_prompt:
        gen = torch.Generator().manual_seed(3)
        prompt = torch.randint(0, lm.card, (2, lm.num_codebooks, 9), generator=gen)
    ours, theirs = both(model, attrs, prompt, setting)
    assert ours.shape == theirs.shape == (2, lm.num_codebooks, GEN_LEN)
    assert ours.dtype == torch.long
    assert torch.equal(ours, theirs)
    assert ((ours >= 0) & (ours < lm.card)).all()
    if prompt is not None:
        assert torch.equal(ours[..., :9], prompt)
    # The two samples differ (different conditions / random draws): the comparison is not trivially equal.
    assert not torch.equal(ours[0], ours[1])


@pytest.mark.slow  # demucs + chroma on the melody: ~40 s on 2 busy cores
def test_melody_identical_and_used():
    """With a real melody (demucs + chroma, prepended) the tokens are still identical, and the melody matters."""
    model = tiny_model("tiny-melody")
    with_melody = attributes(model, 2, melody=True)  # sample 0 without, sample 1 with a melody
    ours, theirs = both(model, with_melody, None, "top_k")
    assert torch.equal(ours, theirs)
    without = attributes(model, 2, melody=False)
    plain = seeded(lambda: generate_tokens(model.lm, without, None, GEN_LEN, **SETTINGS["top_k"]))
    assert torch.equal(plain[0], ours[0])  # same condition, same random draws
    assert not torch.equal(plain[1], ours[1])


def test_callback_and_defaults_match_audiocraft():
    model = tiny_model("tiny")
    lm = model.lm
    attrs = attributes(model, 1)
    ours_calls: list[tuple[int, int]] = []
    theirs_calls: list[tuple[int, int]] = []
    ours = seeded(
        lambda: generate_tokens(
            lm, attrs, None, GEN_LEN, cfg_coef=None, callback=lambda a, b: ours_calls.append((a, b))
        )
    )
    theirs = seeded(
        lambda: lm.generate(None, attrs, max_gen_len=GEN_LEN, callback=lambda a, b: theirs_calls.append((a, b)))
    )
    assert torch.equal(ours, theirs)  # cfg_coef=None takes the LM's own coefficient, top_k 250 <= card 256
    assert ours_calls == theirs_calls
    assert ours_calls[-1] == (GEN_LEN + 3, GEN_LEN + 3)  # delays [0, 1, 2, 3] add 3 steps


def test_prepared_model_reused_and_sees_weight_updates():
    """A FastLM in fp32 holds the LM's own parameters: in-place updates (training) are seen by the next call."""
    model = load_musicgen("tiny", "cpu").musicgen  # a private copy: its weights get changed here
    lm = model.lm
    fast = FastLM.from_lm(lm)
    attrs = attributes(model, 2)
    before = seeded(lambda: generate_tokens(fast, attrs, None, GEN_LEN, top_k=50))
    with torch.no_grad():
        lm.transformer.layers[0].linear1.weight.mul_(3.0)
        lm.linears[0].weight.add_(0.05)
    after = seeded(lambda: generate_tokens(fast, attrs, None, GEN_LEN, top_k=50))
    theirs = seeded(lambda: lm.generate(None, attrs, max_gen_len=GEN_LEN, top_k=50, cfg_coef=3.0))
    assert torch.equal(after, theirs)
    assert not torch.equal(before, after)


def test_sampler_has_the_generate_call_shape():
    model = tiny_model("tiny-stereo")
    lm = model.lm
    sampler = FastSampler(quantize=None)
    attrs = attributes(model, 2)
    params = dict(use_sampling=True, temp=1.0, top_k=100, top_p=0.0, cfg_coef=3.0, two_step_cfg=False)
    ours = seeded(lambda: sampler(lm, None, attrs, max_gen_len=GEN_LEN, callback=None, **params))
    theirs = seeded(lambda: lm.generate(None, attrs, max_gen_len=GEN_LEN, callback=None, **params))
    assert torch.equal(ours, theirs)
    assert sampler.prepare(lm) is sampler.prepare(lm)  # prepared once per LM


def test_int8_linear_matches_float_linear_on_bare_in_proj():
    """audiocraft's attention applies `in_proj_weight` with F.linear: our int8 linear covers it."""
    lm = tiny_model("tiny").lm
    attn = lm.transformer.layers[0].self_attn
    weight = attn.in_proj_weight.detach()
    lin = Int8Linear(weight, None)
    x = torch.randn(4, 3, weight.shape[1])
    ref = torch.nn.functional.linear(x, weight)
    out = lin(x)
    assert out.shape == ref.shape == (4, 3, weight.shape[0])
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, rel
    # Per-channel weights: the dequantized weight is within half a step of the original everywhere.
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((lin.dequantized_weight() - weight).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize(
    ("name", "quantize"), [("tiny", "int8"), ("tiny-stereo", "int8"), ("tiny-melody", "int8"), ("tiny-melody", "bf16")]
)
def test_quantized_paths_run_and_stay_close(name, quantize):
    """tiny-melody + bf16 guards the positions past 256 (the prepended chroma), which bf16 cannot represent."""
    model = tiny_model(name)
    lm = model.lm
    attrs = attributes(model, 2)
    fast = FastLM(lm, quantize)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, lm.card, (2, lm.num_codebooks, 6), generator=gen)
    tokens = seeded(lambda: generate_tokens(fast, attrs, prompt, GEN_LEN, top_k=50))
    assert tokens.shape == (2, lm.num_codebooks, GEN_LEN)
    assert ((tokens >= 0) & (tokens < lm.card)).all()
    assert torch.equal(tokens[..., :6], prompt)
    gap = seeded(lambda: next_token_kl(lm, attrs, 60, fast, prompt_tokens=prompt, top_k=50))
    assert gap.quantize == quantize
    assert gap.steps == 60 + 3 - 6
    assert gap.tokens > 0
    assert 0.0 <= gap.kl_mean < 0.01, gap
    assert gap.top1_agreement > 0.85, gap
    assert gap.ref_entropy > 0.5  # the distributions compared are not degenerate


def test_kl_detects_a_different_model():
    """The KL measurement is not trivially small: a model with perturbed weights is far away."""
    model = load_musicgen("tiny", "cpu").musicgen
    lm = model.lm
    attrs = attributes(model, 1)
    ref = FastLM(lm, None)
    other = load_musicgen("tiny", "cpu").lm
    with torch.no_grad():
        for p in other.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gap = seeded(lambda: next_token_kl(lm, attrs, 40, FastLM(other, "bf16"), reference=ref))
    assert gap.kl_mean > 0.01, gap


def test_unsupported_configuration_falls_back_to_audiocraft(caplog):
    model = load_musicgen("tiny", "cpu").musicgen
    lm = model.lm
    lm.two_step_cfg = True
    assert unsupported_reason(lm) == "two_step_cfg"
    attrs = attributes(model, 2)
    with caplog.at_level(logging.WARNING, logger="generation.fast"):
        ours = seeded(lambda: generate_tokens(lm, attrs, None, GEN_LEN, top_k=50))
    assert "two_step_cfg" in caplog.text
    theirs = seeded(lambda: lm.generate(None, attrs, max_gen_len=GEN_LEN, top_k=50, cfg_coef=3.0))
    assert torch.equal(ours, theirs)
    with pytest.raises(NotImplementedError, match="two_step_cfg"):
        FastLM(lm)
    # An LM class with its own generation (MusicGen-Style's double CFG) is never taken over.
    assert "overrides LMModel.generate" in unsupported_reason(tiny_model("tiny-style").lm)


def test_bad_inputs_are_named():
    model = tiny_model("tiny")
    lm = model.lm
    attrs = attributes(model, 2)
    with pytest.raises(ValueError, match="top_k"):
        generate_tokens(lm, attrs, None, GEN_LEN, top_k=lm.card + 1)
    with pytest.raises(ValueError, match="max_gen_len"):
        generate_tokens(lm, attrs, torch.zeros(2, lm.num_codebooks, GEN_LEN, dtype=torch.long), GEN_LEN)
    with pytest.raises(ValueError, match="attributes for 3 prompts"):
        generate_tokens(lm, attrs, torch.zeros(3, lm.num_codebooks, 4, dtype=torch.long), GEN_LEN)
    with pytest.raises(ValueError, match="prompt_tokens"):
        generate_tokens(lm, attrs, torch.zeros(2, lm.num_codebooks + 1, 4, dtype=torch.long), GEN_LEN)
    with pytest.raises(ValueError, match="quantize"):
        FastLM(lm, "int4")
    with pytest.raises(ValueError, match="prepared with quantize=None"):
        generate_tokens(FastLM(lm), attrs, None, GEN_LEN, quantize="int8")


def test_unconditional_scratch_lm_identical():
    """The trainer's from-scratch LM (no conditioners, so no guidance batch): identical tokens too."""
    from types import SimpleNamespace

    from audiocraft.models import builders
    from omegaconf import OmegaConf

    from training.methods.scratch import scratch_lm_cfg

    cfg = scratch_lm_cfg(SimpleNamespace(lm_dim=64, lm_heads=2, lm_layers=2), n_q=4, card=256)
    torch.manual_seed(0)
    lm = builders.get_lm_model(OmegaConf.create(cfg)).eval()
    attrs = [ConditioningAttributes(text={"description": "ignored"}) for _ in range(2)]
    for setting in ("top_k", "greedy"):
        kw = SETTINGS[setting]
        ours = seeded(lambda kw=kw: generate_tokens(lm, attrs, None, GEN_LEN, cfg_coef=None, **kw))
        theirs = seeded(lambda kw=kw: lm.generate(None, attrs, max_gen_len=GEN_LEN, **kw))
        assert torch.equal(ours, theirs)
        assert ours.shape == (2, 4, GEN_LEN)
    ours = seeded(lambda: generate_tokens(lm, [], None, GEN_LEN, top_k=50, quantize="int8"))
    assert ours.shape == (1, 4, GEN_LEN)


def test_lora_wrapped_lm_is_read_through_its_adapters():
    """A LoRA LM as training leaves it (core.adapters: wrapped linears, adapted in_proj_weight): the fast path reads
    the adapted weights (identical tokens to audiocraft's generate through the wrappers), and touches nothing."""
    from core.adapters import add_lora, lora_target_names

    model = load_musicgen("tiny", "cpu").musicgen  # a private copy: adapters are added to it
    lm = model.lm
    attrs = attributes(model, 2)
    base = seeded(lambda: generate_tokens(lm, attrs, None, GEN_LEN, top_k=50))
    add_lora(lm, lora_target_names(lm), rank=4, alpha=8.0)
    with torch.no_grad():  # B starts at zero (= the base model): give every adapter a real update
        for name, p in lm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.5 * torch.randn_like(p))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    ours = seeded(lambda: generate_tokens(lm, attrs, None, GEN_LEN, top_k=50))
    theirs = seeded(lambda: lm.generate(None, attrs, max_gen_len=GEN_LEN, top_k=50, cfg_coef=3.0))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base)  # the adapters change the music: the equality above is not the base model's
    quantized = seeded(lambda: generate_tokens(lm, attrs, None, GEN_LEN, top_k=50, quantize="int8"))
    assert quantized.shape == ours.shape
    gap = seeded(lambda: next_token_kl(lm, attrs, 40, "int8", top_k=50))
    assert gap.kl_mean < 0.01, gap  # the int8 copy holds the adapted weights too
    after = lm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
