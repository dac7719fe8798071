"""Text reaches T5 bounded wherever it comes from: a predict prompt, or a description in a folder prepared
elsewhere (preparation itself bounds what it writes: tests/preprocessing). A 100 KB prompt through T5 once took
21 GB and an out-of-memory kill."""

from __future__ import annotations

import logging
import resource

from core.params import from_kwargs
from generation.generate import Generator, bounded_prompt
from generation.params import PredictParams
from preprocessing.dataset import load_prepared
from preprocessing.descriptions import MAX_DESCRIPTION_CHARS
from tests.training.conftest import make_prepared

HUGE = ("warm analog synth pads over a slow hip hop beat " * 2200).strip()  # ~105 KB, one line


def test_a_huge_prompt_is_cut_with_a_warning(caplog):
    params = from_kwargs(PredictParams, model_version="tiny-t5", prompt=HUGE, duration=1)
    with caplog.at_level(logging.WARNING):
        short = bounded_prompt(params)
    assert len(short.prompt) <= MAX_DESCRIPTION_CHARS and HUGE.startswith(short.prompt)
    assert not short.prompt.endswith(" ") and short.prompt.split()[-1] in HUGE.split()  # cut at a word boundary
    assert "prompt is" in caplog.text and str(len(HUGE)) in caplog.text
    assert bounded_prompt(from_kwargs(PredictParams, prompt="lofi beat")).prompt == "lofi beat"


def test_a_huge_prompt_through_t5_stays_small():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = from_kwargs(PredictParams, model_version="tiny-t5", prompt=HUGE, duration=1, seed=3)
    result = Generator(device="cpu").generate(params, progress=False)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert result.wav.shape[-1] == 32000
    assert grown_gib < 2.0, grown_gib


def test_a_prepared_folder_with_a_huge_description_is_read_bounded(tmp_path, caplog):
    folder = make_prepared(tmp_path / "prepared", [{"seconds": 1.0, "description": HUGE}])
    with caplog.at_level(logging.WARNING):
        (clip,) = load_prepared(folder).clips
    assert len(clip.description) <= MAX_DESCRIPTION_CHARS and HUGE.startswith(clip.description)
    assert "track00_000.wav" in caplog.text
