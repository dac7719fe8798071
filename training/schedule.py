"""The learning-rate schedule as one pure function of the step (nothing to save: a resumed run recomputes it)."""

from __future__ import annotations

import math

__all__ = ["get_lr", "EXPONENTIAL_FINAL_RATIO"]

# `exponential` decays to this fraction of lr by the last step (a per-run gamma, so the run length does not matter).
EXPONENTIAL_FINAL_RATIO = 0.01


def get_lr(step: int, *, lr: float, scheduler: str, warmup: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup is linear over the first `warmup` steps and reaches `lr` on its last one (step 0 already moves, unlike
    audiocraft's schedulers whose step 0 has lr 0). After it, `progress` goes from 0 (first step after the
    warmup) to 1 (last step):
    cosine: lr * (1 + cos(pi * progress)) / 2; exponential: lr * 0.01 ** progress; polynomial_decay: lr * (1 -
    progress) (power 1, end 0); inverse_sqrt: lr * sqrt(max(warmup, 1) / (step + 1)); linear_warmup: lr.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if scheduler == "linear_warmup":
        return lr
    if scheduler == "inverse_sqrt":
        return lr * math.sqrt(max(warmup, 1) / (step + 1))
    # progress stays below 1 so that the last step still moves (as in audiocraft's schedulers).
    progress = min(1.0, (step - warmup) / max(total_steps - warmup, 1))
    if scheduler == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "exponential":
        return lr * EXPONENTIAL_FINAL_RATIO**progress
    if scheduler == "polynomial_decay":
        return lr * (1.0 - progress)
    raise ValueError(f"unknown lr_scheduler {scheduler!r}")
