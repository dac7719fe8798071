"""Boot (issue 11, point 4): a trained version sets up with no network but its COG_WEIGHTS; a setup without a
fine-tune spends no time on an unreachable hub. Both in subprocesses: huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE at import, and the network is cut with a sitecustomize that only the child loads."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.core.lora_tars import lora_tar

ROOT = Path(__file__).resolve().parents[2]

# Loaded by the child through PYTHONPATH: every connection to anything but loopback fails at once, and so does a
# name lookup of anything but localhost, as in a container with no network.
NO_NETWORK = """
import socket

_connect = socket.socket.connect
_getaddrinfo = socket.getaddrinfo
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _host(address):
    return address[0] if isinstance(address, tuple) else address


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in LOOPBACK:
        raise OSError(101, f"network is unreachable (test sitecustomize): {address}")
    return _connect(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in LOOPBACK and host is not None:
        raise socket.gaierror(-3, f"name lookup refused (test sitecustomize): {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
"""


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(
        {
            "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}",
            "HF_HOME": str(tmp_path / "hf-home"),  # an empty hub cache: nothing of the real models is there
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    env.update(extra)
    return env


def write_sitecustomize(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK)


@pytest.mark.parametrize("given_as", ["url", "data"])
def test_trained_version_sets_up_and_predicts_with_no_network(tmp_path, given_as):
    """COG_WEIGHTS (a LoRA on tiny-t5: T5 and the base come from local caches) served on loopback as Replicate
    hands a trained version its weights, or inline as a data: URI; every other connection refused,
    HF_HUB_OFFLINE=1."""
    import base64

    tar = lora_tar(tmp_path / "www" / "trained_model.tar", base="tiny-t5", seed=2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tar.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/trained_model.tar"
    if given_as == "data":  # read by the child from a file: a data: URI this long exceeds an argv/env string
        url = "data:application/x-tar;base64," + base64.b64encode(tar.read_bytes()).decode()
    (tmp_path / "weights.txt").write_text(url)
    write_sitecustomize(tmp_path)
    script = textwrap.dedent(
        f"""
        import socket, urllib.request
        try:
            urllib.request.urlopen("https://huggingface.co", timeout=5)
            raise SystemExit("the network is reachable: the test would prove nothing")
        except OSError as e:
            print("network refused:", e)
        from predict import Predictor
        from core.params import from_kwargs
        from generation.params import PredictParams
        predictor = Predictor()
        predictor.setup(weights=open({str(tmp_path / "weights.txt")!r}).read())
        params = from_kwargs(PredictParams, prompt="calm piano", duration=1, top_k=50, seed=3)
        result = predictor.generator.generate(params, progress=False)
        print("GENERATED", tuple(result.wavs.shape), predictor.generator._model.name)
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=child_env(tmp_path, HF_HUB_OFFLINE="1", MGFT_CACHE=str(tmp_path / "mgft")),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.shutdown()
        server.server_close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "network refused" in out and "GENERATED (1, 1, 32000) lora fine-tune of tiny-t5" in out, out[-3000:]


@pytest.fixture
def blackhole():
    """A loopback port that accepts connections and never answers (a hub behind a dead proxy)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)  # kept open, never written to
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for conn in held:
        conn.close()
    listener.close()


def test_preload_without_fine_tune_skips_an_unreachable_hub(tmp_path, blackhole):
    """The default MGFT_PRELOAD (stereo-melody-large) is not in the (empty) cache: setup logs one line and returns
    at once instead of waiting on the hub (measured: 0.14 s; before, no return within 150 s)."""
    write_sitecustomize(tmp_path)
    script = textwrap.dedent(
        """
        import logging, time
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        from generation.generate import Generator
        generator = Generator(device="cpu")
        start = time.monotonic()
        generator.preload()
        print(f"PRELOAD_SECONDS {time.monotonic() - start:.3f}")
        assert generator._model is None
        """
    )
    env = child_env(tmp_path, HF_ENDPOINT=blackhole, MGFT_CACHE=str(tmp_path / "mgft"))
    env.pop("MGFT_PRELOAD", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    seconds = float(out.split("PRELOAD_SECONDS ")[1].split()[0])
    assert seconds < 3.0, out[-3000:]
    assert out.count("Not preloading stereo-melody-large") == 1, out[-3000:]
    assert "facebook/musicgen-stereo-melody-large is not in the local Hugging Face cache" in out
    assert time.monotonic() - started < 90


def test_preload_of_a_cached_model_asks_no_hub(tmp_path, blackhole):
    """A base already in the Hugging Face cache is preloaded from the cache alone: with the hub a blackhole, asking
    whether the files changed would wait on it (huggingface_hub's etag check) before falling back to the cache."""
    import hashlib

    from core import tiny

    write_sitecustomize(tmp_path)
    root = tmp_path / "hf-home" / "hub" / "models--facebook--musicgen-small"
    commit = "a" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "blobs").mkdir()
    for name in ("state_dict.bin", "compression_state_dict.bin"):  # the tiny model standing in for musicgen-small
        data = (tiny.ensure_tiny("tiny") / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (root / "snapshots" / commit / name).symlink_to(os.path.relpath(blob, root / "snapshots" / commit))
    # Every facebook/musicgen-* model also reads t5-base, so a cached base counts only with its text encoder's config
    # cached beside it (core.versions.check_available); the tiny stand-in itself never opens it.
    t5 = tmp_path / "hf-home" / "hub" / "models--t5-base"
    (t5 / "refs").mkdir(parents=True)
    (t5 / "refs" / "main").write_text(commit)
    (t5 / "snapshots" / commit).mkdir(parents=True)
    (t5 / "snapshots" / commit / "config.json").write_text("{}")
    script = textwrap.dedent(
        """
        import logging, time
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        import audiocraft.models  # imported before the clock starts: its import time is not about the hub
        from generation.generate import Generator
        generator = Generator(device="cpu")
        start = time.monotonic()
        generator.preload("small")
        print(f"PRELOAD_SECONDS {time.monotonic() - start:.3f}")
        print("LOADED", generator._model.name, generator._model.lm.n_q)
        """
    )
    env = child_env(tmp_path, HF_ENDPOINT=blackhole, MGFT_CACHE=str(tmp_path / "mgft"))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "LOADED small 4" in out, out[-3000:]
    assert float(out.split("PRELOAD_SECONDS ")[1].split()[0]) < 3.0, out[-3000:]  # measured 0.2 s (was 23 s)
