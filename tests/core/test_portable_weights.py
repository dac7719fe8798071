"""Weights in Hugging Face transformers' format, around the conversion (`core.weights.transformers_format`): a LoRA
adapter exported as a PEFT adapter equals our merged LoRA (next-token logits, fp32); transformers folders and PEFT
adapters load as weights (a folder, a repo id in the hub cache) and sample through the real Cog server; resume_from
refuses them."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core import adapters, tiny, weights
from core.params import InputError
from core.versions import load_musicgen
from core.weights import peft_format, transformers_format
from tests.helpers import decode_data_uri
from training.checkpoint import find_checkpoint

LOGIT_TOLERANCE = 1e-4  # the oracle bound, fp32


# ------------------------------------------------------------------------------------------------ helpers


def our_logits(lm: torch.nn.Module, codes: torch.Tensor, description: str) -> torch.Tensor:
    """audiocraft's next-token logits `[B, K, S, card]` for the (already delayed) sequence `codes` `[B, K, S]`."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    provider = lm.condition_provider
    attributes = [ConditioningAttributes(text={"description": description}) for _ in range(codes.shape[0])]
    with torch.no_grad():
        tensors = provider(provider.tokenize(attributes))
        return lm(codes, [], condition_tensors=tensors).float()


def their_logits(model, tokenizer, codes: torch.Tensor, description: str) -> torch.Tensor:
    """transformers' logits for the same sequence (`decoder_input_ids` `[B * K, S]`), as `[B, K, S, card]`."""
    b, k, s = codes.shape
    text = tokenizer([description] * b, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(
            input_ids=text.input_ids, attention_mask=text.attention_mask, decoder_input_ids=codes.reshape(b * k, s)
        )
    return out.logits.reshape(b, k, s, -1).float()


def random_codes(lm, steps: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.card, (batch, lm.num_codebooks, steps), generator=generator)


def trained_lora(lm: torch.nn.Module, seed: int = 3) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA adapter on `lm` (every default target, rank 4) with random non-zero factors, as a training leaves it
    and as the tar stores it (fp16, `core.adapters.save_adapter`): (tensors, config)."""
    targets = adapters.select_targets(lm, "q,k,v,out_proj,linear1,linear2,linears.*")
    adapters.add_lora(lm, targets, 4, 8.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".lora_B" in name or name.endswith("lora_B"):
                p.normal_(0, 0.3)
    config = {"rank": 4, "alpha": 8.0, "targets": targets}
    files = adapters.save_adapter(lm.state_dict(), config)
    from safetensors.torch import load

    return load(files[adapters.ADAPTER_FILE]), config


def write_our_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / adapters.ADAPTER_FILE))
    (folder / adapters.ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    return folder


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private weights cache (MGFT_CACHE), the tiny models linked from the shared one (built there first)."""
    for name in ("tiny", "tiny-t5"):
        tiny.ensure_tiny(name)
    shared = tiny.cache_root() / "models"
    root = tmp_path / "mgft-cache"
    root.mkdir()
    (root / "models").symlink_to(shared)
    monkeypatch.setenv("MGFT_CACHE", str(root))
    return root


# ------------------------------------------------------------------------------------------------ PEFT out


def test_the_peft_adapter_on_the_transformers_base_equals_our_merged_lora(tmp_path):
    base = load_musicgen("tiny-t5", "cpu")
    tensors, config = trained_lora(load_musicgen("tiny-t5", "cpu").lm)
    ours = base.lm
    adapters.MergedLoRA(ours, write_our_adapter(tmp_path / "ours", tensors, config))  # as predict loads it
    peft_folder = write_files(tmp_path / "peft", peft_format.peft_adapter_files(tensors, config, "tiny-t5"))
    config_written = json.loads((peft_folder / peft_format.PEFT_CONFIG_FILE).read_text())
    assert config_written["peft_type"] == "LORA" and config_written["r"] == 4 and config_written["lora_alpha"] == 8.0

    from peft import PeftModel

    plain = load_musicgen("tiny-t5", "cpu")
    transformers_base = transformers_format.to_transformers(plain.lm, plain.musicgen.compression_model)
    theirs = PeftModel.from_pretrained(transformers_base, str(peft_folder)).eval()  # unmerged: peft's own forward
    tokenizer = transformers_format.text_tokenizer(plain.lm)
    codes = random_codes(ours)
    expected = our_logits(ours.eval(), codes, "calm piano")
    got = their_logits(theirs, tokenizer, codes, "calm piano")
    base_logits = our_logits(plain.lm.eval(), codes, "calm piano")
    assert (expected - base_logits).abs().max() > 100 * LOGIT_TOLERANCE  # the adapter does change the logits
    assert (got - expected).abs().max() <= LOGIT_TOLERANCE
    # every target of ours is one module of transformers' (q, k, v of the packed in_proj each their own)
    assert len(config_written["target_modules"]) == len(config["targets"])


def test_every_lora_target_has_a_transformers_module():
    lm = load_musicgen("tiny-t5", "cpu").lm
    for name in adapters.lora_target_names(lm):
        peft_format.transformers_module(name)  # raises for a target it cannot place
    with pytest.raises(ValueError, match="no module in transformers"):
        peft_format.transformers_module("condition_provider.conditioners.description.output_proj")


# ------------------------------------------------------------------------------------------------ import


def test_a_peft_adapter_folder_loads_as_weights_equal_to_our_merged_lora(cache, tmp_path):
    tensors, config = trained_lora(load_musicgen("tiny-t5", "cpu").lm)
    folder = write_files(tmp_path / "peft", peft_format.peft_adapter_files(tensors, config, "tiny-t5"))
    opened = weights.open_weights(str(folder))
    assert (opened.format, opened.base, opened.lora, opened.adapter) == ("peft", "tiny-t5", True, True)
    loaded = weights.load_trained_model(opened, device="cpu")
    ours = load_musicgen("tiny-t5", "cpu").lm
    adapters.MergedLoRA(ours, write_our_adapter(tmp_path / "ours", tensors, config))
    got, want = loaded.lm.state_dict(), ours.state_dict()
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    # lora_scale 0: the base model's weights exactly
    off = weights.load_trained_model(str(folder), device="cpu", lora_scale=0.0).lm.state_dict()
    base = load_musicgen("tiny-t5", "cpu").lm.state_dict()
    assert all(torch.equal(off[k], base[k]) for k in base)


def test_a_peft_adapter_on_a_base_without_transformers_form_is_refused(cache, tmp_path):
    tensors, config = trained_lora(load_musicgen("tiny-t5", "cpu").lm)
    files = peft_format.peft_adapter_files(tensors, config, "tiny")  # tiny's text conditioner is a lookup table
    folder = write_files(tmp_path / "peft", files)
    with pytest.raises(weights.WeightsError, match="PEFT adapter on 'tiny'.*lookup table"):
        weights.open_weights(str(folder))
    cfg = json.loads(files[peft_format.PEFT_CONFIG_FILE])
    (folder / peft_format.PEFT_CONFIG_FILE).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(weights.WeightsError, match="only LoRA adapters"):
        weights.open_weights(str(folder))


def test_a_transformers_folder_from_a_repo_id_in_the_hub_cache_loads(cache, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    saved = tiny.save_transformers_tiny(tmp_path / "saved")
    hub = tmp_path / "hf-hub"
    root = hub / "models--bob--musicgen-tiny-ft"
    commit = "c" * 40
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir()
    for path in saved.iterdir():
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert weights.unpack("bob/musicgen-tiny-ft") == snapshot  # the hub cache is the one copy
    model = weights.load_trained_model("bob/musicgen-tiny-ft", device="cpu")
    assert model.lm.n_q == tiny.N_Q and model.lm.card == tiny.CARD and model.source == "bob/musicgen-tiny-ft"
    # a repo holding our tar beside the transformers files (training/publish.py pushes both): the tar wins
    tar_bytes = _tiny_tar(tmp_path / "tar" / "trained_model.tar").read_bytes()
    blob = root / "blobs" / hashlib.sha256(tar_bytes).hexdigest()
    blob.write_bytes(tar_bytes)
    (snapshot / "trained_model.tar").symlink_to(os.path.relpath(blob, snapshot))
    folder = weights.unpack("bob/musicgen-tiny-ft")
    assert folder != snapshot and (folder / "state_dict.bin").is_file()


def _tiny_tar(path: Path) -> Path:
    lm = load_musicgen("tiny", "cpu").lm
    return weights.write_trained_model(
        path, state_dict=lm.state_dict(), cfg=lm.cfg, base_model="tiny", finetune={"method": "full"}
    )


def test_a_bad_transformers_config_is_refused_before_anything_is_built(cache, tmp_path):
    folder = tiny.save_transformers_tiny(tmp_path / "saved")
    config = json.loads((folder / "config.json").read_text())
    config["decoder"]["num_hidden_layers"] = 10_000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match="num_layers 10000, outside 1..96"):
        weights.open_weights(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(weights.WeightsError, match="config.json without model.safetensors"):
        weights.open_weights(str(folder))


def test_resume_from_refuses_transformers_models(tmp_path):
    folder = tiny.save_transformers_tiny(tmp_path / "saved")
    with pytest.raises(InputError, match="resume_from.*transformers' format.*replicate_weights"):
        find_checkpoint(folder)
    with pytest.raises(InputError, match="resume_from.*model.safetensors is a transformers weights file"):
        find_checkpoint(folder / "model.safetensors")
    with pytest.raises(InputError, match="resume_from.*Hugging Face repo ids are not resumed"):
        find_checkpoint("facebook/musicgen-small")


# ------------------------------------------------------------------------------------------------ Cog server


@pytest.mark.slow
def test_a_model_saved_by_transformers_samples_through_the_cog_server(server, tmp_path):
    folder = tiny.save_transformers_tiny(tmp_path / "saved", seed=1)
    inputs = {"prompt": "calm piano", "duration": 1, "seed": 5, "top_k": 20, "replicate_weights": str(folder)}
    status, body = server.post("/predictions", {"input": inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body
    data, rate = sf.read(io.BytesIO(decode_data_uri(body["output"])), always_2d=True)
    assert rate == 32000 and 0.9 * rate <= len(data) <= 1.1 * rate and np.isfinite(data).all() and data.std() > 0
    assert "Converted" in server.log() and str(folder) in server.log()
