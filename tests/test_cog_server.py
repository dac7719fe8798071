"""The real Cog HTTP server (`python -m cog.server.http`) running predict.py with tiny models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from core import weights
from core.params import from_kwargs
from core.versions import load_musicgen
from generation.generate import Generator
from generation.params import PredictParams
from tests.helpers import CogServer, data_uri, decode_data_uri, tone

pytestmark = pytest.mark.slow


def predict(srv: CogServer, **inputs) -> dict:
    status, body = srv.post("/predictions", {"input": inputs})
    assert status in (200, 422), (status, body)
    return body


def read_audio(body: dict) -> tuple[np.ndarray, int]:
    """The prediction's output: one file, `([T, C], sample rate)`."""
    assert body["status"] == "succeeded", body.get("error") or body.get("logs")
    assert isinstance(body["output"], str), body["output"]
    return sf.read(io.BytesIO(decode_data_uri(body["output"])), always_2d=True)


def test_generates_a_decodable_wav_of_the_right_length(server):
    data, sr = read_audio(predict(server, model_version="tiny", prompt="lofi beat", duration=2, seed=5))
    assert sr == 32000 and data.shape == (64000, 1)
    assert np.abs(data).max() > 0


def test_stereo_mp3(server):
    body = predict(server, model_version="tiny-stereo", prompt="ambient pad", duration=1, output_format="mp3")
    data, sr = read_audio(body)
    assert sr == 32000 and data.shape[1] == 2 and data.shape[0] >= 32000


def test_continuation_of_an_uploaded_file_without_extension(server, tmp_path):
    path = tmp_path / "upload"
    sf.write(str(path), tone(2.0, 44100, 2), 44100, format="FLAC")
    body = predict(server, model_version="tiny", input_audio=data_uri(path), continuation=True, duration=3, seed=1)
    data, sr = read_audio(body)
    assert data.shape == (96000, 1)


@pytest.mark.parametrize(
    "inputs,name",
    [
        ({"model_version": "tiny", "top_k": 9999}, "top_k"),
        ({"model_version": "tiny", "duration": 0}, "duration"),
        ({"model_version": "tiny", "normalization_strategy": "loud"}, "normalization_strategy"),
        ({"model_version": "tiny", "continuation": True}, "continuation"),
    ],
)
def test_bad_inputs_fail_naming_the_input(server, inputs, name):
    body = predict(server, **inputs)
    assert body.get("status") == "failed" or "detail" in body
    assert name in (body.get("error") or str(body.get("detail"))), body


def test_cog_weights_loads_the_fine_tune(tmp_path):
    model = load_musicgen("tiny", device="cpu").musicgen
    with torch.no_grad():
        for p in model.lm.parameters():
            p.mul_(1.5)
    tar = weights.write_trained_model(
        tmp_path / "trained_model.tar",
        state_dict=model.lm.state_dict(),
        cfg=model.lm.cfg,
        base_model="tiny",
        finetune={"method": "full"},
    )
    srv = CogServer(tmp_path, env={"COG_WEIGHTS": str(tar), "MGFT_PRELOAD": ""})
    try:
        assert srv.wait_ready()["status"] == "READY", srv.log()[-3000:]
        served, _ = read_audio(predict(srv, prompt="lofi beat", duration=1, seed=21))
        base, _ = read_audio(predict(srv, model_version="tiny", prompt="lofi beat", duration=1, seed=21))
    finally:
        srv.stop()
    local = Generator(device="cpu", setup_weights=str(tar)).generate(
        from_kwargs(PredictParams, prompt="lofi beat", duration=1, seed=21), progress=False
    )
    buffer = io.BytesIO()
    sf.write(buffer, local.wav.numpy().T, 32000, subtype="PCM_16", format="WAV")
    expected, _ = sf.read(io.BytesIO(buffer.getvalue()), always_2d=True)
    np.testing.assert_array_equal(served, expected)
    assert not np.array_equal(served, base)
