"""`core.adapters.save_partial`: the bytes of `embeddings.safetensors` depend on its content only."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load

from core.adapters import save_partial


def test_the_same_tensors_and_metadata_give_the_same_bytes_and_load_back(tmp_path):
    """safetensors orders the metadata by a per-call hash; 20 saves of four keys (one not ASCII) must agree byte for
    byte, and the file must still be read by safetensors' own loaders with every tensor and key intact."""
    tensors = {"lm.emb.0.weight@rows": torch.randn(3, 8), "lm.emb.0.weight@index": torch.tensor([4, 9, 11])}
    metadata = {
        "method": "textual_inversion",
        "trigger": "zzq-é",
        "trigger_tokens": json.dumps(["▁zz", "q"]),
        "format": "musicgen-ft",
    }
    saved = {save_partial(tensors, metadata) for _ in range(20)}
    assert len(saved) == 1
    (raw,) = saved
    size = int.from_bytes(raw[:8], "little")
    assert size % 8 == 0 and list(json.loads(raw[8 : 8 + size])["__metadata__"]) == sorted(metadata)
    back = load(raw)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    (tmp_path / "embeddings.safetensors").write_bytes(raw)
    with safe_open(str(tmp_path / "embeddings.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("lm.emb.0.weight@rows"), tensors["lm.emb.0.weight@rows"])
