"""Fixtures for the training tests: prepared datasets in the preprocessing contract's format, built directly.

The folder is written here from the contract (32 kHz WAV clips, `data.jsonl` with one audiocraft AudioMeta per
line, a MusicInfo sidecar `<clip>.json` beside each clip) and read by the trainer through
`preprocessing.load_prepared`, so a drift between the two sides of the contract fails these tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core.params import from_kwargs
from tests.helpers import tone
from training.params import TrainParams
from training.run import run_training

SR = 32000


def make_prepared(folder: Path, specs: list[dict]) -> Path:
    """Write a prepared dataset. Each spec: seconds, channels (1), freq (220), description ("")."""
    clips_dir = folder / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, spec in enumerate(specs):
        seconds = spec["seconds"]
        path = clips_dir / f"track{i:02d}_000.wav"
        data = tone(seconds, SR, spec.get("channels", 1), freq=spec.get("freq", 220.0), seed=i)
        sf.write(str(path), data, SR, subtype="PCM_16")
        info = {
            "title": f"track{i:02d}",
            "artist": None,
            "key": spec.get("key"),
            "bpm": spec.get("bpm"),
            "genre": spec.get("genre"),
            "moods": spec.get("moods"),
            "keywords": None,
            "description": spec.get("description", ""),
            "name": path.stem,
            "instrument": spec.get("instrument"),
            "source": f"track{i:02d}.wav",
            "channels": spec.get("channels", 1),
        }
        path.with_suffix(".json").write_text(json.dumps(info))
        meta = {
            "path": str(path.resolve()),
            "duration": len(data) / SR,
            "sample_rate": SR,
            "amplitude": None,
            "weight": None,
            "info_path": None,
        }
        lines.append(json.dumps(meta))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def two_clips(tmp_path: Path) -> Path:
    """Two short mono clips with different descriptions (overfitting target)."""
    return make_prepared(
        tmp_path / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "calm piano", "genre": "jazz", "moods": ["calm"]},
            {"seconds": 2.0, "freq": 330.0, "description": "fast drums", "genre": "rock", "moods": ["energetic"]},
        ],
    )


def tiny_params(dataset: Path, **overrides) -> TrainParams:
    """Small, fast training inputs for the tiny model (short crops, no vocal removal, no auto-labeling)."""
    values = {
        "dataset_path": str(dataset),
        "model_version": "tiny",
        "auto_labeling": False,
        "drop_vocals": False,
        "epochs": 2,
        "updates_per_epoch": 15,
        "batch_size": 2,
        "segment_duration": 2.0,
        "sample_duration": 0.5,
        "save_every": 10,
    }
    values.update(overrides)
    return from_kwargs(TrainParams, **values)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One real training run shared by several tests: tiny model, 2 clips, 2 epochs x 15 steps, default dadam,
    checkpoints every 10 steps (10 is deleted, 20 and 30 are kept).

    Returns the dataset folder, the inputs, the output folder and the trained_model.tar path.
    """
    root = tmp_path_factory.mktemp("tiny_run")
    dataset = make_prepared(
        root / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "calm piano", "genre": "jazz", "moods": ["calm"]},
            {"seconds": 2.0, "freq": 330.0, "description": "fast drums", "genre": "rock", "moods": ["energetic"]},
        ],
    )
    params = tiny_params(dataset)
    out = root / "out"
    tar = run_training(params, out)
    return {"dataset": dataset, "params": params, "out": out, "tar": tar}


@pytest.fixture
def keep_global_random_state():
    """predict's Generator seeds Python's, numpy's and torch's global generators; later tests in the session (e.g.
    demucs' random shifts in the melody chroma test) must see the state they would have seen without the test."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
