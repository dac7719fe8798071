"""method=lora on the tiny models: only adapters train (q/k/v inside audiocraft's bare in_proj_weight too), the loss
falls, the tar holds the adapter and references the base, predict applies it, merged = unmerged logits, and the
adapter tar is a few percent of a full export."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import numpy as np
import pytest
import torch

from core import adapters, tiny, weights
from core.params import InputError, from_kwargs
from core.versions import load_musicgen
from generation.generate import Generator
from generation.params import PredictParams
from preprocessing import load_prepared
from tests.helpers import reported_problem
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.dist import DistInfo
from training.params import TrainParams
from training.run import check_inputs, run_training, run_worker, setup_training

pytestmark = pytest.mark.usefixtures("keep_global_random_state")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_data")
    return make_prepared(
        root / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "calm piano", "genre": "jazz"},
            {"seconds": 2.0, "freq": 330.0, "description": "fast drums", "genre": "rock"},
        ],
    )


@pytest.fixture(scope="module")
def lora_run(dataset, tmp_path_factory):
    """One real LoRA run: tiny model, 20 steps, AdamW (LoRA's usual optimizer), rank 8."""
    out = tmp_path_factory.mktemp("lora_out")
    params = tiny_params(
        dataset,
        method="lora",
        lora_rank=8,
        lora_alpha=16.0,
        optimizer="adamw",
        lr=3e-3,
        warmup=2,
        epochs=1,
        updates_per_epoch=20,
        save_every=20,
        cfg_p=0.0,
    )
    tar = run_training(params, out)
    return {"params": params, "out": out, "tar": tar}


def logits_of(lm, attributes, codes):
    lm.eval()
    with torch.no_grad():
        tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        out = lm.compute_predictions(codes, [], tensors)
    return torch.where(out.mask[..., None], out.logits, torch.zeros_like(out.logits))


def test_only_adapter_parameters_train(dataset, tmp_path):
    params = tiny_params(dataset, method="lora", lora_targets="q,k,v,out_proj,linear1,linear2,linears.*")
    setup = setup_training(params, load_prepared(dataset), tmp_path, DistInfo())
    lm = setup.model.lm
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(adapters.is_adapter_key(n) for n in trainable)
    # q, k and v of the bare in_proj_weight of both attentions of every layer, and the Linear targets
    for i in range(2):
        for attn in ("self_attn", "cross_attention"):
            for part in "qkv":
                assert f"transformer.layers.{i}.{attn}.in_proj_lora.{part}.lora_A" in trainable
            assert f"transformer.layers.{i}.{attn}.out_proj.lora_B" in trainable
        assert f"transformer.layers.{i}.linear1.lora_A" in trainable
    assert "linears.3.lora_A" in trainable
    # base weights keep their keys and stay frozen; the adapted model starts equal to the base
    base = load_musicgen("tiny", "cpu").lm
    assert set(base.state_dict()) <= set(lm.state_dict())
    assert not lm.transformer.layers[0].self_attn._parameters["in_proj_weight"].requires_grad
    batch = setup.tokens.make_batch([(0, 0), (1, 0)])
    adapted, plain = (logits_of(m, batch.attributes, batch.codes) for m in (lm, base))
    torch.testing.assert_close(adapted, plain)


def test_loss_falls_and_the_tar_holds_only_the_adapter(lora_run):
    history = ckpt.load_checkpoint(ckpt.find_checkpoint(lora_run["out"] / "checkpoints"))["history"]
    losses = [h["loss"] for h in history]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
    with tarfile.open(lora_run["tar"]) as archive:
        names = set(archive.getnames())
        info = json.load(archive.extractfile("finetune.json"))
        lm_pkg = torch.load(archive.extractfile("state_dict.bin"), weights_only=True)
        config = json.load(archive.extractfile(adapters.ADAPTER_CONFIG_FILE))
    assert {adapters.ADAPTER_FILE, adapters.ADAPTER_CONFIG_FILE, "finetune.json"} <= names
    assert lm_pkg["best_state"] == {}  # the base is referenced, not copied
    assert info["method"] == "lora" and info["base_model"] == "tiny" and info["adapter"]["merged"] is False
    assert config["rank"] == 8 and config["alpha"] == 16.0 and len(config["targets"]) == 20


def test_predict_applies_the_adapter_and_merged_equals_unmerged(lora_run, dataset):
    tar = lora_run["tar"]
    merged = weights.load_trained_model(tar, device="cpu").musicgen  # what predict.py loads: base + adapter merged
    base = load_musicgen("tiny", "cpu").musicgen
    unmerged = load_musicgen("tiny", "cpu").musicgen
    adapters.apply_lora_files(unmerged.lm, weights.unpack(tar), merge=False)
    assert any(isinstance(m, adapters.LoRALinear) for m in unmerged.lm.modules())
    assert not any(isinstance(m, adapters.LoRALinear) for m in merged.lm.modules())
    from audiocraft.modules.conditioners import ConditioningAttributes

    codes = torch.randint(0, tiny.CARD, (2, 4, 40), generator=torch.Generator().manual_seed(0))
    attributes = [ConditioningAttributes(text={"description": d}) for d in ("calm piano", None)]
    a, b = logits_of(merged.lm, attributes, codes), logits_of(unmerged.lm, attributes, codes)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - logits_of(base.lm, attributes, codes)).abs().max() > 1e-2  # the adapter changed the model

    # predict's Generator, by weights path
    request = from_kwargs(PredictParams, replicate_weights=str(tar), prompt="calm piano", duration=1, seed=3)
    result = Generator(device="cpu").generate(request, progress=False)
    assert result.wav.shape == (1, 32000) and torch.isfinite(result.wav).all()


def test_lora_merge_exports_the_full_model(dataset, tmp_path, lora_run):
    """lora_merge=true: the same training as `lora_run` (same inputs and seed: the same adapter) exported as a full
    LM. audiocraft's own loader reads it and predicts what our loader's base + adapter (lora_run's tar) predicts."""
    params = dataclasses.replace(lora_run["params"], lora_merge=True, save_every=0, sample_duration=0.0)
    tar = run_training(params, tmp_path / "out")
    with tarfile.open(tar) as archive:
        names = set(archive.getnames())
        info = json.load(archive.extractfile("finetune.json"))
    assert adapters.ADAPTER_FILE not in names and info["adapter"]["merged"] is True
    model = weights.load_trained_model(tar, device="cpu").musicgen  # an ordinary full export (audiocraft-loadable)
    from audiocraft.models import MusicGen
    from audiocraft.modules.conditioners import ConditioningAttributes

    plain = MusicGen.get_pretrained(str(weights.unpack(tar)), device="cpu")
    base = load_musicgen("tiny", "cpu").lm.state_dict()
    state = model.lm.state_dict()
    assert set(state) == set(base)
    changed = [k for k in base if not torch.equal(base[k].half().float(), state[k].float())]
    assert any(k.endswith("in_proj_weight") for k in changed) and any(k.endswith("linear1.weight") for k in changed)
    assert not any("linears" in k or "emb" in k for k in changed)  # not targeted: untouched

    # base (fp32) + the fp16 adapter, merged
    adapted = weights.load_trained_model(lora_run["tar"], device="cpu").musicgen
    unmerged = load_musicgen("tiny", "cpu").musicgen  # the adapter modules as in training (no fold of the weights)
    adapters.apply_lora_files(unmerged.lm, weights.unpack(lora_run["tar"]), merge=False)
    codes = torch.randint(0, tiny.CARD, (2, 4, 40), generator=torch.Generator().manual_seed(1))
    attributes = [ConditioningAttributes(text={"description": d}) for d in ("calm piano", "fast drums")]
    theirs = logits_of(plain.lm, attributes, codes)
    untrained = logits_of(load_musicgen("tiny", "cpu").lm, attributes, codes)
    for ours in (logits_of(adapted.lm, attributes, codes), logits_of(unmerged.lm, attributes, codes)):
        adapter_effect, gap = float((ours - untrained).abs().max()), float((theirs - ours).abs().max())
        # the merged weights are stored in fp16, ours are the fp32 base plus the fp16 factors: close, not equal
        assert gap < 0.05 * adapter_effect, (gap, adapter_effect)
        assert adapter_effect > 0.1


def test_lora_rank_0_is_refused_by_its_bound():
    with pytest.raises(InputError) as err:  # ge=1: the schema `cog build` writes refuses it too (HTTP 422)
        from_kwargs(TrainParams, dataset_path="x.zip", model_version="tiny", method="lora", lora_rank=0)
    assert err.value.name == "lora_rank" and "minimum 1" in str(err.value)


@pytest.mark.parametrize(
    "inputs,name,words",
    [
        ({"method": "lora", "lora_alpha": 0.0}, "lora_alpha", "above 0"),
        ({"method": "lora", "lora_targets": "attn_q"}, "lora_targets", "transformer.layers.<0-1>.self_attn.q"),
        ({"method": "lora", "lora_targets": " , "}, "lora_targets", "valid targets"),
        ({"method": "lora", "model_version": "medium", "lora_targets": "layers.48.*"}, "lora_targets", "<0-47>"),
    ],
)
def test_bad_lora_inputs_fail_early(inputs, name, words):
    params = from_kwargs(TrainParams, **{"dataset_path": "x.zip", "model_version": "tiny", **inputs})
    with pytest.raises(InputError) as err:
        check_inputs(params)
    assert words in str(reported_problem(err.value, name))


def test_lora_tar_is_a_few_percent_of_a_full_export(dataset, tmp_path):
    """A tiny-derived model of 768 dims x 2 layers (~20 M LM parameters, 40 MB fp16): big enough that the fixed
    parts of a tar (the compression model copied for local bases, finetune.json) do not dominate."""
    folder = tiny.build_variant(tmp_path / "model768", dim=768, num_heads=12, num_layers=2)
    params = dataclasses.replace(
        tiny_params(dataset, method="lora", epochs=1, updates_per_epoch=2, save_every=0, sample_duration=0.0),
        model_version=str(folder),
    )
    lora_tar = run_worker(params, load_prepared(dataset), tmp_path / "out")  # (a folder is no model_version choice)
    base = torch.load(folder / "state_dict.bin", weights_only=True)
    full_tar = weights.write_trained_model(
        tmp_path / "full.tar", state_dict=base["best_state"], cfg=base["xp.cfg"], base_model=str(folder), finetune={}
    )
    ratio = lora_tar.stat().st_size / full_tar.stat().st_size
    assert ratio < 0.05, (lora_tar.stat().st_size, full_tar.stat().st_size)
    model = weights.load_trained_model(lora_tar, device="cpu").musicgen
    assert model.lm.dim == 768
