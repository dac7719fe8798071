"""Data parallelism: who am I (`DistInfo`), start/stop the process group, and launch `torchrun` workers.

One process per GPU under `torchrun` (DDP, or FSDP: `training/fsdp.py`); a single process otherwise. Only rank 0
logs, saves and writes.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

from core.devices import default_device

logger = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "init",
    "shutdown",
    "barrier",
    "all_reduce_mean",
    "any_rank",
    "rank_weight_difference",
    "launch_torchrun",
    "visible_gpus",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. `device` is where its model lives (`cuda:<local_rank>` or `cpu`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def under_torchrun() -> bool:
        return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """The DistInfo of this process; joins the process group when started by torchrun (nccl on GPUs, else gloo)."""
    if not DistInfo.under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(device=device or default_device())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(rank, world_size, local_rank, f"cuda:{local_rank}" if use_cuda else "cpu")


def shutdown(dist: DistInfo) -> None:
    if dist.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        torch.distributed.barrier()


def all_reduce_mean(dist: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Mean of a small float tensor over ranks (a copy; identical on every rank)."""
    if not dist.distributed:
        return values.clone()
    out = values.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out / dist.world_size


def any_rank(dist: DistInfo, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (stops all ranks at the same step)."""
    if not dist.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank_weight_difference(dist: DistInfo, tensors: tp.Iterable[torch.Tensor]) -> float:
    """Largest difference between ranks of per-tensor checksums (sum and sum of squares, float64); 0.0 = in sync.

    FSDP-sharded tensors (DTensor) are gathered whole first, one at a time (a collective: every rank passes the
    same tensors in the same order); they exist once, so the check then covers the replicated tensors.
    """
    from torch.distributed.tensor import DTensor

    def checksum(t: torch.Tensor) -> torch.Tensor:
        t = (t.full_tensor() if isinstance(t, DTensor) else t).detach().double()
        return torch.stack([t.sum(), t.square().sum()])

    local = torch.stack([checksum(t) for t in tensors]).flatten()
    if not dist.distributed:
        return 0.0
    local = local.to(dist.device)
    gathered = [torch.empty_like(local) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, local)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def launch_torchrun(nproc: int, module: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run `python -m torch.distributed.run --nproc_per_node=nproc -m module args...` and wait for it.

    Single node. For several machines run the same module under your own `torchrun --nnodes ... --rdzv_endpoint`
    (docs/training.md). Raises RuntimeError with the exit code when a worker fails.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]
    full_env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH", "")) if p)
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    full_env.update(env or {})
    logger.info("Launching %d training processes: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=full_env)
    try:
        code = proc.wait()
    except BaseException:
        # Cancelled (Cog cancel, Ctrl-C): pass it on so the workers save a resume checkpoint, then wait for them.
        proc.terminate()
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0:
        raise RuntimeError(f"distributed training failed: torchrun exited with code {code} (see the log above)")
