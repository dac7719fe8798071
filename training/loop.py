"""The training loop: one function, read top to bottom (`train_loop`).

lr from the pure `get_lr(step)` -> micro-batches with gradient accumulation (DDP syncs on the last one) ->
unscale + clip -> optimizer step -> EMA -> log (loss, lr, grad norm, tokens/s, peak memory) -> validation ->
checkpoint. Its set-up (`_setup`), resume (`_resume`), checkpoints (`_save`), cancel (`_on_interrupt`) and
export (`_export`) are the functions before it.

Several processes train as DDP (a whole model each) or FSDP (`training/fsdp.py`: weights, gradients and optimizer
state sharded); what differs between them is behind `training.parallel.Parallel`, so the loop has no branch on
it. Checkpoints and the returned weights are whole, unsharded, in the same layout either way.

The loss is audiocraft's MusicGen solver loss: the LM's codebook pattern (`compute_predictions`), conditions from
the LM's own condition provider after classifier-free-guidance dropout, and cross-entropy per codebook over the
valid positions, averaged over codebooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from core.logs import library_prints
from core.progress import progress_bar
from training import checkpoint as ckpt
from training import evaluate as evaluation
from training.data import Batch, TokenDataset
from training.dist import DistInfo, all_reduce_mean, any_rank, barrier
from training.parallel import Parallel, parallel_for
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
        # On CUDA one fused kernel updates every tensor (the same AdamW; free speed). CPU keeps torch's default path,
        # so CPU results stay as they were.
        fused = True if trainable and all(t.is_cuda for t in trainable) else None
        return torch.optim.AdamW(
            trainable, lr=params.lr, betas=BETAS, eps=EPS, weight_decay=params.weight_decay, fused=fused
        )
    from dadaptation import DAdaptAdam

    with library_prints("dadaptation"):
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


@dataclass
class _Training:
    """What one run trains with (`_setup`), and where it stands."""

    params: TrainParams
    plan: RunPlan
    dist: DistInfo
    lm: torch.nn.Module
    train_step: TrainStep
    module: torch.nn.Module  # what the loop calls: `train_step`, wrapped by the parallel strategy
    parallel: Parallel
    optimizer: tp.Any
    scaler: tp.Any  # fp16 loss scaling, else None
    autocast: tp.Any
    ema: list[torch.Tensor] | None  # the EMA of `parallel.weights`, when on
    prior_flags: list[bool]  # per clip: a prior-preservation example (training/methods/prior.py)
    checkpoint_dir: Path
    lr_at: tp.Callable[[int], float]  # the schedule: step -> lr
    micro_batches: tp.Callable[[int], list[Batch]]  # step -> this process's micro-batches
    evaluator: evaluation.Evaluator | None = None
    eval_ctx: evaluation.EvalContext | None = None
    on_metrics: tp.Callable[[dict[str, float]], None] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    start_step: int = 0
    finished: bool = False  # resumed from a checkpoint of a run that ended: only the export is left
    consistent: bool = True  # weights/optimizer reflect exactly `len(history)` completed steps
    data_identity: dict | None = None

    @property
    def end_step(self) -> int:
        return self.start_step if self.finished else self.plan.total_steps


def _setup(
    lm: torch.nn.Module,
    dataset: TokenDataset,
    params: TrainParams,
    plan: RunPlan,
    dist: DistInfo,
    checkpoint_dir: Path,
    evaluator: evaluation.Evaluator | None,
    on_metrics: tp.Callable[[dict[str, float]], None] | None,
) -> _Training:
    """The model, its wrapping by the parallel strategy, the optimizer, loss scaler, autocast and EMA, the schedule,
    the batch plan and validation's context."""
    train_step = _setup_model(lm, params)
    prior_flags = [bool(c.info.get("prior")) for c in dataset.clips]
    parallel = parallel_for(params, dist)
    module = parallel.wrap(train_step, lm)
    optimizer = parallel.build_optimizer(lambda tensors, sharded: build_optimizer(params, tensors, sharded))
    scaler = parallel.grad_scaler(plan.use_scaler)
    autocast = (
        torch.autocast(device_type=dist.device.split(":")[0], dtype=plan.autocast_dtype)
        if plan.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    ema = [w.detach().clone() for w in parallel.weights] if params.ema else None
    run = _Training(
        params=params,
        plan=plan,
        dist=dist,
        lm=lm,
        train_step=train_step,
        module=module,
        parallel=parallel,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        ema=ema,
        prior_flags=prior_flags,
        checkpoint_dir=checkpoint_dir,
        lr_at=functools.partial(
            get_lr, lr=params.lr, scheduler=params.lr_scheduler, warmup=params.warmup, total_steps=plan.total_steps
        ),
        micro_batches=functools.partial(
            dataset.rank_micro_batches,
            global_batch=plan.global_batch,
            steps_per_epoch=plan.steps_per_epoch,
            seed=params.seed,
            dist=dist,
            grad_accumulation=plan.grad_accumulation,
        ),
        evaluator=evaluator,
        on_metrics=on_metrics,
    )
    if evaluator is not None:
        run.eval_ctx = _eval_context(run)
    return run


def _setup_model(lm: torch.nn.Module, params: TrainParams) -> TrainStep:
    """fp32 master weights (get_pretrained loads fp16 on GPUs), training mode, our cfg dropout, the seeds."""
    lm.float()
    lm.train()
    lm.cfg_dropout.p = params.cfg_p
    lm.cfg_dropout.rng.manual_seed(params.seed)
    lm.att_dropout.rng.manual_seed(params.seed + 1)
    torch.manual_seed(params.seed)
    return TrainStep(lm, prior_weight=params.prior_loss_weight)


def _eval_context(run: _Training) -> evaluation.EvalContext:
    """What validation computes with and what it keeps (training/evaluate.py)."""
    parallel, dist = run.parallel, run.dist
    eval_module = parallel.eval_module(run.train_step)
    return evaluation.EvalContext(
        forward=lambda codes, mask, attributes: eval_module(codes, mask, attributes, None, True),
        modules=run.train_step,
        dist=dist,
        device=dist.device,
        micro_batch=run.plan.per_rank_micro_batch(dist.world_size),
        autocast=run.autocast,
        weights=parallel.weights,
        exported=run.ema if run.ema is not None else parallel.weights,
        params=parallel.trainable,
        sharded=parallel.sharded,
        gather=parallel.gather,
        shard_of=parallel.shard_of,
        whole_lm=parallel.whole_lm if parallel.sharded else None,
    )


def _rng_state(lm: torch.nn.Module) -> dict[str, tp.Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # MusicGen-Style draws its excerpts from `random`
        "cfg_dropout": lm.cfg_dropout.rng.get_state(),
        "att_dropout": lm.att_dropout.rng.get_state(),
    }


def _resume(run: _Training, state: dict[str, tp.Any]) -> None:
    """Weights, optimizer, scaler, EMA, RNGs, history and validation from a checkpoint (written under any
    `parallel`); the schedule and the data plan are pure in the step."""
    params, plan, lm = run.params, run.plan, run.lm
    check_resume_compatible(state, params)
    run.parallel.load(state, run.ema)
    run.start_step = int(state["step"])
    # A run that ended (all its steps, or an early stop) and whose export failed left `finished_state`:
    # no optimizer state, nothing to train; resuming it exports.
    run.finished = bool(state.get("finished")) or run.start_step >= plan.total_steps
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng.get("python") is not None:
        version, python_state, gauss = rng["python"]
        random.setstate((version, tuple(python_state), gauss))
    lm.cfg_dropout.rng.set_state(rng["cfg_dropout"])
    lm.att_dropout.rng.set_state(rng["att_dropout"])
    run.history = list(state.get("history", []))
    if run.evaluator is not None:  # after the weights and the EMA: a best that equals them is copied from them
        run.evaluator.load_state_dict(state.get("evaluation"), run.eval_ctx)
    if run.dist.is_main:
        logger.info("Resumed at step %d of %d", run.start_step, plan.total_steps)
        if run.finished:
            logger.warning(
                "The checkpoint already completed all %d steps: nothing left to train, exporting its weights",
                run.start_step,
            )


def _checkpoint_state(run: _Training) -> dict[str, tp.Any]:
    """Whole (unsharded) state, on CPU; under FSDP a collective, complete on rank 0 only."""
    state = run.parallel.full_state(run.ema)
    return {
        "model": state["model"],
        "optimizer": state["optimizer"],
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "ema": state["ema"],
        "rng": _rng_state(run.lm),
        "history": run.history,
        "evaluation": run.evaluator.state_dict(run.eval_ctx, len(run.history)) if run.evaluator is not None else None,
        "params": dataclasses.asdict(run.params),
        "world_size": run.dist.world_size,
        "data": run.data_identity,
    }


def _non_finite(run: _Training, state: dict[str, tp.Any] | None) -> tuple[str, str] | None:
    """The first non-finite weight (or EMA weight) of a checkpoint state: a checkpoint never holds one, so the
    newest on disk is always the last finite state. (The loss can stay finite while an update made weights NaN,
    e.g. an update that overflowed on the last step, or NaN rows of an embedding no batch used.)"""
    if state is None:
        return None
    names = run.parallel.names
    return ckpt.first_non_finite(
        [*state["model"].items(), *((f"{n} (EMA)", e) for n, e in zip(names, state["ema"] or [], strict=False))]
    )


def _save(run: _Training, step_done: int) -> Path | None:
    """A resume checkpoint after `step_done` steps (every rank calls it; rank 0 writes); its path on rank 0."""
    dist = run.dist
    barrier(dist)
    state = _checkpoint_state(run) if run.parallel.builds_state else None
    bad = _non_finite(run, state) if dist.is_main else None
    if any_rank(dist, bad is not None):  # every rank stops at the same step
        del state
        where = f"'{bad[0]}' holds {bad[1]}" if bad else "on rank 0"
        last = ckpt.newest_checkpoint(run.checkpoint_dir)
        raise NonFiniteError(
            f"Training diverged at step {step_done}: the weights are not finite ({where}); no checkpoint was "
            f"written for it. Last finite state: {resume_hint(last)}. Lower lr (adamw: e.g. 1e-5) "
            "or weight_decay, keep max_grad_norm on, or use precision bf16/fp32."
        )
    path = ckpt.save_checkpoint(run.checkpoint_dir, step_done, state) if state is not None and dist.is_main else None
    del state
    barrier(dist)
    return path


def _evaluate(run: _Training, step_done: int) -> None:
    metrics = run.evaluator.evaluate(step_done, run.eval_ctx, final=step_done == run.plan.total_steps)
    if run.dist.is_main and run.on_metrics is not None:
        run.on_metrics(metrics)


def _forward_backward(run: _Training, micro_batches: list[Batch]) -> tuple[float, float, dict[str, float]]:
    """Gradients of this process's micro-batches, accumulated. Returns the step's loss (the mean over ranks), the
    tokens seen by all ranks, and the split losses of prior preservation (this rank's)."""
    device, accumulation = run.dist.device, run.plan.grad_accumulation
    loss_sum = torch.zeros([], device=device)
    part_sums: dict[str, float] = {}
    tokens = 0
    for i, batch in enumerate(micro_batches):
        with run.parallel.no_sync(last=i == len(micro_batches) - 1):
            with run.autocast:
                prior = torch.tensor([run.prior_flags[c] for c in batch.items]) if any(run.prior_flags) else None
                loss = run.module(batch.codes.to(device), batch.mask.to(device), batch.attributes, prior)
            for name, value in run.train_step.parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + float(value) / accumulation
            scaled = loss / accumulation
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        tokens += batch.n_tokens
    stats = torch.stack([loss_sum / accumulation, torch.tensor(float(tokens), device=device)])
    stats = all_reduce_mean(run.dist, stats)
    return float(stats[0]), float(stats[1]) * run.dist.world_size, part_sums


def _check_finite(step_done: int, what: str, value: float, lower_lr: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(
            f"Training diverged at step {step_done}: the {what} is {value}. Nothing from this step was saved. "
            f"{lower_lr}, keep max_grad_norm on, or use precision bf16/fp32."
        )


def _optimizer_step(run: _Training) -> None:
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _log(run: _Training, metrics: dict[str, float], progress: tqdm, started: float) -> None:
    """Progress bar, a log line about 20 times a run (and the first and last step), `on_metrics`: rank 0 only."""
    if not run.dist.is_main:
        return
    done, total = int(metrics["step"]), run.plan.total_steps
    progress.update(1)
    progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", gn=f"{metrics['grad_norm']:.2f}")
    if done % max(1, total // 20) == 0 or done == total or done - 1 == run.start_step:
        per_step = (time.perf_counter() - started) / (done - run.start_step)
        logger.info(
            "step %d/%d loss %.4f lr %.3e grad_norm %.3f %.0f tokens/s peak %.0f MB, ETA %s",
            done,
            total,
            metrics["loss"],
            metrics["lr"],
            metrics["grad_norm"],
            metrics["tokens_per_s"],
            metrics["peak_memory_mb"],
            format_duration(per_step * (total - done)),
        )
    if run.on_metrics is not None:
        run.on_metrics(metrics)


def _stopped(run: _Training, by: str, done: int, path: Path | None) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"Training stopped by {by} after step {done}; resume checkpoint: {path}. Continue with the same inputs "
        f"and --resume_from {run.checkpoint_dir} (Cog: resume_from=<that file>)",
        exit_code=130 if by == "Ctrl-C" else 143,
    )


def _on_interrupt(run: _Training, e: BaseException) -> None:
    """Cancelled mid-step (Cog cancel, Ctrl-C): keep what the completed steps did, if anything and if whole.
    A Ctrl-C then ends like SIGTERM (TrainingInterrupted: one line with the resume hint, exit 130, no traceback);
    anything else goes on unchanged (Cog's CancelationException is a BaseException too)."""
    interrupted = not isinstance(e, Exception)
    done = len(run.history)
    saved: Path | None = None
    why = "no step completed" if done <= run.start_step else "stopped inside an optimizer update"
    if interrupted and run.consistent and done > run.start_step and run.dist.is_main:
        if not run.parallel.saves_on_interrupt:
            why = f"under {run.parallel.name.upper()} only SIGTERM and save_every write checkpoints"
            name = run.parallel.name.upper()
            logger.warning("Interrupted (%s) under %s: no checkpoint (%s)", type(e).__name__, name, why)
        else:
            state = _checkpoint_state(run)
            bad = _non_finite(run, state)
            if bad is not None:
                why = f"the weights are not finite: '{bad[0]}' holds {bad[1]}"
            else:
                logger.warning("Interrupted (%s): saving a resume checkpoint at step %d", type(e).__name__, done)
                try:
                    saved = ckpt.save_checkpoint(run.checkpoint_dir, done, state)
                except Exception as save_error:  # noqa: BLE001 - the interrupt is what must reach the user
                    why = f"writing it failed: {type(save_error).__name__}: {save_error}"
            del state
    if isinstance(e, KeyboardInterrupt):
        if saved is not None:
            message = f"Training stopped by Ctrl-C after step {done}; {resume_hint(saved)}"
        else:
            older = ckpt.newest_checkpoint(run.checkpoint_dir)
            if older is None and run.params.resume_from and run.start_step > 0:
                older = ckpt.find_checkpoint(run.params.resume_from)
            message = f"Training stopped by Ctrl-C after step {done}, with no checkpoint of it ({why}); "
            message += f"the newest {resume_hint(older)}" if older is not None else resume_hint(None)
        raise TrainingInterrupted(message, exit_code=130) from None


def _export(run: _Training, seconds: float, total_tokens: float) -> TrainResult:
    """The weights to export (keep_best: the best evaluation's; ema: the average) and the run's summary."""
    evaluator, device = run.evaluator, run.dist.device
    exported_step = evaluator.restore_best(run.eval_ctx) if evaluator is not None else None
    state, export_lm = run.parallel.export(run.ema)
    return TrainResult(
        state_dict=state,
        history=run.history,
        steps=len(run.history),  # fewer than planned after an early stop
        tokens_per_s=total_tokens / seconds if run.plan.total_steps - run.start_step else 0.0,
        peak_memory_mb=peak_memory_mb(device),
        seconds=seconds,
        precision=resolve_precision(run.params.precision, device)[2],
        parallel=run.parallel.name,
        lm=export_lm,
        evaluation=evaluator.summary(exported_step) if evaluator is not None else None,
        evaluation_state=evaluator.final_state() if evaluator is not None else None,
        rng=_rng_state(run.lm),  # for `finished_state`: what a checkpoint of this point would hold
        ema_names=list(run.parallel.names) if run.ema is not None else None,
        world_size=run.dist.world_size,
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
    data_identity: dict | None = None,
) -> TrainResult:
    """Train `lm` (audiocraft LMModel, on `dist.device`) on `dataset` following `plan`; returns what to export.

    `evaluator`: validation loss before the first step, every `eval_every` steps and at the end, best weights and
    early stopping (training/evaluate.py); its metrics also go to `on_metrics`."""
    run = _setup(lm, dataset, params, plan, dist, checkpoint_dir, evaluator, on_metrics)
    run.data_identity = data_identity  # the data's fingerprints, checked on resume (training/checkpoint.py)
    if resume_state is not None:
        _resume(run, resume_state)
    optimizer, device = run.optimizer, dist.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    total_tokens = 0.0
    progress = progress_bar(  # not on a terminal: `_log`'s lines are the progress
        total=plan.total_steps,
        initial=run.start_step,
        desc="Training",
        unit="step",
        disable=not dist.is_main,
        log_lines=False,
    )
    try:
        with _StopOnSignal() as stop:
            if evaluator is not None and run.start_step == 0 and not evaluator.history:
                _evaluate(run, 0)  # the base model: what the fine-tune is measured against
            for step in range(run.start_step, run.end_step):
                t0 = time.perf_counter()
                done = step + 1
                # ---- learning rate for this step
                lr = run.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # ---- forward/backward over this process's micro-batches (DDP syncs on the last one)
                step_loss, step_tokens, part_sums = _forward_backward(run, run.micro_batches(step))
                _check_finite(done, "loss", step_loss, "Lower lr (adamw: e.g. 1e-5)")
                # ---- unscale + clip (the whole gradient's norm), step; fp16 overflow: the scaler skips the step
                grad_norm = run.parallel.clip(run.scaler, params.max_grad_norm)
                skipped = not math.isfinite(grad_norm)
                if run.scaler is None:
                    _check_finite(done, "gradient norm", grad_norm, "Lower lr")
                run.consistent = False
                _optimizer_step(run)
                # ---- EMA
                if run.ema is not None and not skipped:
                    torch._foreach_lerp_(run.ema, [w.detach() for w in run.parallel.weights], 1.0 - EMA_DECAY)
                # ---- log
                seconds = time.perf_counter() - t0
                total_tokens += step_tokens
                metrics = {
                    "step": done,
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
                run.history.append(metrics)
                run.consistent = True
                _log(run, metrics, progress, started)
                # ---- validation: every eval_every steps and after the last (before the checkpoint, which keeps it)
                stop_early = False
                if evaluator is not None and evaluator.due(done, plan.total_steps):
                    _evaluate(run, done)
                    stop_early = evaluator.should_stop  # the same on every rank: the losses are all-reduced
                # ---- checkpoint: every save_every steps and at the end; on SIGTERM, then stop
                stopping = any_rank(dist, stop.requested is not None)
                periodic = params.save_every > 0 and (done % params.save_every == 0 or done == plan.total_steps)
                if periodic or stopping:
                    path = _save(run, done)
                    if stopping:  # (another rank's signal: torchrun sends SIGTERM)
                        raise _stopped(run, stop.requested or "SIGTERM", done, path)
                if stop_early:  # early_stop_patience: a checkpoint of where it stopped, then the export
                    if params.save_every > 0 and not periodic:
                        _save(run, done)
                    break
    except BaseException as e:
        _on_interrupt(run, e)
        raise
    finally:
        progress.close()
    return _export(run, time.perf_counter() - started, total_tokens)
