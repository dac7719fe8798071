"""Fine-tuning a MusicGen-Style model (`style`, `tiny-style`): the style conditioner frozen, each example's style
condition taken from a random excerpt of its own audio.

As in audiocraft's MusicGen-Style training, the style condition of an example is an excerpt of the example itself
(1.5-4.5 s, random length and start, drawn inside the conditioner), and the LM gets no loss on the frames of that
excerpt (`core.style.StyleLMModel.compute_predictions`), so it learns the style rather than copying the excerpt.
Unlike audiocraft's from-scratch training, the conditioner (feature extractor, transformer, RVQ bottleneck, output
projection) stays frozen: only the LM's transformer learns, so the `style_eval_q` control keeps its meaning.

The trainer's batches hold cached codes, not audio: their `self_wav` conditions carry only the clip's path, the
crop start (`seek_time`) and the valid length (`training.data.clip_attributes`). `ClipAudioSource` puts the crop's
audio in, when the conditioner tokenizes the batch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import typing as tp

import torch
from audiocraft.modules.conditioners import WavCondition

from core.style import freeze_style_conditioners, style_conditioners
from training.data import load_clip_audio

logger = logging.getLogger(__name__)

__all__ = ["ClipAudioSource", "prepare_style_training", "style_conditioners", "generation_setup"]


class ClipAudioSource:
    """`WavCondition` -> `WavCondition` with, for each example that has a clip path and a length, the mono audio of
    its crop (from `seek_time`, at `sample_rate`) instead of the placeholder; null conditions (dropped out, or
    generation inputs without a path) pass unchanged. Recently used clips stay decoded in memory (`max_clips`)."""

    def __init__(self, sample_rate: int, max_clips: int = 32):
        self.sample_rate = int(sample_rate)
        self.max_clips = max_clips
        self._clips: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def clip(self, path: str) -> torch.Tensor:
        """`[T]` mono audio of a clip at `sample_rate`."""
        audio = self._clips.pop(path, None)
        if audio is None:
            audio = load_clip_audio(path, self.sample_rate, 1)[0]
        self._clips[path] = audio
        while len(self._clips) > self.max_clips:
            self._clips.popitem(last=False)
        return audio

    def __call__(self, x: tp.Any) -> tp.Any:
        if not any(p is not None for p in x.path) or not bool((x.length > 0).any()):
            return x
        wav = x.wav.clone()  # [B, 1, T]: T = the longest crop of the batch, in samples
        for i, (path, seek) in enumerate(zip(x.path, x.seek_time, strict=True)):
            if path is None or int(x.length[i]) <= 0:
                continue
            audio = self.clip(str(path))
            start = int(round(float(seek or 0.0) * self.sample_rate))
            piece = audio[start : start + min(int(x.length[i]), wav.shape[-1])]
            wav[i] = 0.0
            wav[i, 0, : piece.shape[-1]] = piece.to(wav)
        return WavCondition(wav, x.length, x.sample_rate, x.path, x.seek_time)


def prepare_style_training(lm: tp.Any, seed: int) -> dict[str, tp.Any]:
    """Freeze `lm`'s style conditioners and give them each example's audio; returns them (empty: not a style LM).

    `seed` seeds Python's `random`, from which the conditioner draws excerpt lengths and starts (as audiocraft's).
    """
    conditioners = style_conditioners(lm)
    if not conditioners:
        return {}
    freeze_style_conditioners(lm)
    for name, conditioner in conditioners.items():
        conditioner.audio_source = ClipAudioSource(conditioner.sample_rate)
        low, high = conditioner.varying_lengths or (conditioner.length_subwav / conditioner.sample_rate,) * 2
        logger.info(
            "Style conditioner %s frozen; style from a random %.1f-%.1f s excerpt of each example (no loss there)",
            name,
            low,
            high,
        )
    random.seed(seed)
    return conditioners


@contextlib.contextmanager
def generation_setup(lm: tp.Any, excerpt_length: float, eval_q: int) -> tp.Iterator[None]:
    """For the length of the block, `lm`'s style conditioners set as predict sets them for a request
    (`generation.style.configure`: `excerpt_length` seconds of the style audio, `eval_q` codebooks); afterwards
    each is back as training left it: its mode, excerpt length, codebooks and last excerpt (which the training's
    loss mask reads), whatever happened."""
    conditioners = style_conditioners(lm)
    saved = {name: (c.training, c.length_subwav, c.eval_q, c.last_excerpt) for name, c in conditioners.items()}
    try:
        for conditioner in conditioners.values():
            conditioner.set_params(eval_q=max(1, min(eval_q, conditioner.n_q_out)), excerpt_length=excerpt_length)
        yield
    finally:
        for name, (training, length, eval_q_was, excerpt) in saved.items():
            c = conditioners[name]
            c.length_subwav, c.eval_q, c.last_excerpt = length, eval_q_was, excerpt
            c.train(training)
