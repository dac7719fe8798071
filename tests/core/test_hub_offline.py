"""A hub model that is not in the local cache fails at once, in one message, when the hub cannot be reached; a hub
model that is cached loads without asking the hub at all (issue 19, point 2).

The hub is a loopback port: one that refuses connections, or a listener that accepts and closes each connection
(not a hub) and counts them. huggingface_hub's own behaviour there is a first request and then 5 retries with
back-off (23 s, each warning printed twice): the counts and the absence of retry warnings tell the two apart without
timing anything.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core import hub, tiny, versions
from tests.helpers import ROOT, free_port


class CountingListener:
    """A TCP listener on loopback that accepts each connection and closes it at once, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def __enter__(self) -> CountingListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    """huggingface_hub as a user without HF_HUB_OFFLINE sees it, with an empty cache under tmp_path and the hub at
    the URL the test sets (`set_endpoint`); the torch hub cache empty too (no demucs weights)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def set_endpoint(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return set_endpoint


def _predict_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    return env


@pytest.mark.slow
def test_predict_of_an_uncached_model_asks_an_unreachable_hub_once(tmp_path):
    """`predict.py --model_version small` with nothing cached and a "hub" that closes every connection: one
    connection, no retry warning, exit 2 and one message naming the model, the cache and a command that exists."""
    with CountingListener() as listener:
        run = subprocess.run(
            [sys.executable, "predict.py", "--model_version", "small", "--duration", "1", "--output",
             str(tmp_path / "out.wav")],
            cwd=ROOT, env=_predict_env(tmp_path, listener.url), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        connections = listener.connections
    assert run.returncode == 2, run.stderr[-3000:]
    assert connections == 1, run.stderr[-3000:]
    assert "Retry" not in run.stderr and "huggingface_hub" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    message = errors[0]
    for part in (
        "'small'",
        "facebook/musicgen-small",
        str(tmp_path / "hf" / "hub"),
        listener.url,
        "`hf download facebook/musicgen-small state_dict.bin compression_state_dict.bin`",
        "`hf download t5-base ",
    ):
        assert part in message, (part, message)
    assert "huggingface-cli" not in message and ".." not in message
    assert "melody" not in message.lower() and "demucs" not in message  # small is no melody model
    assert not (tmp_path / "out.wav").exists()
    # the command it names exists where predict.py runs
    assert (Path(sys.executable).parent / "hf").is_file()


def test_check_available_names_each_problem_without_loading(online_hub, tmp_path):
    """`versions.check_available`, what the all-at-once checks call before any long work: a refused hub port gives
    one problem per unavailable model version, with the melody models' demucs note only for them."""
    online_hub(f"http://127.0.0.1:{free_port()}")  # nothing listens there: connection refused
    (small,) = versions.check_available("small")
    assert "facebook/musicgen-small" in small and "could not be reached" in small and "demucs" not in small
    (melody,) = versions.check_available("stereo-melody-large")
    assert "facebook/musicgen-stereo-melody-large" in melody
    assert hub.HTDEMUCS_URL in melody and str(tmp_path / "torch") in melody
    (style,) = versions.check_available("style")
    assert "m-a-p/MERT-v1-95M" in style and "`hf download m-a-p/MERT-v1-95M`" in style
    (unknown,) = versions.check_available("not-a-model")
    assert "Unknown model_version 'not-a-model'" in unknown
    assert versions.check_available("tiny") == [] and versions.check_available("tiny-melody") == []


def test_check_available_asks_the_hub_once_and_accepts_one_that_answers(online_hub):
    """A server that answers HTTP (here 404 for everything) is a hub that answers: no problem reported (the load
    downloads, with huggingface_hub's retries); one request was made to find that out."""
    import http.server

    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        online_hub(f"http://127.0.0.1:{server.server_address[1]}")
        assert versions.check_available("small") == []
    finally:
        server.shutdown()
        server.server_close()
    assert requests == ["/facebook/musicgen-small/resolve/main/state_dict.bin"]


def test_a_cached_hub_model_loads_without_any_request(online_hub, tmp_path):
    """Every file of `facebook/musicgen-small` and `t5-base` in the local cache (here: the tiny-t5 model laid out as
    them): it loads from the cache alone, with no connection to the hub at all (which would otherwise be asked
    about each file, and retried for the optional files the cache does not hold)."""
    from huggingface_hub import constants

    source = tiny.ensure_tiny("tiny-t5")
    snapshot = Path(constants.HF_HUB_CACHE) / "models--facebook--musicgen-small" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in versions.CHECKPOINT_FILES:
        shutil.copy(source / name, snapshot / name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    shutil.copytree(source / tiny.T5_HUB_DIR / "models--t5-base", Path(constants.HF_HUB_CACHE) / "models--t5-base")
    with CountingListener() as listener:
        online_hub(listener.url)
        model = versions.load_musicgen("small", device="cpu")
        assert listener.connections == 0
        assert versions.check_available("small") == []
        assert listener.connections == 0
    assert model.name == "small" and "description" in model.lm.condition_provider.conditioners
