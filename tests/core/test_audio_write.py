"""Writing outputs when the disk refuses (issue 24): a real write failure (the file-size limit RLIMIT_FSIZE, set in
a child process, makes the kernel refuse bytes past it as a full disk would) is one line naming the path and the fix,
and nothing truncated is left under the requested name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.audio import load_audio, save_audio
from tests.helpers import ROOT

LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """
)


def run_limited(code: str, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    script = LIMITED.format(limit=limit) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300, env=_env()
    )


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_a_write_past_the_disk_limit_is_one_error_and_leaves_no_file(tmp_path, fmt):
    code = f"""
    import torch
    from core.audio import save_audio
    from core.errors import DiskError
    try:
        save_audio("{tmp_path}/out.{fmt}", 0.1 * torch.randn(2, 32000 * 4), 32000, "{fmt}")
    except DiskError as e:
        print("DiskError:", e)
    """
    result = run_limited(code, 4096, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"DiskError: Could not write {tmp_path}/out.{fmt}: "), result.stdout
    assert "Free disk space" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a truncated output was left behind"


def test_a_successful_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "o.wav"
    target.write_bytes(b"an older file")
    wav = 0.1 * torch.randn(1, 16000)
    assert save_audio(target, wav, 32000) == target
    decoded, sr = load_audio(target)
    assert sr == 32000 and decoded.shape == (1, 16000)
    assert [p.name for p in tmp_path.iterdir()] == ["o.wav"]


@pytest.mark.slow
def test_predict_cli_on_a_full_disk_says_one_line(tmp_path):
    """`python predict.py --output out.wav` when the write fails: exit 2, one error line naming the file, no
    traceback, no out.wav."""
    code = f"""
    import sys
    sys.argv = ["predict.py", "--model_version", "tiny", "--duration", "1", "--output", "{tmp_path}/out.wav"]
    import predict
    sys.exit(predict.main())
    """
    result = run_limited(code, 16384, ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{tmp_path}/out.wav" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.wav").exists() and not list(tmp_path.iterdir())
