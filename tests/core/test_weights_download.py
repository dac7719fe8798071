"""Weights given by URL: downloaded once over HTTP (a loopback server here), then served from the cache."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from core import weights
from core.versions import load_musicgen
from generation.generate import Generator, ModelKey


@pytest.fixture
def tar(tmp_path):
    model = load_musicgen("tiny", device="cpu").musicgen
    return weights.write_trained_model(
        tmp_path / "site" / "trained_model.tar",
        state_dict=model.lm.state_dict(),
        cfg=model.lm.cfg,
        base_model="tiny",
        finetune={"method": "full"},
    )


def serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_url_is_downloaded_once_and_cached(tar, tmp_path, monkeypatch):
    monkeypatch.setenv("MGFT_CACHE", str(tmp_path / "cache"))
    server = serve(tar.parent)
    url = f"http://127.0.0.1:{server.server_address[1]}/trained_model.tar"
    try:
        first = weights.unpack(url)
        assert (first / "state_dict.bin").is_file()
    finally:
        server.shutdown()
        server.server_close()
    assert weights.unpack(url) == first  # the server is gone: only the cache can answer
    assert weights.load_trained_model(url, device="cpu").lm.n_q == 4
    # one copy on disk: the unpacked folder; the downloaded tar is gone
    assert not [p for p in (tmp_path / "cache" / "downloads").iterdir()]


def test_bad_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MGFT_CACHE", str(tmp_path / "cache"))
    server = serve(tmp_path)
    url = f"http://127.0.0.1:{server.server_address[1]}/missing.tar"
    try:
        with pytest.raises(weights.WeightsError, match="Could not download weights"):
            weights.fetch(url)
    finally:
        server.shutdown()
        server.server_close()


def test_models_are_swapped_only_when_the_weights_change(tar):
    generator = Generator(device="cpu", setup_weights=str(tar))
    fine_tuned = generator.model_for(ModelKey("weights", str(tar))).musicgen
    assert generator.model_for(ModelKey("weights", str(tar))).musicgen is fine_tuned
    base = generator.model_for(ModelKey("version", "tiny")).musicgen
    assert base is not fine_tuned
    assert generator.model_for(ModelKey("version", "tiny")).musicgen is base
