"""Training examples as cached EnCodec tokens: encode every clip once, then take random crops on the codes.

audiocraft's solver (and sakemin's trainer) decode and re-encode the audio of every example at every step; here
each clip is encoded once (`encode_clips`, cached on disk per clip) and a batch is a crop of `[K, T]` code arrays,
padded with the LM's special token and masked where a clip is shorter than the segment (the same padding and mask
audiocraft's solver builds for padded audio).

The batch plan is a pure function of `(seed, step)`: which clips and where to crop does not depend on earlier
steps, the number of processes or a resume.
"""

from __future__ import annotations

import hashlib
import logging
import math
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.audio import convert_channels, load_audio, resample
from core.progress import progress_bar
from training.dist import DistInfo, barrier

logger = logging.getLogger(__name__)

__all__ = ["ClipTokens", "Batch", "TokenDataset", "encode_clips", "clip_attributes"]

# The text attributes MusicInfo carries besides the description (used when a model conditions on them).
INFO_TEXT_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "instrument", "name")


@dataclass
class ClipTokens:
    """One prepared clip as codes. `codes`: `[K, T]` int16 at the compression model's frame rate."""

    path: str
    codes: torch.Tensor
    description: str
    info: dict = field(default_factory=dict)
    n_samples: int = 0  # valid audio samples at the model's sample rate

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[-1])


@dataclass
class Batch:
    """A micro-batch for one process. `codes`/`mask`: `[B, K, T]`; `offsets`: crop start frames `[B]`."""

    codes: torch.Tensor
    mask: torch.Tensor
    items: list[int]
    offsets: list[int]
    attributes: list[tp.Any]  # audiocraft ConditioningAttributes, one per item

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def cache_key(model_key: str, path: Path) -> str:
    stat = path.stat()
    blob = f"{model_key}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compression_fingerprint(compression_model: torch.nn.Module) -> str:
    """A short key of the compression model's weights, so cached codes never outlive a change of model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(compression_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(f"{tuple(tensor.shape)}:{float(tensor.float().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


def load_clip_audio(path: str | Path, sample_rate: int, channels: int) -> torch.Tensor:
    """`[channels, T]` at `sample_rate` (resampled, downmixed or duplicated as the model needs)."""
    wav, sr = load_audio(path)
    return convert_channels(resample(wav, sr, sample_rate), channels)


@torch.no_grad()
def encode_clips(
    compression_model: tp.Any, clips: tp.Sequence[tp.Any], cache_dir: Path, dist: DistInfo, device: str
) -> list[ClipTokens]:
    """Encode every clip once with the (frozen) compression model; codes are cached as files in `cache_dir`.

    `clips`: objects with `path`, `description` and `info` (preprocessing's PreparedClip). Under several
    processes each encodes its share (clip i on rank i % world_size), then every process reads all of them.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    model_key = compression_fingerprint(compression_model)
    sample_rate, channels = int(compression_model.sample_rate), int(compression_model.channels)
    keys = [cache_key(model_key, Path(c.path)) for c in clips]
    todo = [i for i, key in enumerate(keys) if i % dist.world_size == dist.rank and not (cache_dir / key).is_file()]
    compression_model.eval()
    for i in progress_bar(todo, desc="Encoding clips", unit="clip", disable=not dist.is_main or not todo):
        wav = load_clip_audio(clips[i].path, sample_rate, channels)
        codes, scale = compression_model.encode(wav[None].to(device))
        if scale is not None:
            raise RuntimeError("a compression model with scale (renormalize=True) cannot feed the LM")
        if int(codes.max()) >= 2**15:
            raise RuntimeError(f"codes of {clips[i].path} do not fit int16")
        payload = {"codes": codes[0].to("cpu", torch.int16), "n_samples": int(wav.shape[-1])}
        tmp = cache_dir / f".{keys[i]}.{dist.rank}.tmp"
        torch.save(payload, tmp)
        tmp.replace(cache_dir / keys[i])
    barrier(dist)
    out = []
    for clip, key in zip(clips, keys, strict=True):
        payload = torch.load(cache_dir / key, map_location="cpu", weights_only=True)
        out.append(
            ClipTokens(
                path=str(clip.path),
                codes=payload["codes"],
                description=clip.description or "",
                info=dict(getattr(clip, "info", {}) or {}),
                n_samples=payload["n_samples"],
            )
        )
    if dist.is_main:
        logger.info(
            "%d clips as tokens: %.1f min of audio, %d codebooks (cache %s)",
            len(out),
            sum(c.n_samples for c in out) / sample_rate / 60,
            out[0].codes.shape[0] if out else 0,
            cache_dir,
        )
    return out


def _text_value(value: tp.Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or None
    return str(value)


def clip_attributes(
    clip: ClipTokens,
    *,
    text_conditions: tp.Sequence[str],
    wav_conditions: tp.Sequence[str],
    seek_time: float,
    segment_samples: int,
    valid_samples: int,
    sample_rate: int,
) -> tp.Any:
    """audiocraft `ConditioningAttributes` of one example, as its MusicDataset would build them.

    Text: `description` from the clip (empty means unconditional), other text attributes from the clip's info.
    Wav (melody models' `self_wav`): a `WavCondition` whose path and seek time address the chroma cache
    (training.melody.ChromaCache); its waveform is silence of the segment's length, since only the length is
    read when the chroma comes from the cache.
    """
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    text = {}
    for name in text_conditions:
        text[name] = _text_value(clip.description if name == "description" else clip.info.get(name))
    wav = {}
    for name in wav_conditions:
        wav[name] = WavCondition(
            wav=torch.zeros(1, 1, segment_samples),
            length=torch.tensor([valid_samples]),
            sample_rate=[sample_rate],
            path=[clip.path],
            seek_time=[seek_time],
        )
    return ConditioningAttributes(text=text, wav=wav)


class TokenDataset:
    """Random `segment_frames` crops of cached codes, planned per optimizer step.

    Args:
        clips: the encoded clips.
        segment_frames: crop length in frames (a shorter clip is padded with `special_token_id` and masked).
        special_token_id: the LM's padding token (= card).
        frame_rate: codes per second; `sample_rate`: audio samples per second (for the melody condition).
        text_conditions / wav_conditions: the attribute names the LM's condition provider expects.
    """

    def __init__(
        self,
        clips: list[ClipTokens],
        *,
        segment_frames: int,
        special_token_id: int,
        frame_rate: float,
        sample_rate: int,
        text_conditions: tp.Sequence[str] = ("description",),
        wav_conditions: tp.Sequence[str] = (),
    ):
        if not clips:
            raise ValueError("no clips to train on")
        self.clips = clips
        self.segment_frames = int(segment_frames)
        self.special_token_id = int(special_token_id)
        self.frame_rate = float(frame_rate)
        self.sample_rate = int(sample_rate)
        self.text_conditions = tuple(text_conditions)
        self.wav_conditions = tuple(wav_conditions)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.clips)

    def _epoch_order(self, epoch: int, needed: int, seed: int) -> np.ndarray:
        """The clip order of an epoch: consecutive shuffles of all clips, as many as `needed` items require."""
        order = self._orders.get(epoch)
        if order is None or len(order) < needed:
            n = len(self.clips)
            passes = max(1, math.ceil(needed / n))
            perms = [np.random.default_rng([seed, epoch, p]).permutation(n) for p in range(passes)]
            order = np.concatenate(perms)
            self._orders = {epoch: order}  # one epoch at a time: bounded memory
        return order

    def plan(self, step: int, *, global_batch: int, steps_per_epoch: int, seed: int) -> list[tuple[int, int]]:
        """The `(clip index, start frame)` of each of the `global_batch` examples of optimizer step `step`."""
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        order = self._epoch_order(epoch, (step_in_epoch + 1) * global_batch, seed)
        items = order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]
        crop_rng = np.random.default_rng([seed, 1_000_003, step])
        starts = crop_rng.random(global_batch)
        plan = []
        for item, u in zip(items.tolist(), starts.tolist(), strict=True):
            spare = max(0, self.clips[item].n_frames - self.segment_frames)
            plan.append((item, min(spare, int(u * (spare + 1)))))
        return plan

    def make_batch(self, plan: tp.Sequence[tuple[int, int]]) -> Batch:
        """Codes `[B, K, T]` (long), mask `[B, K, T]` (bool) and conditions for the planned examples."""
        k = self.clips[0].codes.shape[0]
        t = self.segment_frames
        codes = torch.full((len(plan), k, t), self.special_token_id, dtype=torch.long)
        mask = torch.zeros((len(plan), k, t), dtype=torch.bool)
        attributes = []
        hop = self.sample_rate / self.frame_rate
        for b, (item, start) in enumerate(plan):
            clip = self.clips[item]
            piece = clip.codes[:, start : start + t]
            n = piece.shape[-1]
            codes[b, :, :n] = piece.long()
            mask[b, :, :n] = True
            attributes.append(
                clip_attributes(
                    clip,
                    text_conditions=self.text_conditions,
                    wav_conditions=self.wav_conditions,
                    seek_time=start / self.frame_rate,
                    segment_samples=int(round(t * hop)),
                    valid_samples=min(int(round(n * hop)), max(0, clip.n_samples - int(round(start * hop)))),
                    sample_rate=self.sample_rate,
                )
            )
        return Batch(codes, mask, [p[0] for p in plan], [p[1] for p in plan], attributes)

    def rank_micro_batches(
        self,
        step: int,
        *,
        global_batch: int,
        steps_per_epoch: int,
        seed: int,
        dist: DistInfo,
        grad_accumulation: int,
    ) -> list[Batch]:
        """This process's share of step `step`, split into `grad_accumulation` micro-batches.

        Rank r takes the r-th contiguous slice of the global batch, so the union over ranks (and over
        micro-batches) is the same global batch whatever the number of processes.
        """
        plan = self.plan(step, global_batch=global_batch, steps_per_epoch=steps_per_epoch, seed=seed)
        per_rank = global_batch // dist.world_size
        mine = plan[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        micro = per_rank // grad_accumulation
        return [self.make_batch(mine[i * micro : (i + 1) * micro]) for i in range(grad_accumulation)]
