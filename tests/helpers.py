"""Shared test helpers: synthesized audio in real formats and the real Cog HTTP server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def tone(seconds: float, sr: int = 32000, channels: int = 1, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """`[T, C]` float32: a few harmonics plus a little noise (a melody-ish signal with real chroma content)."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    notes = freq * np.array([1.0, 1.25, 1.5, 2.0])
    step = np.floor(t * 2).astype(int) % len(notes)  # a new note every 0.5 s
    sig = 0.3 * np.sin(2 * np.pi * notes[step] * t) + 0.1 * np.sin(4 * np.pi * notes[step] * t)
    sig = sig + 0.01 * rng.standard_normal(len(t))
    out = np.stack([sig * (1.0 - 0.2 * c) for c in range(channels)], axis=1)
    return out.astype(np.float32)


def write_wav(path: Path, seconds: float, sr: int = 32000, channels: int = 1, **kw) -> Path:
    sf.write(str(path), tone(seconds, sr, channels, **kw), sr)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cog_project(tmp: Path) -> Path:
    """A folder laid out as `cog build` leaves the image's /src: our entry points and the OpenAPI schema that
    `cog build` writes (`.cog/openapi_schema.json`, tests/cog_schema.py), which coglet enforces on every request."""
    from tests.cog_schema import combined_schema

    project = tmp / "cog-project"
    (project / ".cog").mkdir(parents=True, exist_ok=True)
    (project / ".cog" / "openapi_schema.json").write_text(json.dumps(combined_schema(), indent=2))
    for name in ("predict.py", "train.py", "cog.yaml"):
        if not (project / name).exists():
            (project / name).symlink_to(ROOT / name)
    return project


class CogServer:
    """`python -m cog.server.http` in a subprocess (predict or train mode), on a free loopback port.

    By default it serves with the schema `cog build` would write (as on Replicate); `schema=False` serves the
    bare tree, where coglet validates nothing (only `cog predict` from a source checkout without a build)."""

    def __init__(self, tmp: Path, *, train: bool = False, env: dict[str, str] | None = None, schema: bool = True):
        self.port = free_port()
        self.cwd = cog_project(tmp) if schema else ROOT
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"cog-server-{self.port}.log"
        full_env = dict(os.environ)
        full_env.update(
            {
                "PORT": str(self.port),
                "LOG_FORMAT": "console",
                # The worker is started as a bare `python` from PATH: the venv's interpreter must come first.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}",
                "PYTHONPATH": str(ROOT),
            }
        )
        if train:
            full_env["COG_TRAIN_TYPE_STUB"] = "train.py:train"
        full_env["COG_PREDICT_TYPE_STUB"] = "predict.py:Predictor"
        full_env.update(env or {})
        args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
        if train:
            args += ["--x-mode", "train"]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=self.cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cog server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                health = self.get("/health-check")
                if health.get("status") in ("READY", "SETUP_FAILED"):
                    return health
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"cog server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 600.0) -> tuple[int, dict]:
        """POST JSON; a 409 ("at capacity": the previous request's slot not yet released) is retried for 30 s."""
        data = json.dumps(payload).encode()
        deadline = time.monotonic() + 30
        while True:
            req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    status, body = r.status, json.loads(r.read())
                if "At capacity" not in str(body) or time.monotonic() >= deadline:
                    return status, body
                time.sleep(0.5)
            except urllib.error.HTTPError as e:
                if (e.code == 409 or e.code == 503) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                return e.code, json.loads(e.read() or b"{}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def data_uri(path: Path, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def decode_data_uri(uri: str) -> bytes:
    assert uri.startswith("data:"), uri[:80]
    return base64.b64decode(uri.split(",", 1)[1])


def render_in_chromium(page: Path, out_png: Path, width: int = 1200, height: int = 2600) -> list[str]:
    """Open `page` in headless Chromium (Debian's package, installed by scripts/setup.sh), screenshot it to
    `out_png`, and return the page's console messages (errors included), as a person's browser would show them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed (scripts/setup.sh installs it)"
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--window-size={width},{height}", f"--screenshot={out_png}", Path(page).resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out_png.is_file(), run.stderr[-3000:]
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def moved_beyond_fp16(trained: dict, base: dict, prefix: str = "") -> list[str]:
    """Keys under `prefix` whose weights in `trained` (loaded from a tar, which stores the LM in fp16) differ from
    the fp32 `base` by more than fp16 rounding. An export of the untrained base differs from `base` in many keys by
    rounding alone, so `torch.equal` against it cannot tell a trained export from an untrained one; this can."""
    import torch

    # fp16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of it (2^-24 near 0)
    return [
        key
        for key, value in base.items()
        if key.startswith(prefix)
        and value.is_floating_point()
        and not torch.allclose(trained[key].float(), value.float(), rtol=2**-10, atol=2**-20)
    ]


def reported_problem(error: BaseException, name: str) -> BaseException:
    """The problem naming input `name` among those train's `check_inputs` reports at once (a single `InputError`, or
    each of `InputProblems.errors`): a test of one bad input also meets the others of its params (a missing x.zip)."""
    found = [e for e in getattr(error, "errors", [error]) if getattr(e, "name", None) == name]
    assert found, f"no problem names {name!r}: {error}"
    return found[0]
