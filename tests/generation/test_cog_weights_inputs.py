"""`replicate_weights` and `lora_scale` through the real Cog server (with the schema `cog build` writes), as a
Replicate client sends them: a LoRA trained_model.tar as a data: URI; lora_scale 0 gives exactly the base model's
audio, 1 the adapter's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from tests.core.lora_tars import lora_tar
from tests.helpers import data_uri, decode_data_uri

pytestmark = pytest.mark.slow


def audio(server, **inputs) -> np.ndarray:
    status, body = server.post("/predictions", {"input": inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body
    data, _ = sf.read(io.BytesIO(decode_data_uri(body["output"])), always_2d=True)
    return data


def test_lora_scale_over_cog(server, tmp_path):
    weights = data_uri(lora_tar(tmp_path / "trained_model.tar", seed=6), "application/x-tar")
    common = {"prompt": "lofi beat", "duration": 1, "seed": 11, "top_k": 50}
    base = audio(server, model_version="tiny", **common)
    off = audio(server, replicate_weights=weights, lora_scale=0, **common)
    on = audio(server, replicate_weights=weights, **common)
    half = audio(server, replicate_weights=weights, lora_scale=0.5, **common)
    np.testing.assert_array_equal(off, base)  # scale 0: the base model exactly
    assert not np.array_equal(on, base) and not np.array_equal(half, on)
    status, body = server.post("/predictions", {"input": {**common, "replicate_weights": weights, "lora_scale": 3}})
    assert status == 422 and "lora_scale" in str(body)  # the schema's 0..2 range
