"""The fixed-shape decode step (`generation.fast._StaticStep`, what CUDA graphs replay) against today's path on CPU.

The static step attends over whole cache buckets with a length mask and takes its position as a tensor; in fp32 on
CPU (run eagerly) it must give exactly the tokens of the dynamic path, which are audiocraft's. Small buckets make the
steps cross bucket ends; a mask or a position off by one changes the tokens.
"""

from __future__ import annotations

import pytest
import torch

import generation.fast as fast_module
from generation.fast import generate_tokens
from tests.generation.test_fast import GEN_LEN, SETTINGS, attributes, seeded, tiny_model

BUCKET = 16  # several buckets within GEN_LEN steps (the default, 128, would hold a whole tiny generation)


@pytest.fixture
def step_lengths(monkeypatch) -> list[int]:
    """The attended cache length of every static step run (small buckets)."""
    monkeypatch.setattr(fast_module, "STATIC_BUCKET", BUCKET)
    lengths: list[int] = []
    step = fast_module._StaticStep._step

    def recording(self, length: int) -> None:
        lengths.append(length)
        step(self, length)

    monkeypatch.setattr(fast_module._StaticStep, "_step", recording)
    return lengths


@pytest.mark.parametrize("name", ["tiny", "tiny-melody"])
@pytest.mark.parametrize("setting", ["top_k", "greedy"])
@pytest.mark.parametrize("with_prompt", [False, True], ids=["no-prompt", "prompt"])
def test_static_step_gives_the_tokens_of_todays_path(name, setting, with_prompt, step_lengths):
    """tiny-melody prepends its (empty) chroma, ~940 frames: the positions then start far from 0."""
    model = tiny_model(name)
    lm = model.lm
    attrs = attributes(model, 2)
    prompt = None
    if with_prompt:
        gen = torch.Generator().manual_seed(3)
        prompt = torch.randint(0, lm.card, (2, lm.num_codebooks, 9), generator=gen)
    kw = SETTINGS[setting]
    static = seeded(lambda: generate_tokens(lm, attrs, prompt, GEN_LEN, static=True, **kw))
    dynamic = seeded(lambda: generate_tokens(lm, attrs, prompt, GEN_LEN, static=False, **kw))
    theirs = seeded(lambda: lm.generate(prompt, attrs, max_gen_len=GEN_LEN, cfg_coef=3.0, **kw))
    assert torch.equal(dynamic, theirs)
    assert torch.equal(static, dynamic)
    # Every step after the first went through the static step, over several buckets of whole lengths.
    # The delay pattern's sequence: one special step, GEN_LEN frames, 3 delays. The first sampled step (after the
    # prompt) follows the prefill, which runs as today; every later step is static.
    first = 1 + (9 if with_prompt else 0)
    assert len(step_lengths) == (1 + GEN_LEN + 3) - first - 1
    assert all(n % BUCKET == 0 for n in step_lengths)
    assert len(set(step_lengths)) >= 3
    assert not torch.equal(static[0], static[1])  # two samples that differ: the comparison is not trivial
