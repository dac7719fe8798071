"""The learning-rate schedule: a pure function of the step."""

from __future__ import annotations

import math

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


def test_pure_and_checked():
    assert curve("cosine") == curve("cosine")
    with pytest.raises(ValueError):
        get_lr(-1, lr=LR, scheduler="cosine", warmup=0, total_steps=10)
    with pytest.raises(ValueError):
        get_lr(20, lr=LR, scheduler="step", warmup=0, total_steps=10)
