"""A disk that fills up while preparing is one line naming the file and the fix, not a traceback (libsndfile's
'System error' is no OSError) nor every member skipped as "cannot be extracted"; nothing is left under a final name.

The full disk is real: `python -m preprocessing` runs with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so
the writers get EFBIG from the kernel exactly where a full disk gives them ENOSPC.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.helpers import ROOT

SR = 32000
LIMIT = 1 << 20  # 1 MiB: a 30 s clip (16-bit WAV, 1.9 MB) does not fit; a FLAC of a tone does


def _sine(seconds: float, freq: float) -> np.ndarray:
    """A pure tone whose period is a whole number of samples: FLAC and deflate both shrink it to almost nothing."""
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def _limited() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _prepare(upload: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preprocessing", str(upload), str(out), "--drop_vocals", "false",
         "--auto_labeling", "false"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
        preexec_fn=_limited,
    )  # fmt: skip


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def test_a_clip_that_does_not_fit_is_one_line_and_no_truncated_clip(tmp_path):
    upload = tmp_path / "song.flac"
    sf.write(str(upload), _sine(40.0, 200.0), SR, format="FLAC")
    assert upload.stat().st_size < LIMIT
    out = tmp_path / "out"
    line = _one_error_line(_prepare(upload, out))
    assert "could not write the clip" in line and "song_000.wav" in line and "Free space" in line, line
    assert not list((out / "dataset" / "clips").glob("*.wav"))  # no truncated clip under its name, no temp file
    assert not list((out / "dataset" / "clips").glob(".mgft-tmp-*"))


def test_extraction_that_does_not_fit_stops_with_one_line_instead_of_skipping_the_track(tmp_path):
    """Before: the member was skipped as "cannot be extracted ([Errno 27] File too large)" like a damaged one, and
    the run ended in "no usable audio" (with more tracks: it trained on those that happened to fit)."""
    samples = (_sine(40.0, 200.0) * 32767).astype(np.int16)
    samples += np.random.default_rng(0).integers(-1, 2, len(samples)).astype(np.int16)  # deflates ~3.5:1
    buffer = io.BytesIO()
    sf.write(buffer, samples, SR, format="WAV", subtype="PCM_16")
    upload = tmp_path / "songs.zip"
    with zipfile.ZipFile(upload, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("songs/track0.wav", buffer.getvalue())  # 2.6 MB
    assert upload.stat().st_size < LIMIT
    line = _one_error_line(_prepare(upload, tmp_path / "out"))
    assert "could not write the unpacked file" in line and "track0.wav" in line, line
    assert "no usable audio" not in line
