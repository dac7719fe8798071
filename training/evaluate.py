"""Held-out validation: the split by track, the validation loss, and keeping the best weights.

- **Split** (`split_by_track`): a share of the *tracks* (`validation_split`) is held out, chosen from `seed`; every
  clip of a track lands on the same side, so no neighbouring 30 s clip of a validation track is ever trained on.
  Or `validation_path`: a second archive / prepared folder, prepared like `dataset_path` (`prepare_validation`).
- **Loss** (`Evaluator.evaluate`): exactly the training loss (the LM's codebook pattern, the padding mask, each
  clip's own description), without condition dropout, on fixed crops that tile every validation clip, summed over
  every valid token per codebook and then averaged over codebooks (the training loss of the whole validation set
  as one batch, whatever the batching and the number of processes). Conditional and unconditional (conditions
  nulled as classifier-free guidance does), per codebook. Under several processes the crops are dealt out over
  the ranks and the sums all-reduced.
- **Best weights**: after each evaluation the tensors that the export writes (the trained ones: the whole LM for
  `full`, only the adapters / embeddings for LoRA and textual inversion; the EMA when `ema` is on) are copied to
  CPU memory when the validation loss is the lowest so far, and put back at the end (`keep_best`).
  `early_stop_patience` stops after that many evaluations without a new best. Everything is in the resume
  checkpoint (`state_dict`/`load_state_dict`).

- **Forgetting** (`forgetting_check`, `general_music`): at every evaluation, the same loss on general music the base
  model generated for other genres: prior preservation's examples of other genres when the run has them, else
  `FORGET_PROMPTS` generated once before training (cached in `cache/forgetting/`). Reported, never used to pick
  the best weights; flagged "forgetting up" when the fine-tuned weights' loss there exceeds the base model's by
  more than `FORGET_RISE`.

`train_loop` calls the evaluator at three points: before the first step (the base model), after every
`eval_every` steps (0: each epoch's end) and after the last step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.audio import AudioDecodeError, encode_mp3, load_audio, resample
from core.catalogue import SPEC
from core.params import InputError
from evaluation.clap import CLAP_REPO, clap_skip_reason, kad, load_clap, prompt_adherence
from evaluation.clap import copy_check as clap_copy_check
from evaluation.clap import frechet as clap_frechet
from evaluation.effnet import effnet_frechet
from evaluation.embed import copy_check, encodec_latents
from evaluation.frechet import embedding_frechet, fmt_distance
from evaluation.health import THRESHOLDS as HEALTH_THRESHOLDS
from evaluation.health import indistinguishable, pair_correlations, sample_health
from generation.generate import generate_audio, normalize, resolved_precision
from generation.params import PredictParams
from preprocessing.dataset import PreparedClip, load_prepared
from preprocessing.fingerprint import SOURCE_KEY, Fingerprints, fingerprint
from preprocessing.params import PrepareParams, is_url, url_message
from preprocessing.prepare import prepare
from training.data import TokenDataset
from training.dist import DistInfo, barrier
from training.melody import generation_setup as melody_generation
from training.melody import melody_conditioners, restore_for_generation
from training.methods.prior import example_key, save_examples
from training.params import TrainParams, prepare_kwargs
from training.report import finite_json
from training.style import generation_setup as style_generation
from training.style import style_conditioners

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_TRACKS",
    "Split",
    "Evaluator",
    "EvalContext",
    "check",
    "check_validation_data",
    "track_of",
    "split_by_track",
    "select_validation",
    "prepare_validation",
    "fixed_crops",
    "forgetting_wanted",
    "dropped_without_validation",
    "general_music",
    "FORGET_PROMPTS",
    "FORGET_RISE",
    "VALIDATION_RISE",
]

# A share of the tracks is held out from this many tracks on: with fewer, every track is needed to train (and one
# held-out track of 3 or 4 would be a quarter of the data or more).
MIN_TRACKS = 5
MAX_LISTED = 200  # track names listed in finetune.json (as its descriptions are)
# Separates the split's random stream from the batch plan's (which seeds with [seed, epoch, pass]).
_SPLIT_STREAM = 14_000_014
VALIDATION_WORK = "work-validation"
EVAL_SEED = 14_000_015

# "validation up": the last evaluation's loss is this share above the best one's (over-fitting, or a too high lr).
VALIDATION_RISE = 0.05
# "forgetting up": the fine-tuned weights' loss on general music is this share above the base model's (the
# exported weights', or the last evaluation's). The same 5 % as "validation up": a relative rule, as the loss
# scale differs between models (~6 nats/token for the tiny test model, less for a trained MusicGen). It separates
# the demo runs by far (tests/training/test_validation_demo.py: at a sane lr the tiny random base's loss there
# falls ~15 %, at an absurd lr it rises ~275 %); on a real MusicGen it is uncalibrated here (no weights offline).
FORGET_RISE = 0.05
# Forgetting without prior preservation: a fixed, varied set of genres, one sample each, generated once per run by
# the base model (cache/forgetting/), of at most FORGET_SECONDS (the crop length when shorter).
FORGET_PROMPTS = (
    "classical music, a string quartet playing a slow romantic piece",
    "jazz, piano trio with upright bass and brushed drums",
    "rock, distorted electric guitars, bass guitar and loud drums",
    "electronic dance music, four-on-the-floor kick, synth bass and bright leads",
    "hip hop beat, boom bap drums and a sampled soul piano",
    "acoustic folk, fingerpicked guitar and a harmonica",
    "reggae, offbeat guitar skank and a deep bass line",
    "ambient, slow evolving synthesizer pads",
)
FORGET_SECONDS = 8.0
MAX_FORGET_CLIPS = 32  # prior-preservation examples of other genres the forgetting loss is measured on


def check(params: TrainParams) -> None:
    """Input checks of the validation inputs that need no data (in `training.params.validate`)."""
    path = _text(params.validation_path)
    if path is not None and _text(params.dataset_path) is not None:
        same = Path(path).expanduser().resolve() == Path(str(params.dataset_path)).expanduser().resolve()
        if same:
            raise InputError(
                "validation_path",
                "is the training data itself (dataset_path): give other tracks, or leave it empty and let "
                "validation_split hold out a share of dataset_path's tracks",
            )


MAX_NAMED = 10  # shared tracks named in a warning (the count says the rest)


def check_validation_data(params: TrainParams, dataset: Fingerprints | None, byte_cap: int) -> Fingerprints | None:
    """`validation_path` by content, before anything is prepared: it must exist and hold audio, and must not be the
    training data under another name (the same archive uploaded twice, a copy, a hard link, another archive of the
    same tracks, the prepared folder of the training clips). Every track shared: refused; some: a warning naming
    them. Returns its fingerprints (None without validation_path)."""
    path = _text(params.validation_path)
    if path is None:
        return None
    if is_url(path):
        raise InputError("validation_path", url_message(path))
    found = fingerprint(path, "validation_path", byte_cap)
    name = Path(path).name
    if not found.tracks:
        what = f"{found.files} file(s), none of them" if found.files else "no file, no"
        raise InputError(
            "validation_path",
            f"{name} holds {what} audio (wav, mp3, flac, ogg, opus, m4a, aac, aiff): give an archive or audio file of "
            "tracks that are not in dataset_path",
        )
    if found.kind == "unknown":  # neither an archive nor a known audio signature: decoding decides, before any work
        try:
            load_audio(path)
        except AudioDecodeError as e:
            raise InputError(
                "validation_path",
                f"{name} is neither an archive (zip, tar, tar.gz, tgz, gz) nor audio we can decode ({e}); give an "
                "archive of held-out tracks or one audio file",
            ) from None
    if dataset is None:
        return found
    shared = found.shared_with(dataset)
    if shared and len(shared) == len(found.tracks):
        raise InputError(
            "validation_path",
            f"every one of its {len(shared)} track(s) is also in dataset_path (the same audio, compared by content: "
            f"{_named(shared)}), so it would validate on the training data; give other tracks, or leave it empty "
            "and let validation_split hold out a share of dataset_path's tracks",
        )
    if shared:
        logger.warning(
            "validation_path: %d of its %d tracks are also in dataset_path (the same audio, compared by content), so "
            "their validation loss is measured on training data: %s. Remove them from one of the two uploads for a "
            "clean validation",
            len(shared),
            len(found.tracks),
            _named(shared),
        )
    return found


def _named(names: list[str]) -> str:
    more = len(names) - MAX_NAMED
    return ", ".join(names[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def _text(value: tp.Any) -> str | None:
    return str(value) if value is not None and str(value).strip() else None


def track_of(clip: tp.Any) -> str:
    """The track a prepared clip was cut from (`PreparedClip.source`, else its sidecar's `source`, else its file)."""
    source = getattr(clip, "source", None) or (getattr(clip, "info", None) or {}).get("source")
    return str(source or Path(str(clip.path)).name)


@dataclass
class Split:
    """Which clips train and which validate, and what the report says about it (`info`)."""

    train: list
    validation: list
    info: dict = field(default_factory=dict)


def split_by_track(clips: tp.Sequence[tp.Any], share: float, seed: int) -> Split:
    """Hold out `round(share x tracks)` tracks (at least 1, never all) chosen from `seed`; off below `MIN_TRACKS`
    tracks or with `share` 0. The choice depends only on the set of track names and the seed, not on clip order."""
    same = _same_audio(clips)
    tracks = sorted({same.get(track_of(c), track_of(c)) for c in clips})
    base = {"validation_split": share, "tracks": len(tracks)}
    if share <= 0:
        logger.info("Validation off (validation_split=0): all %d track(s) train", len(tracks))
        return Split(list(clips), [], {**base, "mode": "off"})
    if len(tracks) < MIN_TRACKS:
        logger.warning(
            "Validation off: %d track(s); validation_split holds out whole tracks from %d tracks on, so all train "
            "(give validation_path to validate on other tracks)",
            len(tracks),
            MIN_TRACKS,
        )
        return Split(list(clips), [], {**base, "mode": "off", "reason": f"fewer than {MIN_TRACKS} tracks"})
    n_held = min(len(tracks) - 1, max(1, round(share * len(tracks))))
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(tracks))
    held = sorted(tracks[i] for i in order[:n_held])
    held_set = set(held)
    train = [c for c in clips if same.get(track_of(c), track_of(c)) not in held_set]
    validation = [c for c in clips if same.get(track_of(c), track_of(c)) in held_set]
    info = {
        **base,
        "mode": "split",
        "validation_tracks": held,
        "training_tracks": sorted(set(tracks) - held_set)[:MAX_LISTED],  # the report lists at most this many
        "training_clips": len(train),
        "validation_clips": len(validation),
        "validation_seconds": round(sum(float(getattr(c, "duration", 0.0)) for c in validation), 2),
    }
    logger.info(
        "Validation split (validation_split=%g, seed): %d of %d tracks held out (%d clips, %.1f s): %s",
        share,
        n_held,
        len(tracks),
        len(validation),
        info["validation_seconds"],
        ", ".join(held),
    )
    return Split(train, validation, info)


def _same_audio(clips: tp.Sequence[tp.Any]) -> dict[str, str]:
    """Tracks of one upload that hold the same audio under other names (by the source fingerprint preparation
    records) -> the first of their names: they count as one track, so no copy trains while another validates."""
    by_hash: dict[str, set[str]] = {}
    for c in clips:
        sha = (getattr(c, "info", None) or {}).get(SOURCE_KEY)
        if isinstance(sha, str):
            by_hash.setdefault(sha, set()).add(track_of(c))
    alias = {}
    for names in by_hash.values():
        if len(names) > 1:
            first, *others = sorted(names)
            alias.update(dict.fromkeys(others, first))
            logger.warning(
                "Tracks %s hold the same audio: kept on one side of the validation split", ", ".join(sorted(names))
            )
    return alias


def prepare_validation(params: TrainParams, output_dir: Path) -> tp.Any:
    """`validation_path` as a prepared dataset (a prepared folder as is; anything else through
    `preprocessing.prepare` with dataset_path's preparation inputs, into `output_dir/work-validation`), or None."""
    path = _text(params.validation_path)
    if path is None:
        return None
    source = Path(path).expanduser()
    if source.is_dir() and (source / "data.jsonl").is_file():
        dataset = load_prepared(source)
    elif source.is_dir() and (source / "dataset" / "data.jsonl").is_file():
        dataset = load_prepared(source / "dataset")
    else:
        kwargs = {**prepare_kwargs(params), "dataset_path": path}
        try:
            dataset = prepare(PrepareParams(**kwargs), output_dir / VALIDATION_WORK)
        except InputError as e:  # preparation names dataset_path: here the input at fault is validation_path
            if e.name != "dataset_path":
                raise
            raise InputError("validation_path", str(e).split(": ", 1)[-1]) from None
    if not dataset.clips:
        raise InputError("validation_path", f"no usable clips in {path}: give an archive or folder of audio tracks")
    return dataset


def select_validation(params: TrainParams, clips: tp.Sequence[tp.Any], validation_dataset: tp.Any = None) -> Split:
    """The run's split: `validation_path`'s clips when given (every training clip trains), else `split_by_track`."""
    if validation_dataset is not None:
        held = list(validation_dataset.clips)
        tracks = sorted({track_of(c) for c in held})
        info = {
            "mode": "path",
            "validation_path": Path(str(params.validation_path)).name,
            "tracks": len({track_of(c) for c in clips}),
            "validation_tracks": tracks,
            "training_clips": len(clips),
            "validation_clips": len(held),
            "validation_seconds": round(sum(float(getattr(c, "duration", 0.0)) for c in held), 2),
        }
        logger.info("Validation on %s: %d clips of %d tracks", info["validation_path"], len(held), len(tracks))
        return Split(list(clips), held, info)
    return split_by_track(clips, params.validation_split, params.seed)


def fixed_crops(tokens: TokenDataset) -> list[tuple[int, int]]:
    """`(clip, start frame)` crops tiling every clip from its start: each code of every clip is in one crop
    (the last crop of a clip is padded and masked like a short training clip)."""
    crops = []
    for i, clip in enumerate(tokens.clips):
        crops += [(i, start) for start in range(0, max(1, clip.n_frames), tokens.segment_frames)]
    return crops


def forgetting_wanted(params: TrainParams, device: str, examples: tp.Sequence[tp.Any]) -> bool:
    """`forgetting_check`: on, off, or auto: on with a GPU, or when prior preservation generated examples of other
    genres anyway (nothing to generate); off on CPU otherwise, where generating the examples is slow. Never for a
    model trained from scratch: its base knows no music to forget."""
    mode = params.forgetting_check
    if mode == "off":
        return False
    known = SPEC.get(params.model_version)
    if known is not None and known.scratch:
        if mode == "on":
            logger.warning(
                "forgetting_check='on' is ignored: %s trains from scratch, its base model knows no music",
                params.model_version,
            )
        return False
    if mode == "on":
        return True
    return str(device).startswith("cuda") or any(_prior_general(c) for c in examples)


def dropped_without_validation(params: TrainParams) -> list[str]:
    """The validation inputs given a non-default value, for a run that turned out to have no validation set (fewer
    than `MIN_TRACKS` tracks; validation off is said before any work by `training.params.dropped_settings`)."""
    defaults = TrainParams()
    names = ("eval_every", "keep_best", "early_stop_patience", "forgetting_check")
    return [f"{n}={getattr(params, n)!r}" for n in names if getattr(params, n) != getattr(defaults, n)]


def _prior_general(clip: tp.Any) -> bool:
    return (getattr(clip, "info", None) or {}).get("prior") == "dissimilar"


def general_music(
    model: tp.Any, params: TrainParams, examples: tp.Sequence[tp.Any], cache_dir: Path, dist: DistInfo
) -> tuple[list[tp.Any], dict[str, tp.Any]]:
    """The clips forgetting is measured on and what the report says about them: prior preservation's examples of
    other genres when `examples` has them (at most `MAX_FORGET_CLIPS`), else one sample of each `FORGET_PROMPTS`
    generated by the base model (rank 0, before anything trains) with predict's sampler, cached in `cache_dir`
    under a key of the base model, prompt, length, seed and sampler precision (a resumed run reuses them)."""
    prior_clips = [c for c in examples if _prior_general(c)][:MAX_FORGET_CLIPS]
    if prior_clips:
        info = {"source": "prior_preservation", "prompts": sorted({c.description for c in prior_clips})}
        return prior_clips, {**info, "seconds": float(prior_clips[0].duration)}
    seconds = float(min(params.segment_duration, FORGET_SECONDS))
    precision = resolved_precision(model, params.sampler_precision)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = [
        cache_dir / f"{example_key(str(params.model_version), p, seconds, params.seed, precision)}.wav"
        for p in FORGET_PROMPTS
    ]
    if dist.is_main and not all(f.is_file() for f in files):
        logger.info(
            "Forgetting check: generating %d examples of %.1f s of other genres with the base model (sampler %s)",
            len(FORGET_PROMPTS),
            seconds,
            precision,
        )
        restore_for_generation(model.lm)
        with torch.random.fork_rng(devices=[]):  # the training's random streams are not touched
            torch.manual_seed(params.seed)
            state = random.getstate()
            try:
                wav = generate_audio(model, list(FORGET_PROMPTS), seconds, sampler_precision=precision)  # [B, C, T]
            finally:
                random.setstate(state)
        save_examples(files, wav, model.sample_rate)
    elif dist.is_main:
        logger.info("Forgetting check: %d cached examples of other genres (%s)", len(files), cache_dir)
    barrier(dist)
    clips = [
        PreparedClip(
            path=file,
            duration=seconds,
            sample_rate=int(model.sample_rate),
            channels=int(model.audio_channels),
            description=prompt,
            info={"description": prompt, "forgetting": True},
            source=f"forgetting:{i}",
        )
        for i, (file, prompt) in enumerate(zip(files, FORGET_PROMPTS, strict=True))
    ]
    return clips, {"source": "generated", "prompts": list(FORGET_PROMPTS), "seconds": seconds, "sampler": precision}


@dataclass
class EvalContext:
    """What an evaluation needs from the training loop (built once in `train_loop`).

    `forward(codes, mask, attributes)` returns `[2, K]` per-codebook cross-entropy sums and valid-token counts
    (the loop's step module in evaluation mode: under FSDP the sharded root, so every rank's all-gathers run).
    `weights`: what the model computes with (this rank's pieces under FSDP); `exported`: what the export writes
    (the EMA when on, else `weights`); `params`: the parameters they belong to (for gathering whole tensors).
    """

    forward: tp.Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]
    modules: torch.nn.Module
    dist: DistInfo
    device: str
    micro_batch: int
    autocast: tp.Any
    weights: list[torch.Tensor]
    exported: list[torch.Tensor]
    params: list[torch.Tensor]
    sharded: bool
    gather: tp.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (piece, param) -> whole on rank 0
    shard_of: tp.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (whole, param) -> this rank's piece
    # FSDP: a collective (every rank sends its pieces); rank 0 gets a plain copy of the LM with the weights as they
    # are now, None elsewhere (the samples during training generate with it). None: the LM is whole in each process.
    whole_lm: tp.Callable[[], torch.nn.Module | None] | None = None


class Evaluator:
    """Validation loss at fixed points of a run, and the weights of the best evaluation.

    Args:
        tokens: the validation clips as a `TokenDataset` (same crop length, padding and conditions as training).
        info: the split, for the report.
        every: evaluate after every `every` steps (and before the first, and after the last).
        keep_best: keep the best evaluation's exported tensors and export them.
        patience: stop after this many evaluations without a new best (0: never).
    """

    def __init__(
        self,
        tokens: TokenDataset,
        info: dict,
        *,
        every: int,
        keep_best: bool,
        patience: int,
        forgetting: TokenDataset | None = None,
        forgetting_info: dict | None = None,
        samples: TrainingSamples | None = None,
    ):
        self.tokens = tokens
        # Samples during training (rank 0): fixed prompts generated at each evaluation, within a time bound.
        self.samples = samples
        self._clock: float | None = None  # when the first evaluation of this process started
        # Forgetting: the same loss on general music the base model generated (`general_music`), at every
        # evaluation; reported only, the best weights follow the validation loss.
        self.forgetting = forgetting
        self.forgetting_info = dict(forgetting_info or {})
        self.forget_crops = fixed_crops(forgetting) if forgetting is not None else []
        self.info = dict(info)
        self.every = max(1, int(every))
        self.keep_best = keep_best
        self.patience = int(patience)
        self.crops = fixed_crops(tokens)
        self.history: list[dict[str, float]] = []
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.since_best = 0
        self.best: list[torch.Tensor] | None = None  # CPU copies of the exported tensors (this rank's pieces)
        self.stopped_early_at: int | None = None
        self.seconds = 0.0

    # ---- when
    def due(self, done: int, total_steps: int) -> bool:
        return done % self.every == 0 or done == total_steps

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    # ---- the loss
    def losses(self, ctx: EvalContext) -> dict[str, float]:
        """Validation metrics of the model as it is now (identical on every rank)."""
        return self._losses(ctx, self.tokens, self.crops)

    @torch.no_grad()
    def _losses(self, ctx: EvalContext, tokens: TokenDataset, crops: list[tuple[int, int]]) -> dict[str, float]:
        from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

        nullify = ClassifierFreeGuidanceDropout(p=1.0)  # what generation uses for the unconditional branch
        size = max(1, ctx.micro_batch)
        batches = [crops[i : i + size] for i in range(0, len(crops), size)]
        world, rank = ctx.dist.world_size, ctx.dist.rank
        mine = batches[rank::world]
        if ctx.sharded:  # FSDP all-gathers in every forward: every rank must run as many as the others
            per_rank = math.ceil(len(batches) / world)
            mine = mine + [None] * (per_rank - len(mine))
        k = tokens.clips[0].codes.shape[0]
        sums = torch.zeros(2, 2, k, dtype=torch.float64, device=ctx.device)  # [cond/uncond, sum/count, K]
        for chunk in mine:
            batch = tokens.make_batch(chunk if chunk is not None else batches[0][:1])
            mask = batch.mask if chunk is not None else torch.zeros_like(batch.mask)  # padding slot: counts nothing
            codes, mask = batch.codes.to(ctx.device), mask.to(ctx.device)
            for j, attributes in enumerate((batch.attributes, nullify(batch.attributes))):
                with ctx.autocast:
                    sums[j] += ctx.forward(codes, mask, attributes).to(torch.float64)
        if ctx.dist.distributed:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        sums = sums.cpu()
        per_codebook = sums[:, 0] / sums[:, 1].clamp(min=1)  # [2, K]
        metrics = {
            "val_loss": float(per_codebook[0].mean()),
            "val_loss_uncond": float(per_codebook[1].mean()),
            "val_tokens": float(sums[0, 1].sum()),
        }
        for q in range(k):
            metrics[f"val_loss_q{q}"] = float(per_codebook[0, q])
            metrics[f"val_loss_uncond_q{q}"] = float(per_codebook[1, q])
        return metrics

    def evaluate(self, step: int, ctx: EvalContext, final: bool = False) -> dict[str, float]:
        """Evaluate the weights after `step` steps (0: the base model), update the best, return the metrics.
        `final`: the run's last evaluation (its samples during training are made whatever their bound).

        Training sees no trace of it: the RNG states (torch, Python's `random`) and every module's train/eval mode
        are restored, and with EMA the EMA weights are evaluated (they are what the export writes) and swapped back.
        The model is in eval mode except MusicGen-Style's style conditioners, whose training behaviour (the style
        taken from the example's own audio) belongs to the loss; their random excerpts are seeded per evaluation.
        """
        started = time.perf_counter()
        self._clock = started if self._clock is None else self._clock
        sampled = None
        modes = {m: m.training for m in ctx.modules.modules()}
        python_state = random.getstate()
        swapped = None
        devices = [ctx.device] if ctx.device.startswith("cuda") else []
        try:
            with torch.random.fork_rng(devices=devices):
                # Whatever draws randomly in the forward (MusicGen-Style's excerpts) draws the same at every
                # evaluation: the evaluations compare weights, not excerpts.
                torch.manual_seed(EVAL_SEED)
                random.seed(EVAL_SEED)
                ctx.modules.eval()
                lm = getattr(ctx.modules, "lm", None)
                for conditioner in style_conditioners(lm).values() if lm is not None else ():
                    # its training behaviour is part of the training loss: the style comes from the example's own
                    # audio (eval mode would read the placeholder), an excerpt as in training
                    conditioner.train()
                if ctx.exported is not ctx.weights:  # EMA: evaluate the averaged weights
                    swapped = [w.detach().clone() for w in ctx.weights]
                    with torch.no_grad():
                        for w, e in zip(ctx.weights, ctx.exported, strict=True):
                            w.copy_(e)
                metrics = self.losses(ctx)
                if self.forgetting is not None:
                    forgot = self._losses(ctx, self.forgetting, self.forget_crops)
                    metrics["forget_loss"] = forgot["val_loss"]
                    metrics["forget_loss_uncond"] = forgot["val_loss_uncond"]
                # the weights evaluated above (EMA when on); under FSDP every rank takes part in gathering them
                if ctx.sharded or (self.samples is not None and ctx.dist.is_main):
                    sampled = self._sample(step, ctx, started, final)
        finally:
            if swapped is not None:
                with torch.no_grad():
                    for w, s in zip(ctx.weights, swapped, strict=True):
                        w.copy_(s)
            for m, mode in modes.items():
                m.train(mode)
            random.setstate(python_state)
        if not math.isfinite(metrics["val_loss"]):
            logger.warning("Validation loss at step %d is %s: not a candidate for the best weights", step, metrics)
        improved = math.isfinite(metrics["val_loss"]) and metrics["val_loss"] < self.best_loss
        if improved:
            self.best_loss, self.best_step, self.since_best = metrics["val_loss"], step, 0
            if self.keep_best:
                self.best = [t.detach().to("cpu", copy=True) for t in ctx.exported]
        else:
            self.since_best += 1
        sample_s = (sampled or {}).get("seconds", 0.0)
        seconds = time.perf_counter() - started - sample_s  # the loss's cost; the samples' is their own
        self.seconds += seconds
        metrics = {"step": step, **metrics, "best": 1.0 if improved else 0.0, "eval_s": seconds}
        if sampled is not None and sampled.get("files"):
            metrics["samples_s"] = sample_s
        self.history.append(metrics)
        if ctx.dist.is_main:
            logger.info(
                "Validation at step %d: loss %.4f (unconditional %.4f) over %d tokens of %d clips; best %.4f at "
                "step %d (%.1f s)",
                step,
                metrics["val_loss"],
                metrics["val_loss_uncond"],
                metrics["val_tokens"],
                len(self.tokens),
                self.best_loss,
                -1 if self.best_step is None else self.best_step,
                seconds,
            )
        if ctx.dist.is_main and "forget_loss" in metrics:
            base = self.history[0].get("forget_loss") if self.history[0]["step"] == 0 else None
            versus = ""
            if base and step:
                versus = f" (base {base:.4f}, {100 * (metrics['forget_loss'] / base - 1):+.1f} %)"
            logger.info(
                "Forgetting at step %d: loss %.4f on %d clips of other genres the base model generated%s",
                step,
                metrics["forget_loss"],
                len(self.forgetting),
                versus,
            )
        if self.should_stop:
            self.stopped_early_at = step
            if ctx.dist.is_main:
                logger.warning(
                    "Early stop after step %d: %d evaluations without a lower validation loss than step %d's %.4f "
                    "(early_stop_patience=%d)",
                    step,
                    self.since_best,
                    self.best_step,
                    self.best_loss,
                    self.patience,
                )
        return metrics

    def _sample(self, step: int, ctx: EvalContext, started: float, final: bool) -> dict[str, tp.Any] | None:
        """This evaluation's samples during training, within their bound (rank 0 generates; None elsewhere).

        Under FSDP each rank holds a piece of the LM: rank 0 decides whether the samples are due and tells the
        others (a broadcast); when they are, every rank sends its pieces, one weight at a time, into a plain copy
        of the LM on rank 0 (`EvalContext.whole_lm`), which generates and is dropped. The ranks stay in lockstep
        (the same collectives in the same order) and only rank 0 holds a whole copy, for the length of the call.
        """
        training_seconds = 0.0
        if self.samples is not None:  # wall time since the base, less evaluating and sampling
            training_seconds = started - self._clock - self.seconds - self.samples.spent
        if not ctx.sharded:
            return self.samples.sample(step, training_seconds, final=final)
        due = torch.tensor([int(self.samples is not None and self.samples.due(step, training_seconds, final))])
        if ctx.dist.distributed:
            due = due.to(ctx.device)
            torch.distributed.broadcast(due, src=0)
        if not bool(due.item()):
            return self.samples.sample(step, training_seconds, final=final) if self.samples is not None else None
        if self.samples is None:  # another rank: its pieces go to rank 0's copy
            ctx.whole_lm()
            return None
        return self.samples.sample(step, training_seconds, whole_lm=ctx.whole_lm, final=final)

    # ---- the best weights
    @torch.no_grad()
    def restore_best(self, ctx: EvalContext) -> int | None:
        """Put the best evaluation's tensors back into what the export writes; returns the exported step."""
        last = self.history[-1]["step"] if self.history else None
        if not self.keep_best or self.best is None or self.best_step is None:
            return last
        if self.best_step != last:
            for target, saved in zip(ctx.exported, self.best, strict=True):
                target.copy_(saved.to(target.device, target.dtype))
            if ctx.dist.is_main:
                logger.info(
                    "Exporting the weights of step %d (validation loss %.4f), the best evaluation; the last, step "
                    "%d, had %.4f (keep_best)",
                    self.best_step,
                    self.best_loss,
                    last,
                    self.history[-1]["val_loss"],
                )
        return self.best_step

    # ---- resume
    def state_dict(self, ctx: EvalContext, done: int) -> dict[str, tp.Any]:
        """Plain containers for the checkpoint of step `done`; whole tensors (gathered on rank 0 under FSDP: a
        collective). When the best evaluation is of step `done` its weights are the checkpoint's own: not copied."""
        best_is_current = self.best_step == done
        best = None
        if self.best is not None and not best_is_current:
            best = [ctx.gather(b.to(w.device), p) for b, w, p in zip(self.best, ctx.exported, ctx.params, strict=True)]
        return {
            "history": list(self.history),
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "since_best": self.since_best,
            "best": best,
            "best_is_current": best_is_current,
            "stopped_early_at": self.stopped_early_at,
            "info": self.info,
            "samples": self.samples.state_dict() if self.samples is not None else None,
        }

    def final_state(self) -> dict[str, tp.Any]:
        """The state after `restore_best`, for the checkpoint of a finished run (`training.loop.finished_state`):
        that checkpoint's weights are the exported ones, i.e. the best evaluation's, so no tensor is copied."""
        return {
            "history": list(self.history),
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "since_best": self.since_best,
            "best": None,
            "best_is_current": True,
            "stopped_early_at": self.stopped_early_at,
            "info": self.info,
            "samples": self.samples.state_dict() if self.samples is not None else None,
        }

    def load_state_dict(self, state: dict[str, tp.Any] | None, ctx: EvalContext) -> None:
        """Continue from a checkpoint's evaluation state (after the weights are loaded: `best_is_current` copies
        them)."""
        if not state:
            logger.warning("The checkpoint has no evaluation history (trained without validation): it starts here")
            return
        self.history = list(state.get("history", []))
        self.best_step = state.get("best_step")
        self.best_loss = float(state.get("best_loss", math.inf))
        self.since_best = int(state.get("since_best", 0))
        self.stopped_early_at = state.get("stopped_early_at")
        if self.samples is not None:
            self.samples.load_state_dict(state.get("samples"))
        self.best = None
        if self.keep_best and self.best_step is not None:
            if state.get("best_is_current"):
                self.best = [t.detach().to("cpu", copy=True) for t in ctx.exported]
            elif state.get("best") is not None:
                self.best = [ctx.shard_of(b, p).cpu() for b, p in zip(state["best"], ctx.params, strict=True)]

    # ---- the report
    def summary(self, exported_step: int | None) -> dict[str, tp.Any]:
        """What finetune.json / metrics.json say about the validation."""
        base = next((h for h in self.history if h["step"] == 0), None)
        last = self.history[-1] if self.history else None
        summary = {
            "split": self.info,
            "clips": len(self.tokens),
            "crops": len(self.crops),
            "eval_every": self.every,
            "keep_best": self.keep_best,
            "early_stop_patience": self.patience,
            "stopped_early_at": self.stopped_early_at,
            "base_loss": base["val_loss"] if base else None,
            "base_loss_uncond": base["val_loss_uncond"] if base else None,
            "final_loss": last["val_loss"] if last else None,
            "best_loss": self.best_loss if self.best_step is not None else None,
            "best_step": self.best_step,
            "exported_step": exported_step,
            "seconds": round(self.seconds, 2),
            "evaluations": self.history,
        }
        exported = next((h for h in self.history if h["step"] == exported_step), None)
        flags = []
        if _rose(self.best_loss if self.best_step is not None else None, last and last["val_loss"], VALIDATION_RISE):
            flags.append("validation up")
        if self.forgetting is not None:
            forget = {
                **self.forgetting_info,
                "clips": len(self.forgetting),
                "threshold": FORGET_RISE,
                "base_loss": base.get("forget_loss") if base else None,
                "exported_loss": exported.get("forget_loss") if exported else None,
                "final_loss": last.get("forget_loss") if last else None,
            }
            # the exported weights are what the user gets; later ones show where the run was heading
            forget["exported_up"] = _rose(forget["base_loss"], forget["exported_loss"], FORGET_RISE)
            forget["final_up"] = _rose(forget["base_loss"], forget["final_loss"], FORGET_RISE)
            summary["forgetting"] = forget
            if forget["exported_up"] or forget["final_up"]:
                flags.append("forgetting up")
        if self.samples is not None:
            summary["samples_during_training"] = self.samples.summary()
        summary["flags"] = flags
        summary["thresholds"] = {"validation_up": VALIDATION_RISE, "forgetting_up": FORGET_RISE}
        return finite_json(summary)  # finetune.json is strict JSON: a diverged loss is null, not NaN


def _rose(reference: float | None, value: float | None, share: float) -> bool:
    """`value` is more than `share` above `reference`, or not finite (diverged) where the reference is."""
    if reference is None or not math.isfinite(reference) or value is None:
        return False
    return not math.isfinite(value) or value > reference * (1.0 + share)


# ---------------------------------------------------------------------------------------------- audio check
# Base vs fine-tuned on the held-out descriptions, at the audio level (evaluation/embed.py, evaluation/frechet.py):
# the base model's samples are generated before training (set-up, like prior preservation's), the fine-tuned
# model's at the export, from the same prompts and seeds.

AUDIO_PROMPTS = 2
MAX_COPY_CLIPS = 64  # training clips the copy check compares with (embedding all of a large dataset is slow)


def audio_prompts(clips: tp.Sequence[tp.Any], n: int = AUDIO_PROMPTS) -> list[str]:
    """`n` held-out descriptions, distinct ones first (empty descriptions: unconditional samples)."""
    distinct = list(dict.fromkeys(c.description or "" for c in clips)) or [""]
    return [distinct[i % len(distinct)] for i in range(n)]


def generate_for_check(
    model: tp.Any,
    prompts: list[str],
    seconds: float,
    seed: int,
    sampler_precision: str,
    melody_wavs: tp.Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """`[B, C, T]` CPU float audio from `prompts` (and `melody_wavs`: each one's `self_wav` audio, see
    `generate_audio`) with predict's sampler, seeded (torch's and Python's `random`, from which demucs' shifts and a
    style excerpt's start are drawn); the caller's RNG states kept, and a melody model's conditioners set back to
    how the call found them (before training, during it, or at export)."""
    with melody_generation(model.lm), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = random.getstate()
        random.seed(seed)
        try:
            wav = generate_audio(model, prompts, seconds, sampler_precision=sampler_precision, melody_wavs=melody_wavs)
        finally:
            random.setstate(state)
    return wav.float().cpu()


def base_reference(model: tp.Any, held_out: tp.Sequence[tp.Any], params: TrainParams) -> dict[str, tp.Any]:
    """The base model's samples of the held-out prompts (before anything trains) and the held-out clips' files."""
    prompts = audio_prompts(held_out)
    logger.info(
        "Audio check: %d samples of %.1f s with the base model: %s", len(prompts), params.sample_duration, prompts
    )
    reference = {
        "prompts": prompts,
        "seconds": float(params.sample_duration),
        "seed": int(params.seed),
        "sampler_precision": params.sampler_precision,  # the fine-tuned samples are drawn at the same
        "base": generate_for_check(model, prompts, params.sample_duration, params.seed, params.sampler_precision),
        "validation_clips": [str(c.path) for c in held_out],
    }
    if clap_skip_reason() is None:  # CLAP will measure whether the fine-tune still follows prompts of other genres
        forget = list(FORGET_PROMPTS[:CLAP_FORGET_PROMPTS])
        logger.info("Audio check: %d samples of other genres with the base model, for CLAP: %s", len(forget), forget)
        reference["forget_prompts"] = forget
        reference["forget_base"] = generate_for_check(
            model, forget, params.sample_duration, params.seed, params.sampler_precision
        )
    return reference


def audio_check(model: tp.Any, reference: dict[str, tp.Any], training_clips: tp.Sequence[tp.Any]) -> dict[str, tp.Any]:
    """Fréchet distance to the held-out clips of the base model's and the fine-tuned model's samples (same prompts
    and seeds), in the frozen EnCodec's latent space, and the copy check of the fine-tuned samples against the
    training clips. Returns the summary and, under `"audio"`, the samples (`[C, T]` tensors) for the report page."""
    compression, sample_rate = model.compression_model, int(model.sample_rate)
    tuned = generate_for_check(
        model, reference["prompts"], reference["seconds"], reference["seed"], reference["sampler_precision"]
    )
    held = np.concatenate([encodec_latents(compression, *load_audio(p)) for p in reference["validation_clips"]])
    base = [encodec_latents(compression, w, sample_rate) for w in reference["base"]]
    mine = [encodec_latents(compression, w, sample_rate) for w in tuned]
    clips = list(training_clips)[:MAX_COPY_CLIPS]
    copies = copy_check(
        mine,
        [encodec_latents(compression, *load_audio(c.path)) for c in clips],
        [Path(str(c.path)).name for c in clips],
    )
    # discogs-effnet (essentia, in its worker process) when its model file is present, else why it was skipped
    effnet = effnet_frechet(
        {"base": list(reference["base"]), "finetuned": list(tuned)}, sample_rate, reference["validation_clips"]
    )
    summary = {
        "embedding": "EnCodec encoder latents before quantization (frames)",
        "prompts": reference["prompts"],
        "seconds": reference["seconds"],
        "frechet_base": embedding_frechet(np.concatenate(base), held),
        "frechet_finetuned": embedding_frechet(np.concatenate(mine), held),
        "copy_check": copies,
        "effnet": effnet,
    }
    logger.info(
        "Audio check on the held-out prompts: Fréchet distance to the held-out clips %s (base) -> %s "
        "(fine-tuned); %d of %d samples flagged as near copies of a training clip",
        fmt_distance(summary["frechet_base"]),
        fmt_distance(summary["frechet_finetuned"]),
        copies["copies"],
        len(copies["samples"]),
    )
    summary["health"] = audio_health(list(reference["base"]), list(tuned), sample_rate)
    summary["clap"] = clap_metrics(model, reference, list(tuned), reference["validation_clips"], clips)
    if "skipped" not in summary["clap"]:  # skipped: evaluation/clap.py's load_clap said why
        c = summary["clap"]
        logger.info(
            "CLAP on the held-out prompts: prompt adherence %s (base) -> %s (fine-tuned); Fréchet distance to the "
            "held-out clips %s -> %s, KAD %s -> %s; %d of %d samples near copies",
            *(_fmt(c.get(k)) for k in ("adherence_base", "adherence_finetuned", "frechet_base", "frechet_finetuned")),
            *(_fmt(c.get(k)) for k in ("kad_base", "kad_finetuned")),
            c["copy_check"]["copies"],
            len(c["copy_check"]["samples"]),
        )
    if "skipped" in effnet:
        logger.info("Audio check in discogs-effnet space skipped: %s", effnet["skipped"])
    else:
        logger.info(
            "Audio check in discogs-effnet space: Fréchet distance %s (base) -> %s (fine-tuned)",
            fmt_distance(effnet["frechet_base"]),
            fmt_distance(effnet["frechet_finetuned"]),
        )
    return {**summary, "audio": {"base": list(reference["base"]), "finetuned": list(tuned), "rate": sample_rate}}


# ------------------------------------------------------------------------------------- samples during training
# At every evaluation a few fixed held-out prompts are generated with the weights as they are (the EMA when on), from
# the same seeds, so the report's timeline and wandb let a user hear when the fine-tune started to copy or overfit.
# Their cost is bounded: the base model's samples (step 0, the reference) and the last evaluation's (the fine-tune as
# it ended: without them a short run's timeline would hold the base model alone) are always made; the evaluations
# between are made only while everything spent on samples stays within TIMELINE_SHARE of the training time so far,
# and skipped with a log line when the next ones would pass it (so the bound can be passed by one set, at the end).
# Melody and style models generate with their conditioners set as predict has them and set back to the training's
# after (`SampleConditions`); under FSDP rank 0 generates with a copy of the LM gathered from every rank's pieces
# (`Evaluator._sample`).

TIMELINE_PROMPTS = 2
TIMELINE_SECONDS = 4.0  # each sample's length, at most sample_duration
TIMELINE_SHARE = 0.05  # the samples' share of the training time, at most
TIMELINE_KEPT = 12  # evaluations whose audio the report keeps (more: the closest-spaced middle ones are thinned)
TIMELINE_KBPS = 128  # MP3: a 4 s sample is ~64 KB, inside the tar and as a data: URI in report.html
TIMELINE_FOLDER = "samples/during"
LOUDNESS_GATE_S = 0.4  # torchaudio's loudness measures 400 ms blocks: shorter audio cannot be loudness-normalized


# Melody and style models: each prompt also gets the audio condition predict's request would give, from the held-out
# clip whose description the prompt is: its audio as the melody (chroma from its demucs stems, computed from the
# audio as predict's `input_audio` is) or as the style audio (an excerpt of predict's default length, from the seed).
_PREDICT = {f.name: f.default for f in dataclasses.fields(PredictParams)}
STYLE_EXCERPT_S = float(_PREDICT["style_excerpt_length"])
STYLE_EVAL_Q = int(_PREDICT["style_eval_q"])


@dataclass
class SampleConditions:
    """The `self_wav` condition of each prompt: `kind` "melody" or "style", `audio` one `[C, T]` at the model's rate
    and channels per prompt, `clips` the held-out clip each comes from, `excerpt_s` the style excerpt's length."""

    kind: str
    audio: list[torch.Tensor]
    clips: list[str]
    excerpt_s: float | None = None

    def setup(self, lm: tp.Any) -> tp.ContextManager:
        """A style model's conditioners as predict has them for the block, and back to the training's set-up after
        (a melody model's: `generate_for_check` sets them so and back itself)."""
        if self.kind == "melody":
            return contextlib.nullcontext()
        return style_generation(lm, float(self.excerpt_s or STYLE_EXCERPT_S), STYLE_EVAL_Q)

    def summary(self) -> dict[str, tp.Any]:
        out = {"kind": self.kind, "clips": list(self.clips)}
        if self.excerpt_s is not None:
            out["style_excerpt_s"] = self.excerpt_s
        return out


class TrainingSamples:
    """Fixed prompts generated at each evaluation (rank 0), encoded as MP3, kept for the report and wandb.

    `entries`: one per evaluation, `{"step", "files", "seconds" (generation time), "flags"}` or `{"step",
    "skipped": why}`; `audio`: file name -> MP3 bytes (thinned to `TIMELINE_KEPT` evaluations). `on_samples`, when
    set, gets `(step, [(prompt, [C, T] normalized audio)], rate, flags)` after each generation (wandb).
    `conditions`: melody and style models' audio condition of each prompt (None: text only)."""

    def __init__(
        self,
        model: tp.Any,
        prompts: list[str],
        seconds: float,
        seed: int,
        sampler_precision: str,
        conditions: SampleConditions | None = None,
    ):
        self.model = model
        self.prompts = list(prompts)
        self.seconds = float(seconds)
        self.seed = int(seed)
        self.sampler_precision = sampler_precision
        self.conditions = conditions
        self.entries: list[dict[str, tp.Any]] = []
        self.audio: dict[str, bytes] = {}
        self.spent = 0.0  # seconds spent generating
        self.on_samples: tp.Callable[[int, list[tuple[str, torch.Tensor]], int, list[str]], None] | None = None

    def bound(self, training_seconds: float) -> float:
        """Seconds the samples may have cost in all after `training_seconds` of training."""
        return TIMELINE_SHARE * max(0.0, training_seconds)

    def _expected(self) -> float:
        return max((e["seconds"] for e in self.entries if "seconds" in e), default=0.0)  # the slowest so far

    def due(self, step: int, training_seconds: float, final: bool = False) -> bool:
        """Whether this evaluation's samples are made (the base model's and the last evaluation's always; those
        between within the bound)."""
        return step == 0 or final or self._within(training_seconds)

    def _within(self, training_seconds: float) -> bool:
        return self.spent + self._expected() <= self.bound(training_seconds)

    def sample(
        self,
        step: int,
        training_seconds: float,
        whole_lm: tp.Callable[[], tp.Any] | None = None,
        final: bool = False,
    ) -> dict[str, tp.Any]:
        """Generate this evaluation's samples, or skip them when they would pass the bound. Returns the entry.
        `whole_lm` (FSDP): builds the LM to generate with (gathered from every rank's pieces), inside the timing."""
        expected = self._expected()
        if step > 0 and final and not self._within(training_seconds):
            logger.info(
                "Samples at step %d: the last evaluation's are made over their bound (%.1f s spent of the %.1f s "
                "allowed, ~%.1f s more), so the timeline ends with the fine-tune as it ended",
                step,
                self.spent,
                self.bound(training_seconds),
                expected,
            )
        if not self.due(step, training_seconds, final):
            entry = {
                "step": step,
                "skipped": (
                    f"over the bound: samples may cost {100 * TIMELINE_SHARE:.0f} % of the training time "
                    f"({self.bound(training_seconds):.1f} s of {training_seconds:.1f} s); they took {self.spent:.1f} s "
                    f"and the next would take ~{expected:.1f} s"
                ),
            }
            logger.info("Samples at step %d skipped: %s", step, entry["skipped"])
            self.entries.append(entry)
            return entry
        started = time.perf_counter()
        model = self.model
        if whole_lm is not None:  # the same MusicGen (compression model, conditioners) around the gathered LM
            model = copy.copy(self.model)
            model.lm = whole_lm()
        with self.conditions.setup(model.lm) if self.conditions is not None else contextlib.nullcontext():
            melody = self.conditions.audio if self.conditions is not None else None
            wav = generate_for_check(
                model, self.prompts, self.seconds, self.seed, self.sampler_precision, melody_wavs=melody
            )
        del model
        rate = int(self.model.sample_rate)
        # as predict's default output sounds; loudness needs one 400 ms gate block, a shorter sample is peak-scaled
        strategy = "loudness" if wav.shape[-1] >= LOUDNESS_GATE_S * rate else "peak"
        heard = [normalize(w, strategy, rate) for w in wav]
        flags = sorted({f"{flag} (prompt {i + 1})" for i, w in enumerate(wav) for flag in health_of(w, rate)["flags"]})
        files = []
        for i, one in enumerate(heard):
            name = f"{TIMELINE_FOLDER}/step_{step:06d}_{i}.mp3"
            self.audio[name] = encode_mp3(one.clamp(-1, 1).numpy().T, rate, TIMELINE_KBPS)
            files.append(name)
        took = time.perf_counter() - started
        self.spent += took
        entry = {"step": step, "files": files, "seconds": round(took, 3), "flags": flags}
        self.entries.append(entry)
        self._thin()
        logger.info(
            "Samples at step %d: %d of %.1f s in %.1f s (%s/step_%06d_*.mp3)%s",
            step,
            len(files),
            self.seconds,
            took,
            TIMELINE_FOLDER,
            step,
            f"; flags: {', '.join(flags)}" if flags else "",
        )
        if self.on_samples is not None:
            self.on_samples(step, list(zip(self.prompts, heard, strict=True)), rate, flags)
        return entry

    def _thin(self) -> None:
        """Past `TIMELINE_KEPT` evaluations with audio, drop the audio of the middle one closest to its neighbours
        (the first and the last stay): the timeline keeps its span at a bounded size."""
        kept = [e for e in self.entries if e.get("files")]
        while len(kept) > TIMELINE_KEPT:
            gaps = [kept[i + 1]["step"] - kept[i - 1]["step"] for i in range(1, len(kept) - 1)]
            drop = kept[1 + gaps.index(min(gaps))]
            for name in drop["files"]:
                self.audio.pop(name, None)
            drop["files"] = []
            drop["thinned"] = True
            kept = [e for e in self.entries if e.get("files")]

    def summary(self) -> dict[str, tp.Any]:
        """What metrics.json and the report say about the samples (the audio itself is in `audio`)."""
        return {
            "prompts": self.prompts,
            "seconds": self.seconds,
            "seed": self.seed,
            "bound_share": TIMELINE_SHARE,
            "spent_s": round(self.spent, 3),
            "entries": [dict(e) for e in self.entries],
            **({"conditions": self.conditions.summary()} if self.conditions is not None else {}),
        }

    def state_dict(self) -> dict[str, tp.Any]:
        return {"entries": [dict(e) for e in self.entries], "audio": dict(self.audio), "spent": self.spent}

    def load_state_dict(self, state: dict[str, tp.Any] | None) -> None:
        if state:
            self.entries = [dict(e) for e in state.get("entries", [])]
            self.audio = dict(state.get("audio", {}))
            self.spent = float(state.get("spent", 0.0))


def training_samples(model: tp.Any, held_out: tp.Sequence[tp.Any], params: TrainParams) -> TrainingSamples:
    """The run's samples during training: `TIMELINE_PROMPTS` held-out descriptions, `TIMELINE_SECONDS` each (at most
    `sample_duration`), predict's sampler at `sampler_precision`, seeded from `seed`."""
    seconds = min(TIMELINE_SECONDS, float(params.sample_duration))
    prompts = audio_prompts(held_out, TIMELINE_PROMPTS)
    logger.info(
        "Samples during training: %d held-out prompts of %.1f s at each evaluation, within %.0f %% of the training "
        "time (an evaluation past it is skipped, but for the base model's and the last): %s",
        len(prompts),
        seconds,
        100 * TIMELINE_SHARE,
        prompts,
    )
    conditions = sample_conditions(model, held_out, prompts)
    return TrainingSamples(model, prompts, seconds, params.seed, params.sampler_precision, conditions)


def sample_conditions(model: tp.Any, held_out: tp.Sequence[tp.Any], prompts: list[str]) -> SampleConditions | None:
    """Melody and style models: for each prompt, the first held-out clip with that description (the one
    `audio_prompts` took it from), its audio at the model's rate and channels as predict loads `input_audio` /
    `style_audio`. None for the other models (text only)."""
    from audiocraft.data.audio_utils import convert_audio

    if melody_conditioners(model.lm):
        kind = "melody"
    elif style_conditioners(model.lm):
        kind = "style"
    else:
        return None
    chosen = [next(c for c in held_out if (c.description or "") == p) for p in prompts]
    audio = []
    for clip in chosen:
        wav, sr = load_audio(clip.path)
        audio.append(convert_audio(wav, sr, int(model.sample_rate), int(model.audio_channels)))
    excerpt = None
    if kind == "style":  # predict's default excerpt; a held-out clip shorter than it is the whole excerpt
        excerpt = min(STYLE_EXCERPT_S, min(a.shape[-1] for a in audio) / model.sample_rate)
        if excerpt < STYLE_EXCERPT_S:
            logger.info(
                "Samples during training: style excerpt of %.2f s (predict's default is %.1f s): the shortest "
                "held-out clip is that long",
                excerpt,
                STYLE_EXCERPT_S,
            )
    names = [Path(str(c.path)).name for c in chosen]
    logger.info(
        "Samples during training: each prompt conditioned on its held-out clip's audio as the %s: %s",
        kind,
        ", ".join(f"{p!r} <- {n}" for p, n in zip(prompts, names, strict=True)),
    )
    return SampleConditions(kind, audio, names, excerpt)


# ------------------------------------------------------------------------------------------ health and CLAP
# Sample health (evaluation/health.py) of every generated sample, and CLAP's metrics (evaluation/clap.py) of the
# audio check's samples: prompt adherence, distance to the held-out clips, the copy check in CLAP's space.

# "still follows prompts": the fine-tune's CLAP similarity to the held-out prompts may fall this much below the base
# model's before it is flagged (cosine similarity; a sample and an unrelated prompt measure about 0.1 below a
# matching one in larger_clap_music's space, so a drop of half that is a clear loss of adherence)
CLAP_ADHERENCE_DROP = 0.05
CLAP_FORGET_PROMPTS = 2  # of FORGET_PROMPTS, generated by the base model before training and by the fine-tune after


def health_of(wav: torch.Tensor, sample_rate: int) -> dict[str, tp.Any]:
    """`{"flags": [...], "measures": {...}}` of one `[C, T]` sample (evaluation/health.py's thresholds)."""
    health = sample_health(wav.float().cpu(), int(sample_rate))
    return {"flags": list(health.flags), "measures": dict(health.measures)}


def audio_health(base: list[torch.Tensor], tuned: list[torch.Tensor], sample_rate: int) -> dict[str, tp.Any]:
    """Each base and fine-tuned sample's health, and whether the two sides are indistinguishable (the fine-tune
    changed nothing audible: the same prompts and seeds give the same music)."""
    return {
        "base": [health_of(w, sample_rate) for w in base],
        "finetuned": [health_of(w, sample_rate) for w in tuned],
        "correlations": pair_correlations(base, tuned, int(sample_rate)),
        "indistinguishable": bool(indistinguishable(base, tuned, int(sample_rate))),
        "thresholds": dict(HEALTH_THRESHOLDS),
    }


def sample_flags(health: dict[str, tp.Any] | None) -> list[str]:
    """The health flags of the fine-tuned samples as the log, wandb and metrics.json list them: `noise (2 of 2
    samples)`, and `base and fine-tuned indistinguishable`."""
    if not health:
        return []
    tuned = health.get("finetuned") or []
    counts: dict[str, int] = {}
    for h in tuned:
        for flag in h["flags"]:
            counts[flag] = counts.get(flag, 0) + 1
    flags = [f"{flag} ({n} of {len(tuned)} samples)" for flag, n in counts.items()]
    if health.get("indistinguishable"):
        flags.append("base and fine-tuned indistinguishable")
    return flags


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _device_of(model: tp.Any) -> str:
    return str(next(model.lm.parameters()).device)


def clap_metrics(
    model: tp.Any,
    reference: dict[str, tp.Any],
    tuned: list[torch.Tensor],
    held_paths: tp.Sequence[str],
    training_clips: tp.Sequence[tp.Any],
) -> dict[str, tp.Any]:
    """CLAP's measures of the base and fine-tuned samples of the held-out prompts, or `{"skipped": why and how to add
    it}` when `laion/larger_clap_music` is not on the disk."""
    clap = load_clap(_device_of(model))
    if clap is None:
        return {"skipped": clap_skip_reason() or "CLAP did not load"}
    rate = int(model.sample_rate)
    base = list(reference["base"])
    held = [resample(w, sr, rate) for w, sr in (load_audio(p) for p in held_paths)]
    e_held = clap.embed_audio(held, rate)
    e_base, e_tuned = clap.embed_audio(base, rate), clap.embed_audio(tuned, rate)
    out: dict[str, tp.Any] = {"model": CLAP_REPO, "adherence_drop": CLAP_ADHERENCE_DROP}
    pairs = [i for i, p in enumerate(reference["prompts"]) if p]  # unconditional samples have no prompt to follow
    if pairs:
        prompts = [reference["prompts"][i] for i in pairs]
        out["adherence_base"] = prompt_adherence(clap, [base[i] for i in pairs], rate, prompts)
        out["adherence_finetuned"] = prompt_adherence(clap, [tuned[i] for i in pairs], rate, prompts)
    if len(e_held) >= 2 and len(e_base) >= 2:  # a distribution needs two vectors a side
        for side, emb in (("base", e_base), ("finetuned", e_tuned)):
            out[f"frechet_{side}"] = clap_frechet(emb, e_held)
            out[f"kad_{side}"] = kad(emb, e_held)
    else:
        out["distance_skipped"] = f"{len(e_held)} held-out clip(s): the distances need at least 2"
    if reference.get("forget_prompts"):  # prompts of other genres, never trained on: does it still follow them?
        forget = reference["forget_prompts"]
        forget_tuned = generate_for_check(
            model, forget, reference["seconds"], reference["seed"], reference["sampler_precision"]
        )
        out["forget_adherence_base"] = prompt_adherence(clap, list(reference["forget_base"]), rate, forget)
        out["forget_adherence_finetuned"] = prompt_adherence(clap, list(forget_tuned), rate, forget)
        out["forget_prompts"] = list(forget)
    clips = list(training_clips)[:MAX_COPY_CLIPS]
    train = [resample(w, sr, rate) for w, sr in (load_audio(c.path) for c in clips)]
    out["copy_check"] = clap_copy_check(
        clap, e_tuned, clap.embed_audio(train, rate), names=[Path(str(c.path)).name for c in clips]
    )
    return finite_json(out)
