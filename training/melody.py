"""Melody conditioning (`self_wav`) for melody models, computed once per clip instead of once per step.

audiocraft's ChromaStemConditioner runs demucs and a chroma extractor on every training example, unless its
`cache` (an `EmbeddingCache`, set from `cache_path` in its config) holds the full-clip chroma, from which it cuts
the chunk at the example's seek time. `ChromaCache` is such a cache kept in memory: the chroma of every clip is
computed up front with the conditioner's own code (demucs stems, then chroma) and each example's chunk is cut the
way `ChromaStemConditioner._extract_chroma_chunk` cuts it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import typing as tp
from pathlib import Path

import torch
import torch.nn.functional as F

from core.progress import progress_bar
from training.data import ClipTokens, cache_key, load_clip_audio
from training.dist import DistInfo, barrier

logger = logging.getLogger(__name__)
CHROMA_SEED = 0

__all__ = [
    "ChromaCache",
    "melody_conditioners",
    "prepare_melody_training",
    "restore_for_generation",
    "generation_setup",
]


def melody_conditioners(lm: tp.Any) -> dict[str, tp.Any]:
    from audiocraft.modules.conditioners import ChromaStemConditioner

    return {
        name: cond
        for name, cond in lm.condition_provider.conditioners.items()
        if isinstance(cond, ChromaStemConditioner)
    }


class ChromaCache:
    """The `cache` of a ChromaStemConditioner: full-clip chroma `[T_chroma, n_chroma]` per clip path, in memory."""

    def __init__(self, chroma: dict[str, torch.Tensor], sample_rate: int, winhop: int, device: str | torch.device):
        self.chroma = chroma
        self.sample_rate = sample_rate
        self.frame_rate = sample_rate / winhop
        self.device = device

    def populate_embed_cache(self, paths: list[Path], x: tp.Any) -> None:
        """Everything is in memory already (the conditioner calls this from `tokenize`)."""
        missing = [str(p) for p in paths if str(p) not in self.chroma]
        if missing:
            raise KeyError(f"no cached chroma for {missing[0]}")

    def get_embed_from_cache(self, paths: list[Path], x: tp.Any) -> torch.Tensor:
        """`[B, T, n_chroma]`: for each example the chroma from its seek time over the segment's length."""
        target_length = int(self.frame_rate * x.wav.shape[-1] / self.sample_rate)
        chunks = []
        for idx, path in enumerate(paths):
            full = self.chroma[str(path)]
            start = int(self.frame_rate * x.seek_time[idx])
            chunk = full[start : start + target_length]
            chunks.append(F.pad(chunk, (0, 0, 0, target_length - chunk.shape[0])))
        return torch.stack(chunks).to(self.device)


@torch.no_grad()
def compute_chroma(conditioner: tp.Any, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """`[T_chroma, n_chroma]` of a mono `[1, T]` clip: demucs (vocals + other stems), then chroma.

    demucs' `apply_model` shifts the input by a random offset drawn from Python's `random`; a fixed seed per call
    makes the cached chroma (and so a run) reproducible, and the caller's random state is left as it was.
    """
    state = random.getstate()
    random.seed(CHROMA_SEED)
    try:
        return conditioner._compute_wav_embedding(wav[None].to(conditioner.device), sample_rate)[0].float().cpu()
    finally:
        random.setstate(state)


def prepare_melody_training(
    lm: tp.Any, clips: list[ClipTokens], cache_dir: Path, dist: DistInfo, model_key: str
) -> dict[str, ChromaCache]:
    """Compute each clip's chroma once (cached on disk in `cache_dir`, shared by ranks) and install the caches.

    `model_key` names the base model in the cache keys (another model's demucs gives other chroma). Also switches
    the conditioners to their training behaviour (`match_len_on_eval` off, length masking on),
    which `MusicGen.get_pretrained` turns the other way for generation.
    """
    caches = {}
    for name, cond in melody_conditioners(lm).items():
        folder = cache_dir / f"chroma-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / cache_key(f"chroma|{model_key}|{name}", Path(c.path)) for c in clips]
        todo = [i for i in range(len(clips)) if i % dist.world_size == dist.rank and not files[i].is_file()]
        for i in progress_bar(todo, desc=f"Melody chroma ({name})", unit="clip", disable=not dist.is_main or not todo):
            wav = load_clip_audio(clips[i].path, cond.sample_rate, 1)
            chroma = compute_chroma(cond, wav, cond.sample_rate)
            tmp = files[i].with_suffix(f".{dist.rank}.tmp")
            torch.save(chroma, tmp)
            tmp.replace(files[i])
        barrier(dist)
        chroma = {
            c.path: torch.load(f, map_location="cpu", weights_only=True) for c, f in zip(clips, files, strict=True)
        }
        cond.match_len_on_eval = False
        cond._use_masking = True
        cond.cache = ChromaCache(chroma, cond.sample_rate, cond.chroma.winhop, cond.device)
        caches[name] = cond.cache
    return caches


def restore_for_generation(lm: tp.Any) -> None:
    """Back to how `MusicGen.get_pretrained` sets melody conditioners up for generation (and no training cache)."""
    for cond in melody_conditioners(lm).values():
        cond.cache = None
        cond.match_len_on_eval = True
        cond._use_masking = False


@contextlib.contextmanager
def generation_setup(lm: tp.Any) -> tp.Iterator[None]:
    """For the length of the block, the melody conditioners as `restore_for_generation` leaves them (a melody's
    chroma computed from its audio, padded or cut to the conditioner's length, no training cache); afterwards back
    to the training's set-up (`prepare_melody_training`: the cached chroma, length masking), whatever happened."""
    saved = {
        name: (cond.cache, cond.match_len_on_eval, cond._use_masking) for name, cond in melody_conditioners(lm).items()
    }
    restore_for_generation(lm)
    try:
        yield
    finally:
        conditioners = melody_conditioners(lm)
        for name, (cache, match_len, masking) in saved.items():
            cond = conditioners[name]
            cond.cache, cond.match_len_on_eval, cond._use_masking = cache, match_len, masking
