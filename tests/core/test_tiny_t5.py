"""tiny-t5: a tiny MusicGen with audiocraft's real T5Conditioner, whose `t5-base` comes from a tiny T5 in the model
folder's own Hugging Face cache; and the T5 trigger vocabulary of textual inversion (core/adapters.py)."""

from __future__ import annotations

import pytest
import torch

from core import adapters, tiny, versions


@pytest.fixture(scope="module")
def model():
    return versions.load_musicgen("tiny-t5", "cpu").musicgen


def text_conditioner(model):
    return model.lm.condition_provider.conditioners["description"]


def encode(conditioner, prompts):
    """`[B, T, dim]` conditioning, `[B, T]` mask, as the LM receives them."""
    with torch.no_grad():
        return conditioner(conditioner.tokenize(prompts))


def test_tiny_t5_loads_t5_base_from_its_own_cache_offline(model):
    from audiocraft.modules.conditioners import T5Conditioner
    from huggingface_hub import constants

    folder = tiny.ensure_tiny("tiny-t5")
    repo = folder / tiny.T5_HUB_DIR / "models--t5-base"
    revision = (repo / "refs" / "main").read_text()
    snapshot_files = {p.name for p in (repo / "snapshots" / revision).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= snapshot_files
    conditioner = text_conditioner(model)
    assert isinstance(conditioner, T5Conditioner) and conditioner.name == "t5-base" and not conditioner.finetune
    assert conditioner.t5.config.d_model == 768 and conditioner.t5.config.num_layers == 2
    assert len(conditioner.t5_tokenizer) == conditioner.t5.config.vocab_size < 1000
    # the load switched the hub cache for itself only
    assert str(folder / tiny.T5_HUB_DIR) != constants.HF_HUB_CACHE
    embeds, mask = encode(conditioner, ["calm piano", None])
    assert embeds.shape[-1] == 64 and mask[1].sum() == 0 and (embeds[1] == 0).all()
    model.set_generation_params(duration=0.3, top_k=50)
    assert model.generate(["lofi beat"]).shape == (1, 1, 9600)


def test_tiny_t5_is_deterministic(tmp_path):
    a = tiny.save_t5_hub(tmp_path / "a")
    b = tiny.save_t5_hub(tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert a.name == b.name  # the revision is derived from the build inputs


def test_a_new_t5_trigger_starts_as_the_base_encoding(model):
    base = versions.load_musicgen("tiny-t5", "cpu").musicgen
    conditioner, reference = text_conditioner(model), text_conditioner(base)
    # fresh conditioners for each trigger: reuse the loaded T5 (frozen) on a copy of the module
    import copy

    for trigger in ("zzq", "Neon Dust-7", "ß∂"):
        fresh = copy.deepcopy(conditioner)
        pieces = fresh.t5_tokenizer(trigger, add_special_tokens=False)["input_ids"]
        tokens = adapters.add_t5_trigger(fresh, trigger)
        assert len(tokens) == max(1, len(pieces)) and fresh.trigger_embedding.shape == (len(tokens), 768)
        prompt = f"{trigger} calm piano"
        ids = fresh.tokenize([prompt])["input_ids"][0].tolist()
        first = fresh.trigger_first_id
        assert ids[: len(tokens)] == list(range(first, first + len(tokens)))
        if pieces:  # initialized from the trigger's own pieces: the same encoding as before
            assert torch.equal(encode(fresh, [prompt])[0], encode(reference, [prompt])[0])
        # other prompts take audiocraft's path, untouched
        assert torch.equal(encode(fresh, ["calm piano"])[0], encode(reference, ["calm piano"])[0])
    fresh = copy.deepcopy(conditioner)
    adapters.add_t5_trigger(fresh, "zzq")
    first = fresh.trigger_first_id
    has_trigger = [
        first in ids
        for ids in fresh.tokenize(["ZZQ calm", "calm zzq, piano", "zzqx calm", "a-zzq"])["input_ids"].tolist()
    ]
    assert has_trigger == [True, True, False, True]  # whole word, any case; `-` is not part of a word
    with pytest.raises(ValueError, match="already has a trigger"):
        adapters.add_t5_trigger(fresh, "other")


def test_gradients_reach_only_the_trigger_rows(model):
    import copy

    conditioner = copy.deepcopy(text_conditioner(model))
    adapters.add_t5_trigger(conditioner, "zzq")
    conditioner.train()
    embeds, mask = conditioner(conditioner.tokenize(["zzq calm piano", "soft drums"]))
    (embeds * torch.linspace(-1, 1, embeds.shape[-1])).sum().backward()
    grad = conditioner.trigger_embedding.grad
    assert grad is not None and grad.abs().sum(dim=1).min() > 0  # every new row
    assert all(p.grad is None and not p.requires_grad for p in conditioner.t5.parameters())
    # a batch without the trigger keeps the rows in the graph (zero gradient), as DDP needs
    conditioner.trigger_embedding.grad = None
    conditioner(conditioner.tokenize(["soft drums"]))[0].sum().backward()
    assert torch.equal(conditioner.trigger_embedding.grad, torch.zeros_like(conditioner.trigger_embedding))
