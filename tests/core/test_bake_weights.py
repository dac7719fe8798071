"""scripts/bake_weights.py, offline: downloads from a loopback server, verified (a wrong checksum is retried, then
fails naming the URL), retried with bounded backoff, landing atomically; Hugging Face files baked into the hub
cache layout and verified against the (loopback) hub's metadata; the files and places agree with what the code
loads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.fake_http import Server

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def load_script():
    spec = importlib.util.spec_from_file_location("bake_weights", ROOT / "scripts" / "bake_weights.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bake = load_script()


DATA = b"model bytes " * 5000
SHA = hashlib.sha256(DATA).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_good_file_lands_atomically_and_is_not_fetched_again(tmp_path):
    dest = tmp_path / "out" / "weights.bin"
    seen_before_done = []
    with Server({"/w.bin": [(200, {}, DATA)]}, on_request=lambda _: seen_before_done.append(dest.exists())) as srv:
        asset = bake.Asset(f"{srv.url}/w.bin", dest, sha256=SHA, size=len(DATA))
        assert bake.download(asset, sleep=lambda s: None) == dest
        assert dest.read_bytes() == DATA and seen_before_done == [False] and leftovers(dest.parent) == []
        bake.download(asset, sleep=lambda s: None)  # already there and verified: no request
        assert srv.hits["/w.bin"] == 1


def test_a_wrong_checksum_is_retried_then_fails_clearly(tmp_path):
    dest = tmp_path / "weights.bin"
    waits: list[float] = []
    with Server({"/w.bin": [(200, {}, DATA[:-1] + b"X")]}) as srv:
        asset = bake.Asset(f"{srv.url}/w.bin", dest, sha256=SHA)
        with pytest.raises(bake.BakeError) as err:
            bake.download(asset, attempts=3, backoff=0.5, sleep=waits.append)
        assert srv.hits["/w.bin"] == 3
    message = str(err.value)
    assert f"{srv.url}/w.bin" in message and f"expected {SHA}" in message and "after 3 attempt(s)" in message
    assert waits == [0.5, 1.0]  # bounded, doubling
    assert not dest.exists() and leftovers(tmp_path) == []  # nothing half-written carries a name


def test_transient_errors_are_retried_and_client_errors_are_not(tmp_path):
    waits: list[float] = []
    routes = {"/flaky.bin": [(503, {}, b"busy"), (200, {}, DATA)], "/gone.bin": [(404, {}, b"no")]}
    with Server(routes) as srv:
        dest = bake.download(bake.Asset(f"{srv.url}/flaky.bin", tmp_path / "a.bin", sha256=SHA), sleep=waits.append)
        assert dest.read_bytes() == DATA and srv.hits["/flaky.bin"] == 2 and waits == [bake.BACKOFF]
        with pytest.raises(bake.BakeError, match="gone.bin.*404.*after 1 attempt"):
            bake.download(bake.Asset(f"{srv.url}/gone.bin", tmp_path / "b.bin", sha256=SHA), sleep=waits.append)
        assert srv.hits["/gone.bin"] == 1


def test_strict_refuses_unpinned_files(tmp_path):
    with pytest.raises(bake.BakeError, match="no sha256 is recorded"):
        bake.download(bake.Asset("http://127.0.0.1:9/x.json", tmp_path / "x.json"), strict=True)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()  # noqa: S324 - git's object id


def test_hf_files_baked_into_the_hub_cache_and_verified(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session is offline; the build is not

    config = json.dumps({"model_type": "encodec"}).encode()
    weights = b"\x01\x02" * 40000
    info = {
        "id": "facebook/encodec_32khz",
        "sha": COMMIT,
        "siblings": [
            {"rfilename": "config.json", "size": len(config), "blobId": git_blob_sha1(config)},
            {
                "rfilename": "model.safetensors",
                "size": len(weights),
                "blobId": "0" * 40,
                "lfs": {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights), "pointerSize": 134},
            },  # fmt: skip
            {"rfilename": "README.md", "size": 3, "blobId": "1" * 40},
        ],
    }
    api = [(200, {"Content-Type": "application/json"}, json.dumps(info).encode())]
    routes = {
        "/api/models/facebook/encodec_32khz": api,
        "/api/models/facebook/encodec_32khz/revision/main": api,
        f"/facebook/encodec_32khz/resolve/{COMMIT}/config.json": [(200, {}, config)],
        f"/facebook/encodec_32khz/resolve/{COMMIT}/model.safetensors": [(200, {}, weights)],
    }
    cache = tmp_path / "hub"
    with Server(routes) as srv:
        files = ("config.json", "model.safetensors", "missing.json")  # absent from the repo: skipped
        snapshot = bake.bake_hf(
            "facebook/encodec_32khz", files, required=("config.json",), cache=cache, endpoint=srv.url, sleep=print
        )
    assert snapshot == cache / "models--facebook--encodec_32khz" / "snapshots" / COMMIT
    for name, data in (("config.json", config), ("model.safetensors", weights)):
        found = try_to_load_from_cache("facebook/encodec_32khz", name, cache_dir=cache)
        assert isinstance(found, str) and Path(found).read_bytes() == data  # what an offline loader reads
    assert (cache / "models--facebook--encodec_32khz" / "refs" / "main").read_text() == COMMIT

    routes[f"/facebook/encodec_32khz/resolve/{COMMIT}/model.safetensors"] = [(200, {}, weights[:-1] + b"\x00")]
    with Server(routes) as srv, pytest.raises(bake.BakeError, match="model.safetensors.*sha256.*expected"):
        bake.bake_hf("facebook/encodec_32khz", ("model.safetensors",), cache=tmp_path / "hub2", endpoint=srv.url,
                     attempts=2, sleep=lambda s: None)  # fmt: skip


def test_clap_baked_from_the_hub_is_what_evaluation_loads(tmp_path, monkeypatch):
    """The tiny CLAP's files served as `laion/larger_clap_music` by a loopback hub: the bake takes the configs and
    the one weights file the repo has, and evaluation/clap.py then loads CLAP from that cache, offline."""
    import huggingface_hub.constants as constants

    from core.tiny import tiny_clap
    from evaluation.clap import CLAP_REPO, CLAP_WEIGHTS, clap_skip_reason, load_clap

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session is offline; the build is not
    spec = bake.HF_REPOS["clap"]
    assert spec["repo"] == CLAP_REPO and set(spec["one_of"]) == set(CLAP_WEIGHTS)
    folder = tiny_clap()
    data = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    data["pytorch_model.bin"] = b"older format, not taken: the repo has model.safetensors"
    siblings = []
    for name, content in data.items():
        entry = {"rfilename": name, "size": len(content), "blobId": git_blob_sha1(content)}
        if name.endswith((".safetensors", ".bin")):
            entry["lfs"] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        siblings.append(entry)
    info = {"id": CLAP_REPO, "sha": COMMIT, "siblings": siblings}
    api = [(200, {"Content-Type": "application/json"}, json.dumps(info).encode())]
    routes = {f"/api/models/{CLAP_REPO}": api, f"/api/models/{CLAP_REPO}/revision/main": api}
    routes |= {f"/{CLAP_REPO}/resolve/{COMMIT}/{name}": [(200, {}, content)] for name, content in data.items()}
    cache = tmp_path / "hub"
    with Server(routes) as srv:
        bake.bake_hf(CLAP_REPO, spec["files"], required=spec["required"], one_of=spec["one_of"], cache=cache,
                     endpoint=srv.url, sleep=print)  # fmt: skip
        assert f"/{CLAP_REPO}/resolve/{COMMIT}/pytorch_model.bin" not in srv.hits  # one weights file only
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert clap_skip_reason() is None
    assert load_clap("cpu") is not None

    info["siblings"] = [s for s in siblings if not s["rfilename"].endswith((".safetensors", ".bin"))]
    api[:] = [(200, {"Content-Type": "application/json"}, json.dumps(info).encode())]
    routes[f"/api/models/{CLAP_REPO}"] = routes[f"/api/models/{CLAP_REPO}/revision/main"] = api * 2
    with Server(routes) as srv, pytest.raises(bake.BakeError, match="has none of model.safetensors, pytorch_model"):
        bake.bake_hf(CLAP_REPO, spec["files"], one_of=spec["one_of"], cache=tmp_path / "hub2", endpoint=srv.url)


def test_what_is_baked_is_what_the_code_loads(tmp_path, monkeypatch):
    import torch

    from preprocessing import analysis, vocals

    assert [a.url for a in bake.essentia_assets()] == analysis.head_urls()
    monkeypatch.setenv("MGFT_CACHE", str(tmp_path / "mgft"))
    monkeypatch.delenv("MGFT_ESSENTIA_MODELS", raising=False)
    assert bake.essentia_dir() == analysis.default_models_dir()
    assert bake.HTDEMUCS_URL == vocals.WEIGHTS_URL
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert bake.torch_hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints"
    assert bake.htdemucs_assets()[0].dest == vocals.torch_cache_file()  # where vocal removal looks
    assert bake.HTDEMUCS_SHA256.startswith(bake.HTDEMUCS_URL.rsplit("-", 1)[1].split(".")[0])  # torch.hub's rule
    assert bake.HF_REPOS["t5"]["repo"] == "t5-base"  # the name audiocraft's musicgen configs give T5Conditioner


def test_offline_mode_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    waits: list[float] = []
    with pytest.raises(bake.BakeError, match=r"OfflineModeIsEnabled.*after 1 attempt"):
        bake.bake_hf("t5-base", ("config.json",), cache=tmp_path, endpoint="http://127.0.0.1:9", sleep=waits.append)
    assert waits == []


def test_a_mirror_serves_the_files_not_on_the_hub(monkeypatch):
    """MGFT_BAKE_MIRROR moves the essentia and htdemucs downloads under `<mirror>/<host>/<path>`; the checksums and
    the destinations stay; unset or blank, the publishers' URLs."""
    monkeypatch.delenv(bake.MIRROR_ENV, raising=False)
    plain = bake.essentia_assets() + bake.htdemucs_assets()
    monkeypatch.setenv(bake.MIRROR_ENV, "  ")
    assert bake.essentia_assets() + bake.htdemucs_assets() == plain
    monkeypatch.setenv(bake.MIRROR_ENV, "http://mirror.local:8080/base/")  # a trailing slash is fine
    mirrored = bake.essentia_assets() + bake.htdemucs_assets()
    base = "http://mirror.local:8080/base/"
    assert [a.url for a in mirrored] == [base + a.url.removeprefix("https://") for a in plain]
    assert mirrored[-1].url == base + "dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th"
    assert [(a.dest, a.sha256, a.size) for a in mirrored] == [(a.dest, a.sha256, a.size) for a in plain]
