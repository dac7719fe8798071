"""Where `replicate_weights` / COG_WEIGHTS come from: local paths, https URLs, data: URIs, Hugging Face repo ids (a
local hub cache offline, and a loopback server standing in for the hub); one copy on disk per weights; the
least-recently-used eviction of the cache; errors naming what the user gave."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import os
import shutil
import tarfile
import threading
import urllib.parse
from pathlib import Path

import pytest

from core import weights
from core.versions import load_musicgen
from generation.generate import Generator, ModelKey

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private weights cache (MGFT_CACHE): what these tests leave there cannot confuse other tests."""
    root = tmp_path / "mgft-cache"
    monkeypatch.setenv("MGFT_CACHE", str(root))
    # tiny models are built once per machine: reuse the shared copy instead of rebuilding it in the private cache
    shared = Path.home() / ".cache" / "musicgen-ft" / "models"
    if shared.is_dir():
        (root).mkdir(parents=True, exist_ok=True)
        (root / "models").symlink_to(shared)
    return root


def make_tar(path: Path, seed: int = 0) -> Path:
    """A full trained_model.tar of the tiny model (weights moved by `seed`, so each seed is distinct content)."""
    import torch

    model = load_musicgen("tiny", device="cpu").musicgen
    state = model.lm.state_dict()
    if seed:
        gen = torch.Generator().manual_seed(seed)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in state.items()}  # fmt: skip
    return weights.write_trained_model(
        path, state_dict=state, cfg=model.lm.cfg, base_model="tiny", finetune={"method": "full", "seed": seed}
    )


class Server:
    """A loopback HTTP server answering from a dict of path -> (status, headers, body); records each request."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]):
        self.routes = routes
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                path = urllib.parse.urlparse(self.path).path
                outer.requests.append((self.command, path))
                status, headers, body = outer.routes.get(path, (404, {}, b"not found"))
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._answer(True)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------ kinds of reference


def test_classify_tells_repo_ids_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert weights.classify("alice/lofi-ft").kind == "hf"
    source = weights.classify("alice/lofi-ft@v2")
    assert (source.kind, source.location, source.revision) == ("hf", "alice/lofi-ft", "v2")
    assert weights.classify("https://x/y.tar").kind == "url"
    assert weights.classify("data:application/x-tar;base64,AAAA").kind == "data"
    assert weights.classify("out/trained_model.tar").kind == "path"  # a missing local tar is still a path
    (tmp_path / "alice" / "lofi-ft").mkdir(parents=True)
    assert weights.classify("alice/lofi-ft").kind == "path"  # an existing path wins over a repo id
    with pytest.raises(weights.WeightsError, match="s3:// scheme is not supported"):
        weights.classify("s3://bucket/trained_model.tar")


def test_data_uri(cache, tmp_path):
    tar = make_tar(tmp_path / "trained_model.tar")
    uri = "data:application/x-tar;base64," + base64.b64encode(tar.read_bytes()).decode()
    folder = weights.unpack(uri)
    assert (folder / "state_dict.bin").is_file() and folder.parent == cache / "weights"
    assert weights.load_trained_model(uri, device="cpu").lm.n_q == 4
    assert not list((cache / "downloads").iterdir())  # the decoded tar is not kept: the folder is the one copy
    with pytest.raises(weights.WeightsError, match="needs a comma"):
        weights.unpack("data:application/x-tar;base64")
    with pytest.raises(weights.WeightsError, match=r"data:text/plain,hello is not a trained_model.tar"):
        weights.unpack("data:text/plain,hello")


def test_url_keeps_one_copy_and_errors_name_the_url(cache, tmp_path):
    tar = make_tar(tmp_path / "trained_model.tar")
    server = Server(
        {"/w/trained_model.tar": (200, {}, tar.read_bytes()), "/x/y.tar": (200, {}, b"PK\x03\x04 not a tar" * 300)}
    )
    try:
        folder = weights.unpack(f"{server.url}/w/trained_model.tar")
        assert sorted(p.name for p in folder.iterdir()) == ["compression_state_dict.bin", "finetune.json",
                                                             "state_dict.bin"]  # fmt: skip
        cached = sorted(p.name for p in (cache / "weights").iterdir() if not p.name.startswith("."))
        assert cached == [folder.name] and not list((cache / "downloads").iterdir())
        bad = f"{server.url}/x/y.tar"
        with pytest.raises(weights.WeightsError) as err:
            weights.unpack(bad)
        assert f"{bad} is not a trained_model.tar" in str(err.value)
        assert "url-" not in str(err.value) and ".part" not in str(err.value)  # never a cache file's name
        with pytest.raises(weights.WeightsError, match=f"Could not download weights from {server.url}/none.tar"):
            weights.unpack(f"{server.url}/none.tar")
    finally:
        server.close()
    assert not list((cache / "downloads").iterdir())
    # a user's local tar is extracted, never deleted
    assert weights.unpack(tar).is_dir() and tar.is_file()


# ------------------------------------------------------------------------------------------ Hugging Face repos


def hub_cache_repo(hub: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """A model repo in huggingface_hub's cache layout (refs/<revision> -> commit, snapshots/<commit>/<files>,
    blobs named by sha256 with relative links), as `hf download` leaves it."""
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache (huggingface_hub reads its cache path at import: patch the constant)."""
    import huggingface_hub.constants as constants

    path = tmp_path / "hf-hub"
    path.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return path


def test_hf_repo_with_tar_from_local_cache_offline(cache, hub, tmp_path):
    tar = make_tar(tmp_path / "trained_model.tar")
    hub_cache_repo(hub, "alice/lofi-ft", {"trained_model.tar": tar.read_bytes(), "README.md": b"# lofi"})
    model = weights.load_trained_model("alice/lofi-ft", device="cpu")
    assert model.lm.n_q == 4 and model.weights_folder.parent == cache / "weights"
    assert weights.unpack("alice/lofi-ft") == model.weights_folder  # then from our cache
    with pytest.raises(weights.WeightsError, match="alice/missing: not a local path.*could not be reached.*not cached"):
        weights.unpack("alice/missing")


def test_hf_repo_with_extracted_members_offline(cache, hub, tmp_path):
    tar = make_tar(tmp_path / "trained_model.tar")
    with tarfile.open(tar) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    snapshot = hub_cache_repo(hub, "alice/lofi-extracted", files, revision="v1")
    folder = weights.unpack("alice/lofi-extracted@v1")
    assert folder == snapshot  # the hub cache is the one copy
    assert not [p for p in (cache / "weights").iterdir() if not p.name.startswith(".")]
    assert weights.load_trained_model("alice/lofi-extracted@v1", device="cpu").lm.n_q == 4


def test_hf_repo_from_a_loopback_hub(cache, hub, tmp_path, monkeypatch):
    """Online: the repo's commit is asked for, its tar downloaded into a temp folder, unpacked, the tar deleted;
    the next load asks only for the commit."""
    import huggingface_hub.constants as constants

    tar_bytes = make_tar(tmp_path / "trained_model.tar").read_bytes()
    sha = hashlib.sha256(tar_bytes).hexdigest()
    siblings = [{"rfilename": "trained_model.tar", "size": len(tar_bytes)}, {"rfilename": "README.md"}]
    info = {"id": "alice/lofi-ft", "modelId": "alice/lofi-ft", "sha": COMMIT, "private": False, "siblings": siblings}
    file_headers = {"ETag": f'"{sha}"', "X-Repo-Commit": COMMIT, "Content-Type": "application/x-tar"}
    server = Server(
        {
            "/api/models/alice/lofi-ft": (200, {"Content-Type": "application/json"}, json.dumps(info).encode()),
            "/api/models/alice/lofi-ft/revision/main": (
                200,
                {"Content-Type": "application/json"},
                json.dumps(info).encode(),
            ),  # fmt: skip
            f"/alice/lofi-ft/resolve/{COMMIT}/trained_model.tar": (200, file_headers, tar_bytes),
        }
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    try:
        folder = weights.unpack("alice/lofi-ft")
        assert (folder / "state_dict.bin").is_file()
        downloads = [r for r in server.requests if r[0] == "GET" and r[1].endswith(".tar")]
        assert len(downloads) == 1
        assert not list((cache / "downloads").iterdir())  # the tar is gone: one copy
        assert not any(hub.iterdir())  # and nothing went into the hub cache
        assert weights.unpack("alice/lofi-ft") == folder
        assert len([r for r in server.requests if r[0] == "GET" and r[1].endswith(".tar")]) == 1
    finally:
        server.close()
    with pytest.raises(weights.WeightsError, match="alice/nobody"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        weights.unpack("alice/nobody")


# ------------------------------------------------------------------------------------------ eviction


def _cached(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "weights").iterdir() if p.is_dir() and not p.name.startswith("."))


def fake_disk(cache: Path, capacity: int):
    """Free bytes of a disk of `capacity` bytes holding only the weights cache: deterministic, whatever the real
    disk has free."""

    def free(_path: Path) -> int:
        used = sum(f.stat().st_size for f in (cache / "weights").rglob("*") if f.is_file())
        return capacity - used

    return free


def test_lru_eviction_keeps_free_space_and_the_loaded_weights(cache, tmp_path, caplog):
    tars = [make_tar(tmp_path / f"t{i}" / "trained_model.tar", seed=i) for i in range(3)]
    size = sum(f.stat().st_size for f in weights.unpack(tars[0]).iterdir())
    shutil.rmtree(cache / "weights")
    # room for two unpacked weights above the threshold, not three
    free = fake_disk(cache, capacity=int(2.5 * size) + 1000)
    generator = Generator(device="cpu", min_free_bytes=1000, free_bytes=free)
    first = generator.model_for(ModelKey("weights", str(tars[0])))
    second = weights.unpack(tars[1], min_free_bytes=1000, free_bytes=free)
    assert len(_cached(cache)) == 2
    os.utime(weights.cache._meta(second), (1, 1))  # `second` used long ago; `first` (loaded) is the oldest otherwise
    os.utime(weights.cache._meta(first.weights_folder), (0, 0))
    with caplog.at_level(logging.INFO, logger="core.weights"):
        third = weights.unpack(tars[2], keep=[generator.loaded_weights], min_free_bytes=1000, free_bytes=free)
    assert _cached(cache) == sorted([first.weights_folder.name, third.name])  # `second` evicted, not the loaded
    assert "Evicted cached weights" in caplog.text
    # the Generator protects what it has loaded by itself
    os.utime(weights.cache._meta(third), (2, 2))
    generator.model_for(ModelKey("weights", str(tars[1])))
    assert first.weights_folder.is_dir() and generator.loaded_weights.is_dir()
    assert not third.exists()


def test_min_free_env(monkeypatch):
    from predict import min_free_setting  # the entry point reads the environment

    assert min_free_setting() == 10 * 2**30
    monkeypatch.setenv("MGFT_WEIGHTS_MIN_FREE_GB", "2.5")
    assert min_free_setting() == int(2.5 * 2**30)
    monkeypatch.setenv("MGFT_WEIGHTS_MIN_FREE_GB", "lots")
    with pytest.raises(ValueError, match="MGFT_WEIGHTS_MIN_FREE_GB"):
        min_free_setting()


def test_hf_repo_with_only_the_adapter_files_offline(cache, hub, tmp_path, caplog):
    """A repo holding just adapter.safetensors + adapter_config.json (as LoRA repos usually do): its base comes from
    adapter_config.json; with no finetune.json there is nothing to verify (logged)."""
    from tests.core.lora_tars import lora_tar

    tar = lora_tar(tmp_path / "lora.tar", seed=4)
    with tarfile.open(tar) as archive:
        files = {n: archive.extractfile(n).read() for n in ("adapter.safetensors", "adapter_config.json")}
    hub_cache_repo(hub, "alice/lofi-lora", files)
    with caplog.at_level(logging.INFO, logger="core.weights"):
        model = weights.load_trained_model("alice/lofi-lora", device="cpu")
    assert model.is_lora and model.name == "adapter fine-tune of tiny"
    assert "alice/lofi-lora records no checksums" in caplog.text


def test_a_download_kept_by_an_earlier_version_is_unpacked_and_deleted(cache, tmp_path):
    """Earlier versions kept downloads/<sha256(url)[:24]>.tar forever beside the unpacked folder."""
    url = "https://weights.example/run-7/trained_model.tar"  # never requested: the legacy file answers
    legacy = cache / "downloads" / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".tar")
    legacy.parent.mkdir(parents=True)
    shutil.copy(make_tar(tmp_path / "trained_model.tar"), legacy)
    folder = weights.unpack(url)
    assert (folder / "state_dict.bin").is_file() and not legacy.exists()
    assert weights.unpack(url) == folder
