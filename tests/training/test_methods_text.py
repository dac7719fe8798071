"""method=textual_inversion and method=text_projection on the tiny model: only the text side trains, the loss falls,
the tar holds KBs of learned tensors and references the base, and predict generates with them put back in."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from core import adapters, weights
from core.params import InputError, from_kwargs
from core.versions import load_musicgen
from generation.generate import Generator
from generation.params import PredictParams
from tests.helpers import reported_problem
from tests.training.conftest import make_prepared, tiny_params
from training import checkpoint as ckpt
from training.params import TrainParams
from training.run import check_inputs, run_training

PREFIX = "condition_provider.conditioners.description."


pytestmark = pytest.mark.usefixtures("keep_global_random_state")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_data")
    return make_prepared(
        root / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "zzq calm piano"},
            {"seconds": 2.0, "freq": 330.0, "description": "zzq fast drums"},
        ],
    )


def train(dataset, out, method, **overrides):
    params = tiny_params(
        dataset,
        method=method,
        trigger="zzq",
        optimizer="adamw",
        lr=0.05,
        warmup=1,
        epochs=1,
        updates_per_epoch=12,
        save_every=12,
        cfg_p=0.0,
        **overrides,
    )
    tar = run_training(params, out)
    history = ckpt.load_checkpoint(ckpt.find_checkpoint(out / "checkpoints"))["history"]
    return tar, [h["loss"] for h in history]


def generate(tar, prompt):
    request = from_kwargs(PredictParams, replicate_weights=str(tar), prompt=prompt, duration=1, seed=5)
    result = Generator(device="cpu").generate(request, progress=False)
    assert result.wav.shape == (1, 32000) and torch.isfinite(result.wav).all()


def test_textual_inversion_learns_the_trigger_row_only(dataset, tmp_path):
    tar, losses = train(dataset, tmp_path / "out", "textual_inversion")
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0] - 0.2, losses
    with tarfile.open(tar) as archive:
        names = set(archive.getnames())
        info = json.load(archive.extractfile("finetune.json"))
        lm_pkg = torch.load(archive.extractfile("state_dict.bin"), weights_only=True)
    assert adapters.EMBEDDINGS_FILE in names and lm_pkg["best_state"] == {}
    assert info["method"] == "textual_inversion" and info["descriptions"] == ["zzq"]  # conditioned on the trigger
    from audiocraft.modules.conditioners import hash_trick

    row = hash_trick("zzq", 4096)
    assert info["embeddings"]["rows"] == [row]

    model = weights.load_trained_model(tar, device="cpu").musicgen
    base = load_musicgen("tiny", "cpu").musicgen
    trained, original = model.lm.state_dict(), base.lm.state_dict()
    changed = [k for k in original if not torch.equal(original[k], trained[k])]
    assert changed == [PREFIX + "embed.weight"]
    rows_changed = (trained[PREFIX + "embed.weight"] != original[PREFIX + "embed.weight"]).any(dim=1).nonzero()
    assert rows_changed.flatten().tolist() == [row]
    generate(tar, "zzq")


def test_text_projection_trains_the_output_projection_only(dataset, tmp_path):
    tar, losses = train(dataset, tmp_path / "out", "text_projection")
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0] - 0.2, losses
    with tarfile.open(tar) as archive:
        size = archive.getmember(adapters.EMBEDDINGS_FILE).size
    assert size < 64 * 64 * 4 + 4096  # the 64 x 64 projection in fp32, plus the header
    model = weights.load_trained_model(tar, device="cpu").musicgen
    base = load_musicgen("tiny", "cpu").musicgen
    trained, original = model.lm.state_dict(), base.lm.state_dict()
    changed = {k for k in original if not torch.equal(original[k], trained[k])}
    assert changed == {PREFIX + "output_proj.weight", PREFIX + "output_proj.bias"} & set(original)
    generate(tar, "zzq calm piano")


@pytest.mark.parametrize(
    "inputs,name,words",
    [
        ({"method": "textual_inversion"}, "trigger", "give a trigger"),
        ({"method": "textual_inversion", "trigger": "zzq", "model_version": "tiny-micro"}, "method", "use full"),
    ],
)
def test_bad_text_method_inputs_fail_early(inputs, name, words):
    params = from_kwargs(TrainParams, **{"dataset_path": "x.zip", "model_version": "tiny", **inputs})
    with pytest.raises(InputError) as err:
        check_inputs(params)
    assert words in str(reported_problem(err.value, name))
