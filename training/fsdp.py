"""Fully sharded data parallel training (torch's FSDP2, `fully_shard`) for the models too big for DDP.

DDP keeps a whole fp32 copy of the LM, its gradients and the optimizer's two moments on every GPU: 16 bytes per
parameter, ~24 GB for musicgen-medium (1.5 B) and ~53 GB for large (3.3 B) before activations. FSDP keeps 1/N of
each on each of N processes and gathers one transformer layer at a time for its forward and backward.

What this module gives the FSDP strategy (`training.parallel.FullySharded`); the loop is the same:

- `resolve_parallel`: which kind of data parallelism a run uses (`parallel` input: auto / ddp / fsdp);
- `shard`: `fully_shard` on each transformer layer, then on the training step module (the root);
- `ShardedOptimizer`: the chosen optimizer stepping each rank's shards as plain tensors. D-Adaptation's step size
  needs sums over all weights, which `dadaptation_step` all-reduces; torch's DTensor cannot run its per-weight
  `flatten` on unevenly sharded weights, so it gets the local shards. Its `state_dict` is the full, unsharded
  optimizer state in exactly the layout of a single-process run, so checkpoints resume under any `parallel`;
- `full_state_dict` / `load_full_state_dict`: full weights gathered (kept on rank 0) and a full state dict
  loaded into the shards;
- `skeleton` / `materialize`: a parameter-less copy of the LM made before sharding, filled on rank 0 with the
  gathered weights after training, so the export (samples, tar) sees a plain module.
"""

from __future__ import annotations

import copy
import logging
import typing as tp

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from core import adapters
from core.catalogue import FSDP_AUTO_VERSIONS, SPEC  # 1.5 B parameters and more: auto shards them
from training.dist import DistInfo
from training.params import PARALLEL_MODES

logger = logging.getLogger(__name__)

__all__ = [
    "PARALLEL_MODES",
    "FSDP_AUTO_VERSIONS",
    "resolve_parallel",
    "shard",
    "ShardedOptimizer",
    "full_tensor",
    "full_state_dict",
    "load_full_state_dict",
    "shard_of",
    "gather",
    "skeleton",
    "materialize",
]


def resolve_parallel(parallel: str, model_version: str, dist: DistInfo) -> str:
    """`"single"`, `"ddp"` or `"fsdp"` for this run; the decision is logged (on rank 0)."""
    if not dist.distributed:
        if parallel != "auto" and dist.is_main:
            logger.info("parallel=%s: one training process, no data parallelism", parallel)
        return "single"
    if parallel == "auto":
        known = SPEC.get(model_version)
        mode = "fsdp" if known is not None and known.fsdp_auto else "ddp"
        why = (
            f"{model_version} is medium-sized or larger: weights, gradients and optimizer state sharded"
            if mode == "fsdp"
            else f"{model_version} fits whole on each process"
        )
    else:
        mode, why = parallel, "as asked"
    if dist.is_main:
        logger.info("Data parallelism over %d processes: %s (%s)", dist.world_size, mode.upper(), why)
    return mode


def shard(step_module: nn.Module, lm: nn.Module) -> nn.Module:
    """`fully_shard` each transformer layer of `lm` (one all-gather per layer), then `step_module` (the root: the
    embeddings, output heads, norms and condition provider). In place; returns `step_module`.

    Rank 0's weights and buffers are broadcast first, as DDP does: what a rank initialised itself (LoRA factors,
    a model from scratch) must be the same everywhere before each rank keeps its own piece.
    """
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for tensor in step_module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    placement = _placement_fn(torch.distributed.get_world_size())
    for layer in lm.transformer.layers:
        fully_shard(layer, shard_placement_fn=placement)
    fully_shard(step_module, shard_placement_fn=placement)
    # FSDP reads each parameter back once with getattr, in its lazy init (normally on the first forward). LoRA puts
    # a class-level property in front of attention's `in_proj_weight` Parameter (core/adapters.py: it returns the
    # adapted weight), so run that init now, with those modules briefly answering with the Parameter itself.
    with adapters.base_parameters_exposed(step_module):
        step_module._get_fsdp_state()._lazy_init()
    return step_module


def _placement_fn(world_size: int) -> tp.Callable[[nn.Parameter], tp.Any]:
    """Rows (dim 0) by default; a weight with fewer rows than processes (textual inversion's trigger rows
    `[n, dim]`) is cut along a later dimension that divides evenly, so that every rank holds a piece of it."""
    from torch.distributed.tensor import Shard

    def placement(p: nn.Parameter) -> tp.Any:
        if p.dim() == 0 or p.shape[0] >= world_size:
            return None  # FSDP's default, Shard(0)
        for dim in range(1, p.dim()):
            if p.shape[dim] % world_size == 0:
                return Shard(dim)
        return None

    return placement


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather on every rank for a sharded one)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, laid out as the sharded `like` (every rank holds `full`: no communication)."""
    if not isinstance(like, DTensor):
        return full.to(like.device, like.dtype)
    full = full.to(like.device, like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _local(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # `to_local` outside autograd is the shard's own storage
        return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def full_state_dict(module: nn.Module, dist: DistInfo) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with whole CPU tensors on rank 0 (one weight gathered at a time); `{}` elsewhere."""
    out = {}
    for name, value in module.state_dict().items():
        whole = full_tensor(value.detach())
        if dist.is_main:
            out[name] = whole.cpu()
        del whole
    return out


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) state dict, held by every rank, into `module`'s shards (strict on the keys)."""
    current = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, target in current.items():
        _local(target).copy_(shard_of(state[name], target))


class ShardedOptimizer:
    """An optimizer over FSDP2-sharded (DTensor) parameters that steps each rank's shards as plain tensors.

    `build(tensors)` makes the underlying optimizer (AdamW: every update is elementwise, so shards are exact;
    D-Adaptation Adam with `fsdp_in_use=True`: its two global sums are all-reduced). Call `collect_grads()` after
    the backward pass, before unscaling or clipping.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        build: tp.Callable[[list[torch.Tensor]], torch.optim.Optimizer],
        dist: DistInfo,
    ):
        self.params = params
        self.dist = dist
        self.shards = [_local(p) for p in params]
        self.optimizer = build(self.shards)
        self._every_rank_moved = "d" not in self.optimizer.param_groups[0]  # only D-Adaptation needs the check

    @property
    def param_groups(self) -> list[dict[str, tp.Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> tp.Any:
        return self.optimizer.state

    def collect_grads(self) -> None:
        for p, s in zip(self.params, self.shards, strict=True):
            s.grad = _local(p.grad) if p.grad is not None else None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of the whole gradient (all ranks' shards) as `torch.nn.utils.clip_grad_norm_`."""
        grads = [s.grad for s in self.shards if s.grad is not None]
        device = self.shards[0].device
        square = torch.zeros([], dtype=torch.float32, device=device)
        for g in grads:
            square += g.float().square().sum()
        torch.distributed.all_reduce(square)
        total = square.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return float(total)

    def step(self) -> None:
        if not self._every_rank_moved:
            self._check_every_rank_has_gradients()
        if "d" in self.optimizer.param_groups[0]:
            dadaptation_step(self.optimizer, self.shards[0].device)
        else:
            self.optimizer.step()

    def _check_every_rank_has_gradients(self) -> None:
        """D-Adaptation returns early, before its all-reduce, on a rank whose shards saw no gradient yet: with
        other ranks in the all-reduce that would hang. Refuse instead (once every rank has moved, its running
        sums stay non-zero and the check stops)."""
        moved = any(s.grad is not None and bool(s.grad.any()) for s in self.shards)
        flags = torch.tensor([1.0 if moved else 0.0, 0.0 if moved else 1.0], device=self.shards[0].device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        some_moved, some_still = bool(flags[0] > 0), bool(flags[1] > 0)
        if some_moved and some_still:
            raise RuntimeError(
                "optimizer=dadam under FSDP: some ranks hold no part of the trained weights' gradient, which "
                "D-Adaptation cannot sum over ranks; use parallel=ddp or optimizer=adamw"
            )
        self._every_rank_moved = some_moved

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, s in zip(self.params, self.shards, strict=True):
            p.grad = None
            s.grad = None

    # ---- full (unsharded) state, in the layout `optimizer.state_dict()` has in a single process
    @torch.no_grad()
    def state_dict(self) -> dict[str, tp.Any]:
        """Gathered on every rank (a collective), CPU tensors on rank 0; other ranks get the same structure."""
        local = self.optimizer.state_dict()
        state = {}
        for index, values in sorted(local["state"].items()):
            p = self.params[index]
            state[index] = {
                key: self._gather(value, p) if self._is_shard(value, index) else value for key, value in values.items()
            }
        groups = copy.deepcopy(local["param_groups"])
        for group in groups:
            if "numerator_weighted" in group:  # D-Adaptation: a sum over weights; each rank keeps its part
                total = torch.tensor([float(group["numerator_weighted"])], dtype=torch.float64)
                torch.distributed.all_reduce(total)
                group["numerator_weighted"] = float(total)
            if isinstance(group.get("d"), torch.Tensor):
                group["d"] = float(group["d"])
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, full: dict[str, tp.Any]) -> None:
        state = {}
        for index, values in full["state"].items():
            p = self.params[int(index)]
            state[int(index)] = {
                key: shard_of(value, p) if isinstance(value, torch.Tensor) and value.shape == p.shape else value
                for key, value in values.items()
            }
        groups = copy.deepcopy(full["param_groups"])
        for group in groups:
            if "numerator_weighted" in group and not self.dist.is_main:
                group["numerator_weighted"] = 0.0  # only the sum over ranks is used: rank 0 carries it
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _is_shard(self, value: tp.Any, index: int) -> bool:
        return isinstance(value, torch.Tensor) and value.shape == self.shards[index].shape and value.dim() > 0

    def _gather(self, shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return gather(shard, like, self.dist)


def gather(shard: torch.Tensor, like: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The whole tensor of which `shard` is this rank's piece, sharded as the parameter `like` (a collective):
    on CPU on rank 0, empty elsewhere."""
    if not isinstance(like, DTensor):
        return shard.detach().cpu()
    whole = DTensor.from_local(shard, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    out = whole.full_tensor()
    return out.cpu() if dist.is_main else out[:0]


@torch.no_grad()
def dadaptation_step(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """One step of D-Adaptation Adam (`dadaptation.DAdaptAdam`) on this rank's shards, its step size `d` estimated
    from sums over all ranks, with the very operations of its own `fsdp_in_use` branch.

    That branch builds its 2-value sum tensor with `.cuda()`, which fails on CPU (gloo). So the optimizer steps
    with only local sums (`fsdp_in_use` off for the call: no collective inside), which moves the weights exactly
    as the sharded step would (the update uses the `d` from before the step), and `d` is then recomputed here from
    the all-reduced sums, on `device`. The local `numerator_weighted` it keeps is what its FSDP branch keeps too.
    """
    groups = optimizer.param_groups
    first = groups[0]
    d, k, growth_rate = first["d"], first["k"], first["growth_rate"]
    sqrt_beta2 = first["betas"][1] ** 0.5
    flags = [group["fsdp_in_use"] for group in groups]
    for group in groups:
        group["fsdp_in_use"] = False
    try:
        optimizer.step()
    finally:
        for group, flag in zip(groups, flags, strict=True):
            group["fsdp_in_use"] = flag
    if first["k"] == k or max(group["lr"] for group in groups) <= 0.0:
        # no gradient seen yet (it returned before its sums, as its FSDP branch does) or lr 0 (d stays)
        return
    # its `sk_l1`, summed in the same order with the same float operations (`s` is not changed after it is summed)
    sk_l1 = 0.0
    for group in groups:
        if group["lr"] > 0.0:
            for p in group["params"]:
                if p.grad is not None:
                    sk_l1 += group["layer_scale"] * optimizer.state[p]["s"].abs().sum().item()
    sums = torch.zeros(2, device=device)
    sums[0] = first["numerator_weighted"]
    sums[1] = sk_l1
    torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
    d_hat = sums[0] / ((1 - sqrt_beta2) * sums[1])
    d = max(d, min(d_hat, d * growth_rate))
    for group in groups:
        group["d"] = d


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module`'s structure whose parameters are on the meta device (no memory): everything else is
    shared with the original (configs, tokenizers, unregistered frozen models such as T5 or demucs) except the
    buffers (copied) and the hook tables (so hooks added to the original later, e.g. FSDP's, stay there)."""
    memo: dict[int, tp.Any] = {}

    def copy_module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = copy.copy(m)
        memo[id(m)] = new
        for key, value in vars(m).items():
            if key.startswith("_") and isinstance(value, dict) and key not in ("_parameters", "_buffers", "_modules"):
                new.__dict__[key] = type(value)(value)  # hook tables and other per-module registries
        new.__dict__["_parameters"] = {n: meta_param(p) if p is not None else None for n, p in m._parameters.items()}
        new.__dict__["_buffers"] = {n: b.detach().clone() if b is not None else None for n, b in m._buffers.items()}
        new.__dict__["_modules"] = {n: copy_module(c) if c is not None else None for n, c in m._modules.items()}
        return new

    def meta_param(p: nn.Parameter) -> nn.Parameter:
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        return memo[id(p)]

    return copy_module(module)


def materialize(module: nn.Module, state: dict[str, torch.Tensor], device: str) -> nn.Module:
    """Fill a `skeleton` with a full state dict (its tensors taken as they are) and move it to `device`."""
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device)
