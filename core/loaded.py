"""`LoadedModel`: a MusicGen as this project loaded it, and what we know of it.

audiocraft's `MusicGen` is kept as it is (nothing of ours is stamped on it); what the loaders know besides it
travels here: the model version's record (`core.catalogue.ModelSpec`, None for a local folder the catalogue does not
name), where it came from, the fine-tune's `finetune.json` and weights folder, and the LoRA adapter merged into it
(`core.adapters.MergedLoRA`: `set_scale` re-folds it on the loaded base). Every loader returns one
(`core.versions.load_musicgen`, `core.weights.load_trained_model`); generation and training take it.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from core.adapters import MergedLoRA
from core.catalogue import ModelSpec


@dataclass
class LoadedModel:
    """`musicgen`: audiocraft's `MusicGen`; `name`: what logs and messages call it (a model_version, a folder, or
    `<method> fine-tune of <base>`); `spec`: the record of its model version (a fine-tune: its base's); `source`:
    where it was loaded from (hub id, folder, or the weights reference as the user gave it); `finetune_info`:
    finetune.json (empty for a model version); `weights_folder`: the fine-tune's unpacked weights (None for a
    model version; the cache never evicts the loaded one); `adapter`: the merged LoRA adapter, None without one."""

    musicgen: tp.Any
    name: str
    spec: ModelSpec | None
    source: str
    finetune_info: dict[str, tp.Any] = field(default_factory=dict)
    weights_folder: Path | None = None
    adapter: MergedLoRA | None = None

    @property
    def lm(self) -> tp.Any:
        """audiocraft's `LMModel` of `musicgen` (what training adapts and the sampler reads)."""
        return self.musicgen.lm

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None
