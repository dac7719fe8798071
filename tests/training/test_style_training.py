"""Fine-tuning tiny-style with the training engine: frozen style conditioner, style from each example's own audio,
no loss on the excerpt, export, and generation from the trained_model.tar with style inputs."""

from __future__ import annotations

import pytest
import torch

from core import style, tiny, weights
from core.params import from_kwargs
from generation.generate import Generator
from generation.params import PredictParams
from preprocessing import load_prepared
from tests.helpers import moved_beyond_fp16, write_wav
from tests.training.conftest import make_prepared, tiny_params
from training.data import load_clip_audio
from training.dist import DistInfo
from training.run import run_worker, setup_training

pytestmark = pytest.mark.slow

SR = 32000


def style_params(dataset):
    # run_worker is the training process run_training would start.
    # adamw: every trained weight moves by about lr per step, well beyond the fp16 rounding of the export (three
    # steps of D-Adaptation, which starts from a step of 1e-6, stay inside it)
    return tiny_params(dataset, model_version="tiny-style", epochs=1, updates_per_epoch=3, segment_duration=5.0,
                       save_every=3, optimizer="adamw", lr=1e-3)  # fmt: skip


def test_style_fine_tune_exports_and_generates(tmp_path):
    dataset = make_prepared(
        tmp_path / "prepared",
        [
            {"seconds": 6.0, "freq": 220.0, "description": "calm piano"},
            {"seconds": 6.0, "freq": 330.0, "description": "fast drums"},
        ],
    )
    params = style_params(dataset)
    out = tmp_path / "out"
    setup = setup_training(params, load_prepared(dataset), out, DistInfo())
    lm = setup.model.lm
    conditioner = lm.condition_provider.conditioners["self_wav"]
    assert isinstance(lm, style.StyleLMModel) and conditioner.frozen
    assert not any(p.requires_grad for p in conditioner.parameters())

    # The batch's style condition is the crop's own audio, filled in from the clip path and crop start.
    lm.train()
    batch = setup.tokens.make_batch([(0, 25)])  # clip 0 from 0.5 s
    tokenized = lm.condition_provider.tokenize(batch.attributes)
    audio = load_clip_audio(setup.clips[0].path, SR, 1)[0]
    wav = tokenized["self_wav"].wav[0, 0]
    assert wav.shape[-1] == 5 * SR and torch.allclose(wav, audio[SR // 2 : SR // 2 + 5 * SR], atol=1e-6)

    # No loss on the LM frames of the excerpt.
    tensors = lm.condition_provider(tokenized)
    start, length = conditioner.last_excerpt
    assert 1.5 * SR <= length <= 4.5 * SR
    output = lm.compute_predictions(batch.codes, [], tensors)
    first, n = start // 640, length // 640
    assert not output.mask[0, 0, first + 3 : first + n].any()  # (the delay pattern masks the first steps anyway)
    assert output.mask[0, 0, first + n + 3 :].all()

    base_state = {k: v.clone() for k, v in tiny_state().items()}
    tar = run_worker(params, load_prepared(dataset), out)
    model = weights.load_trained_model(tar, device="cpu").musicgen
    assert isinstance(model.lm, style.StyleLMModel)
    trained = model.lm.state_dict()
    prefix = "condition_provider.conditioners.self_wav."
    style_keys = [k for k in base_state if k.startswith(prefix)]
    assert style_keys and all(torch.allclose(trained[k].float(), base_state[k].float(), atol=1e-3) for k in style_keys)
    layers = [k for k in base_state if k.startswith("transformer.")]
    moved = moved_beyond_fp16(trained, base_state, "transformer.")
    assert len(moved) > len(layers) // 2, (len(moved), len(layers))  # the LM itself learned

    style_wav = write_wav(tmp_path / "style.wav", 4.0, sr=44100, channels=2)
    generator = Generator(device="cpu")
    request = from_kwargs(
        PredictParams,
        replicate_weights=str(tar),
        prompt="calm piano",
        style_audio=str(style_wav),
        classifier_free_guidance_beta=3.0,
        duration=1,
        seed=2,
    )
    result = generator.generate(request, progress=False)
    assert result.wav.shape == (1, SR) and torch.isfinite(result.wav).all()


def tiny_state() -> dict[str, torch.Tensor]:
    return torch.load(tiny.ensure_tiny("tiny-style") / "state_dict.bin", weights_only=True)["best_state"]
