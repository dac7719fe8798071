"""The demo dataset (`python -m preprocessing.demo`) and what validation shows on it: a tiny fine-tune's validation
loss on held-out demo tracks falls below the base model's and the exported weights are the best evaluation's;
with an absurd learning rate the validation loss rises and the exported weights are still the early ones.

The tiny test model's EnCodec has random codebooks, and nearly every sound falls on one code per codebook (its
codes say almost nothing about the music). `fitted_codec` fits the codebooks to audio of the demo style first
(residual k-means on the encoder's latents of *other* demo tracks, seed 1, none of them trained or validated on),
so the codes follow the chords, drums and melody as a real codec's do, and the LM has music to learn.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest
import torch

import core.versions
from core.audio import resample
from core.params import from_kwargs
from preprocessing import demo
from training import checkpoint as ckpt
from training.params import TrainParams
from training.run import run_training

_FITTED: dict[str, torch.Tensor] = {}


def _kmeans(x: torch.Tensor, k: int, iters: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centers[j] = members.mean(0)
    return centers


@torch.no_grad()
def fit_codebooks(compression: torch.nn.Module) -> None:
    """Residual k-means of the RVQ codebooks on the encoder latents of 4 demo tracks of another seed."""
    if not _FITTED:
        wavs = [
            resample(torch.from_numpy(demo.synthesize_track(i, 12.0, seed=1))[None], demo.SAMPLE_RATE, 32000)
            for i in range(4)
        ]
        latents = torch.cat([compression.encoder(w[None]).squeeze(0).T for w in wavs])  # [frames, dim]
        residual = latents.clone()
        for i, layer in enumerate(compression.quantizer.vq.layers):
            centers = _kmeans(residual, layer._codebook.embed.shape[0], seed=i)
            _FITTED[f"quantizer.vq.layers.{i}._codebook.embed"] = centers
            residual = residual - centers[torch.cdist(residual, centers).argmin(1)]
    for name, centers in _FITTED.items():
        embed = compression.get_buffer(name)
        embed.copy_(centers)
        prefix = name.rsplit(".", 1)[0]
        compression.get_buffer(prefix + ".embed_avg").copy_(centers)


@pytest.fixture
def fitted_codec(monkeypatch):
    load = core.versions.load_musicgen

    def load_fitted(version, device, *args, **kwargs):
        model = load(version, device, *args, **kwargs)
        fit_codebooks(model.musicgen.compression_model)
        return model

    monkeypatch.setattr(core.versions, "load_musicgen", load_fitted)  # setup_training looks it up there at call time


@pytest.fixture(scope="module")
def demo_zip(tmp_path_factory):
    return demo.write_demo(tmp_path_factory.mktemp("demo") / "demo.zip")


def demo_params(dataset, **overrides) -> TrainParams:
    values = {
        "dataset_path": str(dataset),
        "model_version": "tiny",
        "auto_labeling": False,
        "drop_vocals": False,
        "epochs": 2,
        "updates_per_epoch": 10,
        "batch_size": 4,
        "segment_duration": 2.0,
        "sample_duration": 0.0,
        "optimizer": "adamw",
        "lr": 3e-3,
        "eval_every": 5,
        "save_every": 5,
    }
    values.update(overrides)
    return from_kwargs(TrainParams, **values)


def _tar(tar) -> tuple[dict, dict[str, torch.Tensor]]:
    with tarfile.open(tar) as archive:
        info = json.load(archive.extractfile("finetune.json"))
        state = torch.load(io.BytesIO(archive.extractfile("state_dict.bin").read()), weights_only=True)
    return info, state["best_state"]


def test_the_demo_archive_is_deterministic_small_and_described(tmp_path, demo_zip):
    again = demo.write_demo(tmp_path / "again.zip")
    assert again.read_bytes() == demo_zip.read_bytes()
    assert demo_zip.stat().st_size < 5_000_000
    with zipfile.ZipFile(demo_zip) as archive:
        names = sorted(archive.namelist())
        text = archive.read("demo_track_01.txt").decode()
    assert names == sorted([f"demo_track_{i:02d}.{ext}" for i in range(1, 9) for ext in ("flac", "txt")])
    assert text.startswith(demo.STYLE + ", ") and " bpm, " in text and text.strip().endswith(" minor")
    assert demo.write_demo(tmp_path / "other.zip", seed=1).read_bytes() != demo_zip.read_bytes()
    assert demo.main([str(tmp_path / "bad.tar")]) == 2  # the error names the input and the fix


def test_a_fine_tune_on_the_demo_beats_the_base_on_held_out_tracks(fitted_codec, demo_zip, tmp_path):
    out = tmp_path / "run"
    info, exported = _tar(run_training(demo_params(demo_zip, forgetting_check="on"), out))
    validation = info["validation"]
    assert validation["split"]["validation_tracks"] and validation["split"]["training_clips"] == 7
    losses = {e["step"]: e["val_loss"] for e in validation["evaluations"]}
    assert sorted(losses) == [0, 5, 10, 15, 20]
    print("demo validation loss by step:", {s: round(v, 3) for s, v in losses.items()})
    print("demo forgetting loss by step:", {e["step"]: round(e["forget_loss"], 3) for e in validation["evaluations"]})
    assert validation["flags"] == []  # a good fine-tune: neither validation up nor forgetting up
    assert losses[20] < losses[0] - 0.5  # held-out tracks: never trained on
    best = min(losses, key=losses.get)
    assert validation["exported_step"] == validation["best_step"] == best == info["training"]["exported_step"]
    saved = ckpt.load_checkpoint(out / "checkpoints" / f"checkpoint-{best:08d}.pt")  # 15 and 20 are kept
    for k, v in saved["model"].items():
        assert torch.equal(exported[k], v.half()), k


def test_an_absurd_learning_rate_keeps_the_early_weights(fitted_codec, demo_zip, tmp_path):
    out = tmp_path / "run"
    # D-Adaptation at 100x its own step size (lr is its multiplier; 1 is the default), held constant; the forgetting
    # check forced on (auto is off on CPU): the base model generates its general-music examples first
    params = demo_params(
        demo_zip, epochs=1, updates_per_epoch=12, optimizer="dadam", lr=100.0, warmup=0, lr_scheduler="linear_warmup",
        eval_every=4, save_every=4, forgetting_check="on",
    )  # fmt: skip
    info, exported = _tar(run_training(params, out))
    validation = info["validation"]
    losses = {e["step"]: e["val_loss"] for e in validation["evaluations"]}
    forgot = {e["step"]: e["forget_loss"] for e in validation["evaluations"]}
    print("absurd lr validation loss by step:", {s: round(v, 3) for s, v in losses.items()})
    print("absurd lr forgetting loss by step:", {s: round(v, 3) for s, v in forgot.items()})
    best = validation["best_step"]
    assert best < 12 and validation["exported_step"] == best
    assert losses[12] > losses[0] + 1.0 and losses[12] > losses[best] + 1.0  # the validation loss rose
    # the report flags both: validation up, forgetting up (the general music's loss far above the base model's)
    forgetting = validation["forgetting"]
    assert forgetting["source"] == "generated" and forgetting["clips"] == 8 and forgetting["base_loss"] == forgot[0]
    assert forgot[12] > forgot[0] * (1 + forgetting["threshold"]) and forgetting["final_up"]
    assert validation["flags"] == ["validation up", "forgetting up"]
    page = (out / "report.html").read_text()
    assert "validation up" in page and "forgetting up" in page and "Forgetting up: on general music" in page
    assert json.loads((out / "metrics.json").read_text())["validation"]["flags"] == validation["flags"]
    last = ckpt.load_checkpoint(out / "checkpoints" / "checkpoint-00000012.pt")
    names = [n for n, _ in core.versions.load_musicgen("tiny", "cpu").lm.named_parameters()]
    kept = dict(zip(names, last["evaluation"]["best"], strict=True))  # the early best, kept in the checkpoint
    assert set(kept) <= set(exported)  # full fine-tune: every LM weight trains and is kept
    for k, v in kept.items():
        assert torch.equal(exported[k], v.half()), k
    assert not all(torch.equal(exported[k], last["model"][k].half()) for k in kept)  # not the last weights
