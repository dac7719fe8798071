"""How the training processes share the work: one process, DDP or FSDP, behind one interface (`Parallel`).

The training loop (`training.loop.train_loop`) is the same for all three; what differs is here:

- `wrap(train_step, lm)`: the module the loop calls (DDP's wrapper; FSDP's sharded root);
- `build_optimizer` / `grad_scaler`: over this process's weights (FSDP: its shards, `fsdp.ShardedOptimizer`, and a
  loss scaler that skips an overflowing step on every rank at once);
- `no_sync(last)`: around each micro-batch (DDP all-reduces the gradients on the last one only);
- `clip`: the norm of the whole gradient (FSDP: summed over every rank's shards);
- `full_state` / `load` / `export`: whole, unsharded tensors in and out, in the same layout under every strategy,
  so a checkpoint of one resumes under another;
- what validation needs (`eval_module`, `gather`, `shard_of`, `sharded`) and `saves_on_interrupt`.

`parallel_for` picks the strategy (`fsdp.resolve_parallel`: the `parallel` input and the model size).
FSDP's own mechanics (sharding, the sharded optimizer, gathering) stay in `training/fsdp.py`.
"""

from __future__ import annotations

import contextlib
import typing as tp

import torch
from torch import nn

from training import fsdp as fsdp_mod
from training.dist import DistInfo
from training.params import TrainParams

__all__ = ["Parallel", "SingleProcess", "DataParallel", "FullySharded", "parallel_for", "OptimizerFactory"]

# (tensors to optimize, whether they are FSDP shards) -> the optimizer (`training.loop.build_optimizer`)
OptimizerFactory = tp.Callable[[list[torch.Tensor], bool], torch.optim.Optimizer]


class Parallel:
    """A whole model in this process (the base of every strategy). Use in this order: `wrap`, `build_optimizer`,
    then the rest. `trainable` are the LM's trained parameters (DTensors under FSDP), `names` their names, and
    `weights` what the optimizer and the EMA update (under FSDP this rank's pieces of them)."""

    name = "single"
    sharded = False  # the weights are split over the processes (FSDP)
    saves_on_interrupt = True  # a cancel (not coordinated over ranks) can still write a checkpoint

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.lm: nn.Module | None = None
        self.module: nn.Module | None = None
        self.optimizer: tp.Any = None
        self.names: list[str] = []
        self.trainable: list[nn.Parameter] = []

    # ---- set-up
    def wrap(self, train_step: nn.Module, lm: nn.Module) -> nn.Module:
        """The module the loop calls for the training forward (`train_step`, whose `lm` is `lm`)."""
        self.lm = lm
        self.module = self._wrap(train_step, lm)
        self.names = [n for n, p in lm.named_parameters() if p.requires_grad]
        self.trainable = [p for p in lm.parameters() if p.requires_grad]
        return self.module

    def _wrap(self, train_step: nn.Module, lm: nn.Module) -> nn.Module:
        return train_step

    def build_optimizer(self, make: OptimizerFactory) -> tp.Any:
        self.optimizer = make(self.trainable, False)
        return self.optimizer

    @property
    def weights(self) -> list[torch.Tensor]:
        return self.trainable

    def grad_scaler(self, enabled: bool) -> tp.Any:
        """fp16 loss scaling (`enabled`), else None."""
        return torch.amp.GradScaler("cuda") if enabled else None

    # ---- one step
    def no_sync(self, last: bool) -> tp.ContextManager:
        """Around a micro-batch's forward and backward; `last`: the step's last micro-batch."""
        return contextlib.nullcontext()

    def clip(self, scaler: tp.Any, max_grad_norm: float) -> float:
        """Unscale the gradient (fp16) and clip it to `max_grad_norm` (0: no clipping); its norm before."""
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        return self._clip(max_grad_norm if max_grad_norm > 0 else float("inf"))

    def _clip(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))

    # ---- whole state in and out
    @property
    def builds_state(self) -> bool:
        """Whether this rank takes part in `full_state` (rank 0; under FSDP every rank, sending its shards)."""
        return self.dist.is_main

    def full_state(self, ema: list[torch.Tensor] | None) -> dict[str, tp.Any]:
        """`model`, `optimizer` and `ema` of a checkpoint: whole, on CPU (under FSDP a collective, complete on rank
        0 only)."""
        ema_state = None if ema is None else [self.gather(e, p) for e, p in zip(ema, self.trainable, strict=True)]
        return {
            "model": fsdp_mod.full_state_dict(self.lm, self.dist),
            "optimizer": self.optimizer.state_dict(),
            "ema": ema_state,
        }

    def load(self, state: dict[str, tp.Any], ema: list[torch.Tensor] | None) -> None:
        """Weights, optimizer and EMA from a checkpoint's whole tensors (written under any strategy)."""
        self._load_model(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            # D-Adaptation keeps `fsdp_in_use` in its param groups: a checkpoint written under FSDP says True,
            # which in a process without FSDP would make its step all-reduce over ranks that are not there.
            for group in self.optimizer.param_groups:
                if "fsdp_in_use" in group:
                    group["fsdp_in_use"] = self.sharded
        if ema is not None and state.get("ema") is not None:
            for e, saved, p in zip(ema, state["ema"], self.trainable, strict=True):
                e.copy_(self.shard_of(saved, p))

    def _load_model(self, model: dict[str, torch.Tensor]) -> None:
        self.lm.load_state_dict(model)

    def export(self, ema: list[torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
        """The weights to export (with `ema`, the averaged ones in place of the trained) and, under FSDP, rank 0's
        plain LM holding them (the trained one is sharded); else None (export `lm` itself)."""
        if ema is None:
            return {k: v.detach() for k, v in self.lm.state_dict().items()}, None
        averaged = dict(zip(self.names, ema, strict=True))
        return {k: averaged.get(k, v).detach() for k, v in self.lm.state_dict().items()}, None

    # ---- what validation needs (training/evaluate.py: EvalContext)
    def eval_module(self, train_step: nn.Module) -> nn.Module:
        """What computes the validation forward: `train_step` itself (DDP's wrapper would sync gradients)."""
        return train_step

    def gather(self, piece: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The whole tensor of `piece` (this rank's part of one laid out as `param`), on CPU on rank 0."""
        return fsdp_mod.gather(piece, param, self.dist)

    @staticmethod
    def shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole tensor `full`, laid out as `param` (no communication)."""
        return fsdp_mod.shard_of(full, param)


class SingleProcess(Parallel):
    """One training process."""


class DataParallel(Parallel):
    """DDP: a whole model in each process, gradients averaged over processes in the backward pass."""

    name = "ddp"

    def _wrap(self, train_step: nn.Module, lm: nn.Module) -> nn.Module:
        return torch.nn.parallel.DistributedDataParallel(train_step, broadcast_buffers=False)

    def no_sync(self, last: bool) -> tp.ContextManager:
        return contextlib.nullcontext() if last else self.module.no_sync()


class FullySharded(Parallel):
    """FSDP: weights, gradients and optimizer state split over the processes (training/fsdp.py)."""

    name = "fsdp"
    sharded = True
    saves_on_interrupt = False  # gathering the shards needs every rank, which an interrupt does not coordinate

    def __init__(self, dist: DistInfo):
        super().__init__(dist)
        self.skeleton: nn.Module | None = None

    def _wrap(self, train_step: nn.Module, lm: nn.Module) -> nn.Module:
        # sharding replaces the LM's parameters by shards: rank 0 keeps a weightless copy of it to export from
        self.skeleton = fsdp_mod.skeleton(lm) if self.dist.is_main else None
        return fsdp_mod.shard(train_step, lm)

    def build_optimizer(self, make: OptimizerFactory) -> tp.Any:
        self.optimizer = fsdp_mod.ShardedOptimizer(self.trainable, lambda shards: make(shards, True), self.dist)
        return self.optimizer

    @property
    def weights(self) -> list[torch.Tensor]:
        return self.optimizer.shards

    def grad_scaler(self, enabled: bool) -> tp.Any:
        if not enabled:
            return None
        # every rank must skip the same overflowing steps: its found-inf is all-reduced
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler("cuda")

    def clip(self, scaler: tp.Any, max_grad_norm: float) -> float:
        self.optimizer.collect_grads()  # the shards' gradients, before unscaling
        return super().clip(scaler, max_grad_norm)

    def _clip(self, max_norm: float) -> float:
        return self.optimizer.clip_grad_norm_(max_norm)

    @property
    def builds_state(self) -> bool:
        return True

    def _load_model(self, model: dict[str, torch.Tensor]) -> None:
        fsdp_mod.load_full_state_dict(self.lm, model)

    def export(self, ema: list[torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
        """A collective: every rank sends its shards; rank 0 gets the whole weights in a plain module."""
        state = fsdp_mod.full_state_dict(self.lm, self.dist)
        if ema is not None:
            averaged = {n: self.gather(e, p) for n, e, p in zip(self.names, ema, self.trainable, strict=True)}
            state = {k: averaged.get(k, v) for k, v in state.items()}
        device = self.dist.device
        export_lm = fsdp_mod.materialize(self.skeleton, state, device) if self.skeleton is not None else None
        return state, export_lm

    def eval_module(self, train_step: nn.Module) -> nn.Module:
        return self.module  # the sharded root, whose hooks gather the weights

    def whole_lm(self) -> nn.Module | None:
        """A collective: every rank sends its pieces, one weight at a time; rank 0 gets a new plain LM holding the
        weights as they are now (a copy of its skeleton: the caller drops it), other ranks None."""
        state = fsdp_mod.full_state_dict(self.lm, self.dist)
        if self.skeleton is None:
            return None
        return fsdp_mod.materialize(fsdp_mod.skeleton(self.skeleton), state, self.dist.device)


def parallel_for(params: TrainParams, dist: DistInfo) -> Parallel:
    """The strategy of this run (the decision is logged on rank 0)."""
    mode = fsdp_mod.resolve_parallel(params.parallel, params.model_version, dist)
    return {"single": SingleProcess, "ddp": DataParallel, "fsdp": FullySharded}[mode](dist)
