"""method=textual_inversion on a T5 model (tiny-t5, audiocraft's real T5Conditioner): through the real trainer only
the trigger's new T5 token rows change (T5, its projection and the LM stay as they were), the loss falls, the tar
carries the rows and their token strings, and predict.py generates from it: prompts with the trigger differ from the
base model, prompts without it are exactly the base model's."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from core import adapters, weights
from core.params import from_kwargs
from core.versions import load_musicgen
from generation.generate import Generator
from generation.params import PredictParams
from preprocessing import load_prepared
from tests.core.test_portable_weights import our_logits, random_codes, their_logits
from tests.helpers import ROOT
from tests.training.conftest import make_prepared, tiny_params
from training.dist import DistInfo
from training.export import export_trained_model
from training.loop import train_loop
from training.run import run_training, setup_training

KEY = "condition_provider.conditioners.description." + adapters.T5_TRIGGER_PARAM

pytestmark = pytest.mark.usefixtures("keep_global_random_state")


def inversion_params(dataset, **overrides):
    """textual_inversion of the trigger `zzq` on tiny-t5, AdamW at a rate that moves a few embedding rows fast."""
    kwargs = dict(model_version="tiny-t5", method="textual_inversion", trigger="zzq", optimizer="adamw", lr=0.05)
    return tiny_params(dataset, **{**kwargs, "epochs": 1, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trainer's own steps (as `training.run.run_worker`), with every weight captured before and after."""
    root = tmp_path_factory.mktemp("t5_inversion")
    dataset = make_prepared(
        root / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "zzq calm piano"},
            {"seconds": 2.0, "freq": 330.0, "description": "fast drums"},  # the trigger gets prepended
        ],
    )
    params = inversion_params(dataset, warmup=1, updates_per_epoch=12, save_every=12, cfg_p=0.0)
    out = root / "out"
    setup = setup_training(params, load_prepared(dataset), out, DistInfo())
    lm = setup.model.lm
    t5 = lm.condition_provider.conditioners["description"].t5
    trainable = [name for name, p in lm.named_parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    t5_before = {k: v.clone() for k, v in t5.state_dict().items()}
    result = train_loop(lm, setup.tokens, params, setup.plan, DistInfo(), out / "checkpoints")
    tar = export_trained_model(
        out / "trained_model.tar",
        model=setup.model,
        prepared=setup.prepared,
        result=result,
        params=params,
        clips=setup.clips,
    )
    return {
        "tar": tar,
        "losses": [h["loss"] for h in result.history],
        "trainable": trainable,
        "before": before,
        "after": {k: v.clone() for k, v in lm.state_dict().items()},
        "t5_before": t5_before,
        "t5_after": t5.state_dict(),
    }


def test_only_the_trigger_rows_train_and_the_loss_falls(trained):
    losses = trained["losses"]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0] - 0.2, losses
    assert trained["trainable"] == [KEY]
    before, after = trained["before"], trained["after"]
    assert set(before) == set(after)
    assert [k for k in before if not torch.equal(before[k], after[k])] == [KEY]
    assert all(torch.equal(v, trained["t5_after"][k]) for k, v in trained["t5_before"].items())


def test_the_tar_carries_the_rows_and_their_tokens(trained):
    with tarfile.open(trained["tar"]) as archive:
        info = json.load(archive.extractfile("finetune.json"))
        lm_pkg = torch.load(archive.extractfile("state_dict.bin"), weights_only=True)
        size = archive.getmember(adapters.EMBEDDINGS_FILE).size
    assert lm_pkg["best_state"] == {} and info["base_model"] == "tiny-t5"
    tokens = [f"<mgft_trigger_{i}>" for i in range(len(info["embeddings"]["pieces"]))]
    assert info["embeddings"]["trigger"] == "zzq" and info["embeddings"]["tokens"] == tokens
    assert info["descriptions"] == ["zzq calm piano", "zzq fast drums"]
    assert size < len(tokens) * 768 * 4 + 4096  # the rows in fp32, plus the header: KBs
    folder = weights.unpack(trained["tar"])
    with safe_open(str(folder / adapters.EMBEDDINGS_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["trigger_tokens"]) == tokens
        assert torch.equal(f.get_tensor(KEY), trained["after"][KEY])


@pytest.fixture(scope="module")
def loaded(trained):
    return weights.load_trained_model(trained["tar"], device="cpu").musicgen, load_musicgen("tiny-t5", "cpu").musicgen


def encode(model, prompts):
    conditioner = model.lm.condition_provider.conditioners["description"]
    with torch.no_grad():
        return conditioner(conditioner.tokenize(prompts))[0]


def test_the_loaded_model_uses_the_trigger_only_where_prompted(trained, loaded):
    model, base = loaded
    trained_state, base_state = model.lm.state_dict(), base.lm.state_dict()
    assert set(trained_state) - set(base_state) == {KEY}
    assert all(torch.equal(base_state[k], trained_state[k]) for k in base_state)
    assert torch.equal(trained_state[KEY], trained["after"][KEY])
    for prompt in ("calm piano", "zzqx drums", ""):
        assert torch.equal(encode(model, [prompt]), encode(base, [prompt])), prompt
    with_trigger = encode(model, ["zzq calm piano"])
    assert not torch.allclose(with_trigger, encode(base, ["zzq calm piano"]), atol=1e-3)
    assert torch.equal(encode(model, ["ZZQ calm piano"]), with_trigger)


def test_the_transformers_form_holds_the_learned_tokens(trained, loaded, tmp_path):
    """The tar's transformers/ folder (written by the export) is the whole model with the trigger's placeholder
    tokens in its tokenizer and their learned rows in T5's input embeddings: transformers' logits for a prompt
    written with the tokens equal ours for the prompt with the trigger word (fp32, <= 1e-4)."""
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    with tarfile.open(trained["tar"]) as archive:
        info = json.load(archive.extractfile("finetune.json"))
        portable = [m for m in archive.getmembers() if m.name.startswith("transformers/")]
        archive.extractall(tmp_path, members=portable, filter="data")
    assert info["transformers"] == {
        "folder": "transformers",
        "kind": "model",
        "class": "MusicgenForConditionalGeneration",
    }
    folder = tmp_path / "transformers"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    theirs = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    model, base = loaded
    tokens = "".join(info["embeddings"]["tokens"])
    codes = random_codes(model.lm)
    ours = our_logits(model.lm.eval(), codes, "zzq calm piano")
    assert (ours - our_logits(base.lm.eval(), codes, "zzq calm piano")).abs().max() > 1e-2  # the trigger acts
    assert (their_logits(theirs, tokenizer, codes, f"{tokens} calm piano") - ours).abs().max() <= 1e-4
    plain = our_logits(model.lm, codes, "calm piano")  # without the trigger: the base model's, in both
    assert (their_logits(theirs, tokenizer, codes, "calm piano") - plain).abs().max() <= 1e-4


def test_predict_generates_from_the_tar(trained, tmp_path):
    generator = Generator(device="cpu")  # one model loaded at a time: each model's prompts together

    def generate(prompt: str, **kw) -> torch.Tensor:
        request = from_kwargs(PredictParams, prompt=prompt, duration=1, seed=5, top_k=50, **kw)
        result = generator.generate(request, progress=False)
        assert result.wav.shape[-1] == 32000 and torch.isfinite(result.wav).all()
        return result.wav

    tar = str(trained["tar"])
    prompts = ("zzq lofi beat", "lofi beat")
    tuned = [generate(p, replicate_weights=tar) for p in prompts]
    base = [generate(p, model_version="tiny-t5") for p in prompts]
    assert not torch.equal(tuned[0], base[0])  # the learned trigger
    assert torch.equal(tuned[1], base[1])  # no trigger: exactly the base model
    out = tmp_path / "out.wav"
    run = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "--replicate_weights", tar, "--prompt", "zzq lofi beat",
         "--duration", "1", "--seed", "5", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    audio, sr = sf.read(str(out))
    assert sr == 32000 and audio.shape == (32000,) and np.abs(audio).max() > 0


@pytest.mark.slow
def test_two_processes_learn_the_trigger_too(tmp_path, capfd):
    """DDP (torchrun, 2 gloo processes) with CFG and word dropout: some steps of a rank see no trigger at all, and
    every trainable parameter must still be in each step's graph."""
    dataset = make_prepared(
        tmp_path / "prepared",
        [{"seconds": 2.5, "description": "zzq calm piano"}, {"seconds": 2.0, "freq": 330.0, "description": "drums"}],
    )
    params = inversion_params(
        dataset, updates_per_epoch=6, save_every=6, sample_duration=0.0, cfg_p=0.5, parallel="ddp"
    )
    tar = run_training(params, tmp_path / "out", nproc=2)
    log = capfd.readouterr().err
    assert "All 2 ranks hold identical weights" in log, log[-3000:]
    model = weights.load_trained_model(tar, device="cpu").musicgen
    base = load_musicgen("tiny-t5", "cpu").musicgen
    assert not torch.equal(encode(model, ["zzq drums"]), encode(base, ["zzq drums"]))
