"""LoRA trained_model.tars made directly (no training run): the tiny base with random non-zero adapters, written
the way training/methods/lora.py exports them (empty best_state, adapter.safetensors + adapter_config.json)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch
from audiocraft.modules.conditioners import ConditioningAttributes

from core import adapters, weights
from core.versions import load_musicgen


def lora_tar(path: Path, base: str = "tiny", seed: int = 0, rank: int = 4, alpha: float = 8.0) -> Path:
    model = load_musicgen(base, "cpu").musicgen
    targets = adapters.select_targets(model.lm, "q,k,v,out_proj,linear1,linear2")
    adapters.add_lora(model.lm, targets, rank, alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if name.endswith(".lora_B"):  # B starts at zero: an untrained adapter would change nothing
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    config = {"format": "musicgen-ft-lora", "version": 1, "base_model": base, "rank": rank, "alpha": alpha,
              "targets": targets, "patterns": "q,k,v,out_proj,linear1,linear2"}  # fmt: skip
    return weights.write_trained_model(
        path,
        state_dict={},
        cfg=model.lm.cfg,
        base_model=base,
        finetune={"method": "lora", "adapter": {**config, "merged": False}},
        extra_files=adapters.save_adapter(model.lm.state_dict(), config),
    )


def rewrite_tar(src: Path, dst: Path, edit) -> Path:
    """A copy of tar `src` with each member's bytes passed through `edit(name, data) -> data`."""
    import io

    with tarfile.open(src) as archive, tarfile.open(dst, "w") as out:
        for member in archive.getmembers():
            data = edit(member.name, archive.extractfile(member).read())
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return dst


def edit_finetune(change):
    def edit(name: str, data: bytes) -> bytes:
        if name != weights.FINETUNE_FILE:
            return data
        info = json.loads(data)
        change(info)
        return json.dumps(info).encode()

    return edit


def lm_logits(model, codes: torch.Tensor, text: str = "lofi beat") -> torch.Tensor:
    """LM logits `[B, K, T, card]` for fixed codes and a text condition (eval mode; invalid pattern steps 0)."""
    lm = model.lm.eval()
    attrs = [ConditioningAttributes(text={"description": text}) for _ in range(codes.shape[0])]
    with torch.no_grad():
        cond = lm.condition_provider(lm.condition_provider.tokenize(attrs))
        out = lm.compute_predictions(codes, [], condition_tensors=cond)
    return out.logits.masked_fill(~out.mask[..., None].bool(), 0.0)
