"""`xformers.ops` as audiocraft uses it with `_efficient_attention_backend == 'torch'` (its default)."""

from __future__ import annotations

import torch


def unbind(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    return torch.unbind(x, dim)


class LowerTriangularMask:
    """A marker: audiocraft passes `is_causal=attn_mask is not None` to torch's attention."""


def memory_efficient_attention(*args, **kwargs):
    raise NotImplementedError("xformers is a stand-in here (bench/gpu_stubs): use audiocraft's torch backend")
