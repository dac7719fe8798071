"""Fixtures for the training tests: prepared datasets in the preprocessing contract's format, built directly.

The folder is written here from the contract (32 kHz WAV clips, `data.jsonl` with one audiocraft AudioMeta per
line, a MusicInfo sidecar `<clip>.json` beside each clip) and read by the trainer through
`preprocessing.load_prepared`, so a drift between the two sides of the contract fails these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from tests.helpers import tone

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
