"""Text reaches T5 bounded wherever it comes from: a predict prompt, or a description in a folder prepared
elsewhere (preparation itself bounds what it writes: tests/preprocessing). A 100 KB prompt through T5 once took
21 GB and an out-of-memory kill."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from core.params import from_kwargs
from generation.generate import bounded_prompt
from generation.params import PredictParams
from preprocessing.dataset import load_prepared
from preprocessing.descriptions import MAX_DESCRIPTION_CHARS
from tests.helpers import ROOT
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


# A fresh process: `ru_maxrss` is a high-water mark, which the tests before this one already raised in pytest's own
# process (there the growth read 0 whatever the prompt did). The short prompt first loads everything a generation
# needs, so the growth after it is what the huge prompt itself costs.
_MEASURE = """
import json, resource, sys
from core.params import from_kwargs
from generation.generate import Generator
from generation.params import PredictParams

generator = Generator(device="cpu")
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
for prompt in ("warm analog synth pads", sys.stdin.read()):
    before = peak()
    params = from_kwargs(PredictParams, model_version="tiny-t5", prompt=prompt, duration=1, seed=3)
    wav = generator.generate(params, progress=False).wav
print(json.dumps({"grown_mib": (peak() - before) / 1024, "samples": wav.shape[-1]}))
"""


def test_a_huge_prompt_through_t5_stays_small():
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE], input=HUGE, cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["samples"] == 32000
    assert "prompt is" in run.stderr  # it was cut, with the warning
    assert measured["grown_mib"] < 256, measured


def test_a_prepared_folder_with_a_huge_description_is_read_bounded(tmp_path, caplog):
    folder = make_prepared(tmp_path / "prepared", [{"seconds": 1.0, "description": HUGE}])
    with caplog.at_level(logging.WARNING):
        (clip,) = load_prepared(folder).clips
    assert len(clip.description) <= MAX_DESCRIPTION_CHARS and HUGE.startswith(clip.description)
    assert "track00_000.wav" in caplog.text
