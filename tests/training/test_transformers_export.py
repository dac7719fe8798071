"""Every training also writes the fine-tune in transformers' format: in output_dir/transformers/ and under
transformers/ in the tar. A LoRA adapter is a PEFT adapter on the transformers base, `lora_merge` the whole model;
either one loads back as weights equal to the tar's. A model transformers cannot hold (the LUT-conditioned `tiny`)
gets no folder: finetune.json says why and the log says it once."""

from __future__ import annotations

import json
import logging
import tarfile

import pytest
import torch

from core import weights
from core.weights import peft_format
from tests.training.conftest import make_prepared, tiny_params
from training.run import run_training


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_prepared(
        tmp_path_factory.mktemp("portable") / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "calm piano"},
            {"seconds": 2.0, "freq": 330.0, "description": "fast drums"},
        ],
    )


def short(dataset, **overrides):
    values = {"epochs": 1, "updates_per_epoch": 3, "save_every": 0, "sample_duration": 0.0}
    return tiny_params(dataset, **{**values, **overrides})


def tar_members(tar) -> dict[str, bytes]:
    with tarfile.open(tar) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def beside_equals_inside(out, members: dict[str, bytes]) -> list[str]:
    """The files of output_dir/transformers/, each byte for byte the tar's transformers/ member; their names."""
    folder = out / weights.TRANSFORMERS_FOLDER
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    inside = sorted(n.removeprefix("transformers/") for n in members if n.startswith("transformers/"))
    assert names == inside
    assert all((folder / n).read_bytes() == members[f"transformers/{n}"] for n in names)
    return names


def test_a_lora_training_exports_a_peft_adapter_that_loads_as_the_tar_does(dataset, tmp_path):
    out = tmp_path / "out"
    tar = run_training(short(dataset, model_version="tiny-t5", method="lora", lora_rank=4), out)
    members = tar_members(tar)
    info = json.loads(members["finetune.json"])
    assert info["transformers"] == {"folder": "transformers", "kind": "peft_adapter", "base_model": "tiny-t5"}
    assert beside_equals_inside(out, members) == [peft_format.PEFT_CONFIG_FILE, peft_format.PEFT_WEIGHTS_FILE]
    from_peft = weights.load_trained_model(str(out / "transformers"), device="cpu").lm.state_dict()
    from_tar = weights.load_trained_model(tar, device="cpu").lm.state_dict()
    assert set(from_peft) == set(from_tar)
    assert max((from_peft[k] - from_tar[k]).abs().max().item() for k in from_tar) <= 1e-5
    # the tar loads from its own members: its transformers/adapter_config.json does not replace ours when unpacked
    assert not peft_format.is_peft_folder(weights.unpack(tar))


def test_a_merged_lora_exports_the_whole_model_which_imports_bit_for_bit(dataset, tmp_path):
    out = tmp_path / "out"
    params = short(dataset, model_version="tiny-t5", method="lora", lora_rank=4, lora_merge=True)
    tar = run_training(params, out)
    members = tar_members(tar)
    record = json.loads(members["finetune.json"])["transformers"]
    assert record == {"folder": "transformers", "kind": "model", "class": "MusicgenForConditionalGeneration"}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(beside_equals_inside(out, members))
    imported = weights.load_trained_model(str(out / "transformers"), device="cpu").lm.state_dict()
    from_tar = weights.load_trained_model(tar, device="cpu").lm.state_dict()
    assert set(imported) == set(from_tar)
    assert all(torch.equal(imported[k], from_tar[k]) for k in from_tar)  # round trip: bitwise


def test_a_model_transformers_cannot_hold_is_said_once(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    tar = run_training(short(dataset), out)  # `tiny`: a lookup-table text conditioner
    members = tar_members(tar)
    reason = json.loads(members["finetune.json"])["transformers"]["unsupported"]
    assert "lookup table" in reason
    assert not (out / weights.TRANSFORMERS_FOLDER).exists() and not any(n.startswith("transformers/") for n in members)
    said = [r for r in caplog.records if "No transformers form" in r.getMessage()]
    assert len(said) == 1 and reason in said[0].getMessage() and said[0].levelno == logging.WARNING
