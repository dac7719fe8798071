"""The training loop: one function, read top to bottom (`train_loop`).

lr from the pure `get_lr(step)` -> micro-batches with gradient accumulation (DDP syncs on the last one) ->
unscale + clip -> optimizer step -> EMA -> log (loss, lr, grad norm, tokens/s, peak memory) -> checkpoint.

Several processes train as DDP (a whole model each) or FSDP (`training/fsdp.py`: weights, gradients and optimizer
state sharded); checkpoints and the returned weights are whole, unsharded, in the same layout either way.

The loss is audiocraft's MusicGen solver loss: the LM's codebook pattern (`compute_predictions`), conditions from
the LM's own condition provider after classifier-free-guidance dropout, and cross-entropy per codebook over the
valid positions, averaged over codebooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import resource
import signal
import threading
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.errors import InputError, Interrupted, NonFiniteError
from training import checkpoint as ckpt
from training import evaluate as evaluation
from training import fsdp as fsdp_mod
from training.data import Batch, TokenDataset
from training.dist import DistInfo, all_reduce_mean, any_rank, barrier
from training.params import EMA_DECAY, RESUME_MUST_MATCH, TrainParams
from training.schedule import get_lr

logger = logging.getLogger(__name__)

__all__ = [
    "RunPlan",
    "TrainResult",
    "NonFiniteError",
    "TrainingInterrupted",
    "finished_state",
    "resume_hint",
    "train_loop",
    "cross_entropy",
    "resolve_precision",
    "plan_run",
]

BETAS = (0.9, 0.95)  # audiocraft's MusicGen optimizer settings
EPS = 1e-8


class TrainingInterrupted(Interrupted):
    """SIGTERM or Ctrl-C during training: the message says which resume checkpoint holds the completed steps."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process ended by it

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code  # Ctrl-C: 130 (128 + SIGINT)


def resume_hint(path: Path | None) -> str:
    """How to continue from checkpoint `path` (None: nothing to resume), for the one line a stopped run prints."""
    if path is None:
        return "there is no resume checkpoint: run again to start over"
    return (
        f"resume checkpoint: {path}. Continue with the same inputs and --resume_from {path.parent} "
        "(Cog: resume_from=<that file>)"
    )


@dataclass(frozen=True)
class RunPlan:
    """The shape of a run, derived from the inputs, the data and the number of processes."""

    total_steps: int
    steps_per_epoch: int
    global_batch: int  # examples per optimizer step over all processes
    grad_accumulation: int
    segment_frames: int
    autocast_dtype: torch.dtype | None  # None: fp32
    use_scaler: bool  # fp16 loss scaling

    def per_rank_micro_batch(self, world_size: int) -> int:
        return self.global_batch // (world_size * self.grad_accumulation)


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # weights to export: the EMA when enabled, else the trained weights
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    seconds: float = 0.0
    precision: str = "fp32"
    parallel: str = "single"  # single, ddp or fsdp
    # Under FSDP, rank 0's unsharded copy of the LM holding `state_dict` (the trained one is sharded); else None.
    lm: tp.Any = None
    evaluation: dict | None = None  # the validation summary (training/evaluate.py); None: no validation
    evaluation_state: dict | None = None  # for `finished_state`: the evaluations (the best = the exported weights)
    # For `finished_state` (a resume checkpoint of the end of the run, written only if the export fails):
    rng: dict[str, tp.Any] = field(default_factory=dict)  # the RNG states at the end
    ema_names: list[str] | None = None  # names of the EMA'd (trainable) weights, when ema is on
    world_size: int = 1


def finished_state(result: TrainResult, params: TrainParams) -> dict[str, tp.Any]:
    """A resume checkpoint of a run that completed all its steps, from its result alone (no collective, no
    optimizer: the optimizer state only serves steps still to train, and a run's step count cannot change on
    resume, see RESUME_MUST_MATCH). Resuming it exports the same weights without training again. `model` holds the
    weights to export (with ema on, the average: it is also the `ema` the resume exports)."""
    model = {k: v.detach().cpu() for k, v in result.state_dict.items()}
    return {
        "model": model,
        "optimizer": None,
        "scaler": None,
        "ema": [model[n] for n in result.ema_names] if result.ema_names is not None else None,
        "rng": result.rng,
        "history": list(result.history),
        "params": dataclasses.asdict(params),
        "world_size": result.world_size,
        "evaluation": result.evaluation_state,  # its resume reports the same evaluations and exported step
        "finished": True,
    }


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `42s`: for ETAs in the logs."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def resolve_precision(precision: str, device: str) -> tuple[torch.dtype | None, bool, str]:
    """`(autocast dtype or None, use a GradScaler, name)` for a `precision` input on `device`."""
    cuda = device.startswith("cuda")
    # Pre-Ampere GPUs (V100, T4) only emulate bf16 (slowly): `auto` takes fp16 with loss scaling there.
    bf16_native = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        precision = ("bf16" if bf16_native else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise InputError("precision", "fp16 needs a GPU; use fp32 (or bf16) on CPU, or auto")
    if precision == "bf16" and cuda and not bf16_native:
        if not torch.cuda.is_bf16_supported():
            raise InputError("precision", "this GPU has no bf16 support; use fp16 or auto")
        logger.warning("precision=bf16: this GPU only emulates bf16 (slow); fp16 (or auto) would be faster")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    return dtype, precision == "fp16", precision


def plan_run(
    params: TrainParams, n_clips: int, longest_clip_frames: int, frame_rate: float, world_size: int, device: str
) -> RunPlan:
    """Steps, batch layout and precision of a run. Adjusted values are logged, never silently changed."""
    unit = world_size * params.grad_accumulation
    global_batch = max(unit, math.ceil(params.batch_size / unit) * unit)
    if global_batch != params.batch_size:
        logger.warning(
            "batch_size %d rounded up to %d: it must be a multiple of processes (%d) x grad_accumulation (%d)",
            params.batch_size,
            global_batch,
            world_size,
            params.grad_accumulation,
        )
    steps_per_epoch = params.updates_per_epoch or math.ceil(n_clips / global_batch)  # 0: one pass
    segment_frames = int(params.segment_duration * frame_rate)
    if longest_clip_frames < segment_frames:
        # Positions past every clip's end would all be padding: causal attention makes the loss identical without.
        logger.info(
            "Crops shortened to the longest clip: %.2f s instead of segment_duration %.2f s",
            longest_clip_frames / frame_rate,
            params.segment_duration,
        )
        segment_frames = longest_clip_frames
    dtype, use_scaler, _ = resolve_precision(params.precision, device)
    return RunPlan(
        total_steps=params.epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
        grad_accumulation=params.grad_accumulation,
        segment_frames=segment_frames,
        autocast_dtype=dtype,
        use_scaler=use_scaler,
    )


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cross-entropy per codebook over valid positions, averaged over codebooks (as audiocraft's solver).

    Args:
        logits: `[B, K, T, card]`; targets: `[B, K, T]`; mask: `[B, K, T]` (True = counts).
    Returns:
        the mean over codebooks, and the per-codebook values (detached).
    """
    if logits.shape[:-1] != targets.shape or mask.shape != targets.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")
    k_count = targets.shape[1]
    total = torch.zeros([], device=targets.device)
    per_codebook = []
    for k in range(k_count):
        mask_k = mask[:, k].reshape(-1)
        ce_k = F.cross_entropy(logits[:, k].reshape(-1, logits.shape[-1])[mask_k], targets[:, k].reshape(-1)[mask_k])
        total = total + ce_k
        per_codebook.append(ce_k.detach())
    return total / k_count, per_codebook


def codebook_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[2, K]`: per codebook, the cross-entropy summed over the valid positions, and their count. Summed over
    batches and divided, it is `cross_entropy` of them all as one batch (validation, training/evaluate.py)."""
    k_count = targets.shape[1]
    out = torch.zeros(2, k_count, dtype=torch.float32, device=targets.device)
    for k in range(k_count):
        mask_k = mask[:, k].reshape(-1)
        if bool(mask_k.any()):
            flat = logits[:, k].reshape(-1, logits.shape[-1])[mask_k]
            out[0, k] = F.cross_entropy(flat, targets[:, k].reshape(-1)[mask_k], reduction="sum").float()
        out[1, k] = mask_k.sum()
    return out


class TrainStep(torch.nn.Module):
    """The LM's training forward as one module, so DDP sees conditions, pattern and loss in its forward."""

    def __init__(self, lm: torch.nn.Module, prior_weight: float = 1.0):
        super().__init__()
        self.lm = lm
        self.prior_weight = prior_weight
        self.parts: dict[str, torch.Tensor] = {}  # the last split loss (prior preservation), detached

    def forward(
        self,
        codes: torch.Tensor,
        mask: torch.Tensor,
        attributes: list,
        prior: torch.Tensor | None = None,
        evaluate: bool = False,
    ) -> torch.Tensor:
        """`prior`: `[B]` bool, True for generated prior-preservation examples: the loss is then
        `instance + prior_weight x prior` (DreamBooth), each a cross-entropy over its own examples.

        `evaluate`: validation (training/evaluate.py): the same loss without condition dropout, returned as
        per-codebook sums (`codebook_sums`). Through this module so that DDP/FSDP wrappers see the forward."""
        lm = self.lm
        if not evaluate:
            attributes = lm.att_dropout(lm.cfg_dropout(attributes))
        condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        output = lm.compute_predictions(codes, [], condition_tensors)
        valid = mask & output.mask
        if evaluate:
            return codebook_sums(output.logits, codes, valid)
        self.parts = {}
        if prior is None or not bool(prior.any()):
            loss, _ = cross_entropy(output.logits, codes, valid)
            return loss
        is_prior = prior.view(-1, 1, 1).to(valid.device)
        loss = torch.zeros([], device=codes.device)
        for name, part, weight in (("instance", ~is_prior, 1.0), ("prior", is_prior, self.prior_weight)):
            if bool((valid & part).any()):
                value, _ = cross_entropy(output.logits, codes, valid & part)
                loss = loss + weight * value
                self.parts[name] = value.detach()
        return loss


class _StopOnSignal:
    """Turns SIGTERM and Ctrl-C (SIGINT) into a flag checked after each step: the loop then saves a resume
    checkpoint and stops cleanly (`requested`: "SIGTERM" or "Ctrl-C"). A second Ctrl-C stops at once
    (KeyboardInterrupt: the completed steps are still saved if the weights are whole, see `train_loop`).

    SIGINT is taken over only from Python's default handler: a host that installed its own (a server turning it
    into its cancel) keeps it.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, tp.Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: tp.Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if name == "Ctrl-C" and self.requested == "Ctrl-C":
            raise KeyboardInterrupt  # the second Ctrl-C: now
        self.requested = self.requested or name
        again = " (Ctrl-C again: stop now)" if name == "Ctrl-C" else ""
        logger.warning("%s received: stopping after this step with a resume checkpoint%s", name, again)

    def __exit__(self, *exc: tp.Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def build_optimizer(params: TrainParams, trainable: list[torch.Tensor], sharded: bool = False) -> torch.optim.Optimizer:
    """`sharded`: `trainable` are this rank's FSDP shards (D-Adaptation then sums its statistics over ranks)."""
    if params.optimizer == "adamw":
        return torch.optim.AdamW(trainable, lr=params.lr, betas=BETAS, eps=EPS, weight_decay=params.weight_decay)
    from dadaptation import DAdaptAdam

    return DAdaptAdam(
        trainable,
        lr=params.lr,
        betas=BETAS,
        eps=EPS,
        weight_decay=params.weight_decay,
        decouple=True,
        fsdp_in_use=sharded,
    )


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_resume_compatible(state: dict, params: TrainParams) -> None:
    saved = state.get("params", {})
    for name in RESUME_MUST_MATCH:
        if name in saved and saved[name] != getattr(params, name):
            raise InputError(
                "resume_from",
                f"the checkpoint was trained with {name}={saved[name]!r} but this run has {name}="
                f"{getattr(params, name)!r}; resume with the same training inputs",
            )


def train_loop(
    lm: torch.nn.Module,
    dataset: TokenDataset,
    params: TrainParams,
    plan: RunPlan,
    dist: DistInfo,
    checkpoint_dir: Path,
    resume_state: dict | None = None,
    on_metrics: tp.Callable[[dict[str, float]], None] | None = None,
    evaluator: evaluation.Evaluator | None = None,
) -> TrainResult:
    """Train `lm` (audiocraft LMModel, on `dist.device`) on `dataset` following `plan`; returns what to export.

    `evaluator`: validation loss before the first step, every `eval_every` steps and at the end, best weights and
    early stopping (training/evaluate.py); its metrics also go to `on_metrics`."""
    device = dist.device
    # ---- model: fp32 master weights (get_pretrained loads fp16 on GPUs), training mode, our cfg dropout
    lm.float()
    lm.train()
    lm.cfg_dropout.p = params.cfg_p
    lm.cfg_dropout.rng.manual_seed(params.seed)
    lm.att_dropout.rng.manual_seed(params.seed + 1)
    torch.manual_seed(params.seed)
    train_step = TrainStep(lm, prior_weight=params.prior_loss_weight)
    step_module: torch.nn.Module = train_step
    prior_flags = [bool(c.info.get("prior")) for c in dataset.clips]  # prior-preservation examples (methods/prior)
    parallel = fsdp_mod.resolve_parallel(params.parallel, params.model_version, dist)
    sharded = parallel == "fsdp"
    # FSDP replaces the LM's parameters by shards: rank 0 keeps a weightless copy of the module to export from.
    export_skeleton = fsdp_mod.skeleton(lm) if sharded and dist.is_main else None
    if parallel == "ddp":
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, broadcast_buffers=False)
    elif sharded:
        step_module = fsdp_mod.shard(train_step, lm)
    trainable_names = [n for n, p in lm.named_parameters() if p.requires_grad]
    trainable = [p for p in lm.parameters() if p.requires_grad]  # under FSDP: sharded DTensor parameters
    optimizer: tp.Any
    if sharded:
        optimizer = fsdp_mod.ShardedOptimizer(trainable, lambda shards: build_optimizer(params, shards, True), dist)
        weights = optimizer.shards  # what the optimizer and the EMA update: this rank's pieces
    else:
        optimizer = build_optimizer(params, trainable)
        weights = trainable
    scaler: tp.Any = None
    if plan.use_scaler:
        if sharded:  # every rank must skip the same overflowing steps: found-inf is all-reduced
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler("cuda")
        else:
            scaler = torch.amp.GradScaler("cuda")
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=plan.autocast_dtype)
        if plan.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    ema = [w.detach().clone() for w in weights] if params.ema else None
    history: list[dict[str, float]] = []
    start_step = 0
    eval_ctx = None
    if evaluator is not None:  # what validation computes with and what it keeps (training/evaluate.py)
        eval_module = step_module if sharded else train_step  # FSDP: the root, whose hooks gather the weights
        eval_ctx = evaluation.EvalContext(
            forward=lambda codes, mask, attributes: eval_module(codes, mask, attributes, None, True),
            modules=train_step,
            dist=dist,
            device=device,
            micro_batch=plan.per_rank_micro_batch(dist.world_size),
            autocast=autocast,
            weights=weights,
            exported=ema if ema is not None else weights,
            params=trainable,
            sharded=sharded,
            gather=lambda piece, p: fsdp_mod.gather(piece, p, dist),
            shard_of=fsdp_mod.shard_of,
        )
    finished = False  # resumed from a checkpoint of a run that ended: only the export is left

    # ---- resume: weights, optimizer, scaler, EMA, RNGs, history; the schedule and data plan are pure in `step`
    if resume_state is not None:
        check_resume_compatible(resume_state, params)
        if sharded:
            fsdp_mod.load_full_state_dict(lm, resume_state["model"])
        else:
            lm.load_state_dict(resume_state["model"])
        start_step = int(resume_state["step"])
        # A run that ended (all its steps, or an early stop) and whose export failed left `finished_state`:
        # no optimizer state, nothing to train; resuming it exports.
        finished = bool(resume_state.get("finished")) or start_step >= plan.total_steps
        if resume_state.get("optimizer") is not None:
            optimizer.load_state_dict(resume_state["optimizer"])  # whole in the file, sharded here under FSDP
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        if ema is not None and resume_state.get("ema") is not None:
            for e, saved, p in zip(ema, resume_state["ema"], trainable, strict=True):
                e.copy_(fsdp_mod.shard_of(saved, p))
        rng = resume_state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("python") is not None:
            version, state, gauss = rng["python"]
            random.setstate((version, tuple(state), gauss))
        lm.cfg_dropout.rng.set_state(rng["cfg_dropout"])
        lm.att_dropout.rng.set_state(rng["att_dropout"])
        history = list(resume_state.get("history", []))
        if evaluator is not None:  # after the weights and the EMA: a best that equals them is copied from them
            evaluator.load_state_dict(resume_state.get("evaluation"), eval_ctx)
        if dist.is_main:
            logger.info("Resumed at step %d of %d", start_step, plan.total_steps)
        if finished and dist.is_main:
            logger.warning(
                "The checkpoint already completed all %d steps: nothing left to train, exporting its weights",
                start_step,
            )

    def checkpoint_state() -> dict[str, tp.Any]:
        """Whole (unsharded) state, on CPU; under FSDP a collective, complete on rank 0 only."""
        ema_state = None if ema is None else [fsdp_mod.gather(e, p, dist) for e, p in zip(ema, trainable, strict=True)]
        return {
            "model": fsdp_mod.full_state_dict(lm, dist),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema_state,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),  # MusicGen-Style draws its excerpts from `random`
                "cfg_dropout": lm.cfg_dropout.rng.get_state(),
                "att_dropout": lm.att_dropout.rng.get_state(),
            },
            "history": history,
            "evaluation": evaluator.state_dict(eval_ctx, len(history)) if evaluator is not None else None,
            "params": dataclasses.asdict(params),
            "world_size": dist.world_size,
        }

    def non_finite(state: dict[str, tp.Any] | None) -> tuple[str, str] | None:
        """The first non-finite weight (or EMA weight) of a checkpoint state: a checkpoint never holds one, so the
        newest on disk is always the last finite state. (The loss can stay finite while an update made weights
        NaN, e.g. an update that overflowed on the last step, or NaN rows of an embedding no batch used.)"""
        if state is None:
            return None
        return ckpt.first_non_finite(
            [
                *state["model"].items(),
                *((f"{n} (EMA)", e) for n, e in zip(trainable_names, state["ema"] or [], strict=False)),
            ]
        )

    def diverged(step_done: int, bad: tuple[str, str] | None) -> NonFiniteError:
        where = f"'{bad[0]}' holds {bad[1]}" if bad else "on rank 0"
        last = ckpt.newest_checkpoint(checkpoint_dir)
        return NonFiniteError(
            f"Training diverged at step {step_done}: the weights are not finite ({where}); no checkpoint was "
            f"written for it. Last finite state: {resume_hint(last)}. Lower lr (adamw: e.g. 1e-5) "
            "or weight_decay, keep max_grad_norm on, or use precision bf16/fp32."
        )

    def save(step_done: int) -> Path | None:
        barrier(dist)
        state = checkpoint_state() if dist.is_main or sharded else None  # FSDP: every rank sends its shards
        bad = non_finite(state) if dist.is_main else None
        if any_rank(dist, bad is not None):  # every rank stops at the same step
            del state
            raise diverged(step_done, bad)
        path = ckpt.save_checkpoint(checkpoint_dir, step_done, state) if state is not None and dist.is_main else None
        del state
        barrier(dist)
        return path

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    total_tokens = 0.0
    consistent = True  # weights/optimizer reflect exactly `step` completed steps
    progress = tqdm(total=plan.total_steps, initial=start_step, desc="Training", unit="step", disable=not dist.is_main)
    log_every = max(1, plan.total_steps // 20)

    def run_evaluation(step_done: int) -> None:
        metrics = evaluator.evaluate(step_done, eval_ctx)
        if dist.is_main and on_metrics is not None:
            on_metrics(metrics)

    try:
        with _StopOnSignal() as stop:
            if evaluator is not None and start_step == 0 and not evaluator.history:
                run_evaluation(0)  # the base model: what the fine-tune is measured against
            for step in range(start_step, start_step if finished else plan.total_steps):
                t0 = time.perf_counter()
                # ---- learning rate for this step
                lr = get_lr(
                    step,
                    lr=params.lr,
                    scheduler=params.lr_scheduler,
                    warmup=params.warmup,
                    total_steps=plan.total_steps,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # ---- forward/backward over this process's micro-batches
                micro_batches: list[Batch] = dataset.rank_micro_batches(
                    step,
                    global_batch=plan.global_batch,
                    steps_per_epoch=plan.steps_per_epoch,
                    seed=params.seed,
                    dist=dist,
                    grad_accumulation=plan.grad_accumulation,
                )
                loss_sum = torch.zeros([], device=device)
                part_sums: dict[str, float] = {}
                tokens = 0
                for i, batch in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    no_sync = step_module.no_sync() if parallel == "ddp" and not last else contextlib.nullcontext()
                    with no_sync:
                        with autocast:
                            prior = torch.tensor([prior_flags[i] for i in batch.items]) if any(prior_flags) else None
                            loss = step_module(batch.codes.to(device), batch.mask.to(device), batch.attributes, prior)
                        for name, value in train_step.parts.items():
                            part_sums[name] = part_sums.get(name, 0.0) + float(value) / plan.grad_accumulation
                        scaled = loss / plan.grad_accumulation
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.detach().float()
                    tokens += batch.n_tokens
                # ---- reduce, check, clip, step
                stats = all_reduce_mean(
                    dist, torch.stack([loss_sum / plan.grad_accumulation, torch.tensor(float(tokens), device=device)])
                )
                step_loss, step_tokens = float(stats[0]), float(stats[1]) * dist.world_size
                if not math.isfinite(step_loss):
                    raise NonFiniteError(
                        f"Training diverged at step {step + 1}: the loss is {step_loss}. Nothing from this step was "
                        "saved. Lower lr (adamw: e.g. 1e-5), keep max_grad_norm on, or use precision bf16/fp32."
                    )
                if sharded:
                    optimizer.collect_grads()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                max_norm = params.max_grad_norm if params.max_grad_norm > 0 else float("inf")
                if sharded:  # the norm of the whole gradient, over every rank's shards
                    grad_norm = optimizer.clip_grad_norm_(max_norm)
                else:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
                skipped = False
                if not math.isfinite(grad_norm):
                    if scaler is None:
                        raise NonFiniteError(
                            f"Training diverged at step {step + 1}: the gradient norm is {grad_norm}. Nothing from "
                            "this step was saved. Lower lr, keep max_grad_norm on, or use precision bf16/fp32."
                        )
                    skipped = True  # fp16 overflow: the scaler skips this update and lowers its scale
                consistent = False
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None and not skipped:
                    torch._foreach_lerp_(ema, [w.detach() for w in weights], 1.0 - EMA_DECAY)
                # ---- log
                seconds = time.perf_counter() - t0
                total_tokens += step_tokens
                metrics = {
                    "step": step + 1,
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": step_tokens / seconds,
                    "step_s": seconds,
                    "peak_memory_mb": peak_memory_mb(device),
                }
                metrics.update({f"loss_{name}": value for name, value in part_sums.items()})  # this rank's
                if "d" in optimizer.param_groups[0]:
                    metrics["dadapt_d"] = float(optimizer.param_groups[0]["d"])
                if skipped:
                    metrics["skipped"] = 1.0
                history.append(metrics)
                consistent = True
                if dist.is_main:
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", gn=f"{grad_norm:.2f}")
                    if (step + 1) % log_every == 0 or step + 1 == plan.total_steps or step == start_step:
                        per_step = (time.perf_counter() - started) / (step + 1 - start_step)
                        logger.info(
                            "step %d/%d loss %.4f lr %.3e grad_norm %.3f %.0f tokens/s peak %.0f MB, ETA %s",
                            step + 1,
                            plan.total_steps,
                            step_loss,
                            lr,
                            grad_norm,
                            metrics["tokens_per_s"],
                            metrics["peak_memory_mb"],
                            format_duration(per_step * (plan.total_steps - step - 1)),
                        )
                    if on_metrics is not None:
                        on_metrics(metrics)
                # ---- validation: every eval_every steps and after the last (before the checkpoint, which keeps it)
                stop_early = False
                if evaluator is not None and evaluator.due(step + 1, plan.total_steps):
                    run_evaluation(step + 1)
                    stop_early = evaluator.should_stop  # the same on every rank: the losses are all-reduced
                # ---- checkpoint: every save_every steps and at the end; on SIGTERM, then stop
                done = step + 1
                stopping = any_rank(dist, stop.requested is not None)
                periodic = params.save_every > 0 and (done % params.save_every == 0 or done == plan.total_steps)
                if periodic or stopping:
                    path = save(done)
                    if stopping:
                        by = stop.requested or "SIGTERM"  # (another rank's signal: torchrun sends SIGTERM)
                        raise TrainingInterrupted(
                            f"Training stopped by {by} after step {done}; resume checkpoint: {path}. Continue "
                            f"with the same inputs and --resume_from {checkpoint_dir} (Cog: resume_from=<that file>)",
                            exit_code=130 if by == "Ctrl-C" else 143,
                        )
                if stop_early:  # early_stop_patience: a checkpoint of where it stopped, then the export
                    if params.save_every > 0 and not periodic:
                        save(done)
                    break
    except BaseException as e:
        # Cancelled mid-step (Cog cancel, Ctrl-C): keep what the completed steps did, if anything and if whole.
        interrupted = not isinstance(e, Exception)
        done = len(history)
        saved: Path | None = None
        why = "no step completed" if done <= start_step else "stopped inside an optimizer update"
        if interrupted and consistent and done > start_step and dist.is_main:
            if sharded:  # gathering the shards needs every rank, which an interrupt does not coordinate
                why = "under FSDP only SIGTERM and save_every write checkpoints"
                logger.warning("Interrupted (%s) under FSDP: no checkpoint (%s)", type(e).__name__, why)
            else:
                state = checkpoint_state()
                bad = non_finite(state)
                if bad is not None:
                    why = f"the weights are not finite: '{bad[0]}' holds {bad[1]}"
                else:
                    logger.warning("Interrupted (%s): saving a resume checkpoint at step %d", type(e).__name__, done)
                    try:
                        saved = ckpt.save_checkpoint(checkpoint_dir, done, state)
                    except Exception as save_error:  # noqa: BLE001 - the interrupt is what must reach the user
                        why = f"writing it failed: {type(save_error).__name__}: {save_error}"
                del state
        if isinstance(e, KeyboardInterrupt):
            # Ctrl-C ends like SIGTERM: one line with the resume hint and exit 130, no traceback (core.errors).
            # Cog's cancel (CancelationException, also a BaseException) goes on unchanged.
            if saved is not None:
                message = f"Training stopped by Ctrl-C after step {done}; {resume_hint(saved)}"
            else:
                older = ckpt.newest_checkpoint(checkpoint_dir)
                if older is None and params.resume_from and start_step > 0:
                    older = ckpt.find_checkpoint(params.resume_from)
                message = f"Training stopped by Ctrl-C after step {done}, with no checkpoint of it ({why}); "
                message += f"the newest {resume_hint(older)}" if older is not None else resume_hint(None)
            raise TrainingInterrupted(message, exit_code=130) from None
        raise
    finally:
        progress.close()

    seconds = time.perf_counter() - started
    trained_steps = plan.total_steps - start_step
    exported_step = None
    if evaluator is not None:  # keep_best: the best evaluation's tensors into what the export writes
        exported_step = evaluator.restore_best(eval_ctx)
    if sharded:  # whole weights on rank 0 (every rank sends its shards), in a plain module for the export
        state = fsdp_mod.full_state_dict(lm, dist)
        if ema is not None:
            averaged = {n: fsdp_mod.gather(e, p, dist) for n, e, p in zip(trainable_names, ema, trainable, strict=True)}
            state = {k: averaged.get(k, v) for k, v in state.items()}
        export_lm = fsdp_mod.materialize(export_skeleton, state, device) if export_skeleton is not None else None
    else:
        export_lm = None
        if ema is not None:
            averaged = dict(zip(trainable_names, ema, strict=True))
            state = {k: averaged.get(k, v).detach() for k, v in lm.state_dict().items()}
        else:
            state = {k: v.detach() for k, v in lm.state_dict().items()}
    rng = {  # for `finished_state`: what a checkpoint of this point would hold
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cfg_dropout": lm.cfg_dropout.rng.get_state(),
        "att_dropout": lm.att_dropout.rng.get_state(),
    }
    return TrainResult(
        state_dict=state,
        history=history,
        steps=len(history),  # fewer than planned after an early stop
        tokens_per_s=total_tokens / seconds if trained_steps else 0.0,
        peak_memory_mb=peak_memory_mb(device),
        seconds=seconds,
        precision=resolve_precision(params.precision, device)[2],
        parallel=parallel,
        lm=export_lm,
        evaluation=evaluator.summary(exported_step) if evaluator is not None else None,
        evaluation_state=evaluator.final_state() if evaluator is not None else None,
        rng=rng,
        ema_names=list(trainable_names) if ema is not None else None,
        world_size=dist.world_size,
    )
