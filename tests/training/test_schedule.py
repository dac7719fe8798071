"""The learning-rate schedule: a pure function of the step."""

from __future__ import annotations

import math
import random

import pytest

from training.params import LR_SCHEDULERS
from training.schedule import EXPONENTIAL_FINAL_RATIO, get_lr

TOTAL, WARMUP, LR = 100, 8, 2.0


def curve(scheduler: str, warmup: int = WARMUP, total: int = TOTAL) -> list[float]:
    return [get_lr(s, lr=LR, scheduler=scheduler, warmup=warmup, total_steps=total) for s in range(total)]


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_warmup_is_linear_from_the_first_step_to_lr(scheduler):
    lrs = curve(scheduler)
    assert lrs[0] == pytest.approx(LR / WARMUP)  # the first step already moves
    assert lrs[WARMUP - 1] == pytest.approx(LR)
    assert all(b > a for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP], strict=False))
    assert all(0 < x <= LR for x in lrs)  # never 0 (the last step still moves), never above lr


def test_decays():
    cosine, expo, poly = curve("cosine"), curve("exponential"), curve("polynomial_decay")
    for lrs in (cosine, expo, poly):
        after = lrs[WARMUP:]
        assert all(b <= a for a, b in zip(after, after[1:], strict=False))
    assert cosine[-1] < 0.01 * LR
    assert expo[-1] == pytest.approx(LR * EXPONENTIAL_FINAL_RATIO ** ((TOTAL - 1 - WARMUP) / (TOTAL - WARMUP)))
    assert poly[-1] == pytest.approx(LR / (TOTAL - WARMUP))
    # cosine: half way through the decay, half the lr
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert cosine[middle] == pytest.approx(LR / 2)


def test_inverse_sqrt_and_constant():
    inv = curve("inverse_sqrt")
    assert inv[WARMUP] == pytest.approx(LR * math.sqrt(WARMUP / (WARMUP + 1)))
    assert inv[-1] == pytest.approx(LR * math.sqrt(WARMUP / TOTAL))
    assert curve("linear_warmup")[WARMUP:] == [LR] * (TOTAL - WARMUP)


def test_no_warmup_and_a_single_step():
    assert curve("cosine", warmup=0)[0] == LR
    assert curve("inverse_sqrt", warmup=0)[0] == LR
    assert get_lr(0, lr=LR, scheduler="cosine", warmup=0, total_steps=1) == LR
    # a warmup longer than the run just ramps up
    assert curve("cosine", warmup=200, total=10)[-1] == pytest.approx(LR * 10 / 200)


def reference(step: int, scheduler: str) -> float:
    """The schedule as the docs write it (docs/training.md, training/schedule.py), for TOTAL, WARMUP, LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    return {
        "cosine": LR * 0.5 * (1 + math.cos(math.pi * progress)),
        "exponential": LR * EXPONENTIAL_FINAL_RATIO**progress,
        "polynomial_decay": LR * (1 - progress),
        "inverse_sqrt": LR * math.sqrt(WARMUP / (step + 1)),
        "linear_warmup": LR,
    }[scheduler]


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_pure_in_the_step(scheduler):
    """A resumed run recomputes the lr from the step alone: asked in any order, with another run's steps asked in
    between, each step gets the documented value."""
    order = list(range(TOTAL))
    random.Random(0).shuffle(order)
    asked = {}
    for s in order:
        get_lr(TOTAL - 1 - s, lr=3 * LR, scheduler="cosine", warmup=1, total_steps=2 * TOTAL)  # another run
        asked[s] = get_lr(s, lr=LR, scheduler=scheduler, warmup=WARMUP, total_steps=TOTAL)
    assert [asked[s] for s in range(TOTAL)] == pytest.approx([reference(s, scheduler) for s in range(TOTAL)])


def test_checked():
    with pytest.raises(ValueError):
        get_lr(-1, lr=LR, scheduler="cosine", warmup=0, total_steps=10)
    with pytest.raises(ValueError):
        get_lr(20, lr=LR, scheduler="step", warmup=0, total_steps=10)
