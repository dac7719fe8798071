"""Training on Replicate (training/publish.py): wandb with a key given as an input, the push of the result to a
Hugging Face model repo, the push of an interrupted run's resume checkpoint, and secrets that never reach a file
or a log line.

The Hub is a loopback fake of the endpoints huggingface_hub 2.x calls for `create_repo` + `create_commit` (repo
creation, README metadata validation, preupload, the git-LFS batch API and its upload URL, the commit), reached
through HF_ENDPOINT; real huggingface_hub code runs against it. Xet uploads are switched off for it
(HF_HUB_DISABLE_XET: its CAS protocol is not faked), so the files go through the LFS path. wandb runs with
WANDB_MODE=offline; its local run file is read back record by record.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import typing as tp
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.params import InputError, from_kwargs
from tests.helpers import ROOT, reported_problem
from tests.training.conftest import make_prepared, tiny_params
from training import publish
from training import run as run_mod
from training import worker as worker_mod
from training.loop import TrainingInterrupted
from training.params import TrainParams
from training.run import check_inputs, run_training

WANDB_KEY = "wbk-" + "7f3a9c" * 6 + "-SECRET-W"
HF_TOKEN = "hf_" + "Qx9Lm2" * 5 + "SECRETH"
SECRETS = (WANDB_KEY, HF_TOKEN)
REPO = "alice/my-musicgen"
TAR = "trained_model.tar"


# ---------------------------------------------------------------------------------------------------- fake Hub


class FakeHub:
    """The Hub endpoints huggingface_hub calls to create a repo and commit files (LFS for binaries), on loopback.

    Every request must carry `Authorization: Bearer <token>`. `refuse=True` answers 403 to everything, echoing the
    token in the error text the way a careless server could (our log line must still not show it).
    """

    def __init__(self, token: str, refuse: bool = False) -> None:
        self.token = token
        self.refuse = refuse
        self.repos: dict[str, dict] = {}  # repo id -> create payload
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.blobs: dict[str, bytes] = {}  # LFS oid -> content
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.signature = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: tp.Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    for _ in range(1_000_000):  # bounded: a chunked body ends with a 0-size chunk
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    raise ValueError("chunked body too long")
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: tp.Any = None, raw: bytes | None = None) -> None:
                data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                hub.requests.append((method, path))
                auth = self.headers.get("Authorization", "")
                parts = path.strip("/").split("/")
                if method == "PUT" and parts[0] == "lfs-upload":  # a presigned storage URL: no token, a signature
                    if query != f"sig={hub.signature}" or hashlib.sha256(body).hexdigest() != parts[1]:
                        return self._send(403, {"error": "bad signature or sha256 mismatch"})
                    hub.blobs[parts[1]] = body
                    return self._send(200)
                if hub.refuse:
                    return self._send(403, {"error": f"token {auth.removeprefix('Bearer ')} may not write here"})
                if auth != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if method == "POST" and path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo"})
                    hub.repos[repo_id] = payload
                    hub.files[repo_id] = {}
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if method == "POST" and path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if method == "POST" and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [
                        {
                            "path": f["path"],
                            "uploadMode": "regular" if f["path"].endswith(".md") else "lfs",
                            "shouldIgnore": False,
                            "oid": None,
                        }
                        for f in files
                    ]
                    return self._send(200, {"files": modes, "commitOid": "0" * 40})
                if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                    objects = [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}?sig={hub.signature}"}},
                        }
                        for o in json.loads(body)["objects"]
                    ]
                    return self._send(200, {"transfer": "basic", "objects": objects})
                if method == "POST" and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    for line in lines:
                        value = line["value"]
                        if line["key"] == "file":
                            hub.files[repo_id][value["path"]] = base64.b64decode(value["content"])
                        elif line["key"] == "lfsFile":
                            if value["oid"] not in hub.blobs:
                                return self._send(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                            hub.files[repo_id][value["path"]] = hub.blobs[value["oid"]]
                    hub.commits.append({"repo": repo_id, "summary": lines[0]["value"]["summary"]})
                    return self._send(
                        200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'a' * 40}", "commitOid": "a" * 40}
                    )
                if method == "GET" and len(parts) >= 5 and parts[2:4] == ["resolve", "main"]:
                    content = hub.files.get(f"{parts[0]}/{parts[1]}", {}).get("/".join(parts[4:]))
                    return self._send(200, raw=content) if content is not None else self._send(404)
                return self._send(404, {"error": f"no such endpoint {method} {path}"})

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PUT(self) -> None:
                self._route("PUT")

        return Handler


@pytest.fixture
def hub_env(monkeypatch):
    """Point huggingface_hub at a fake Hub; no xet (its protocol is not faked), no saved token, no wandb key."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def point_at(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)

    return point_at


@pytest.fixture
def fresh_wandb():
    """wandb reads its environment (WANDB_MODE, WANDB_BASE_URL, ...) once per process, into a singleton: reset it
    around each test so that each one's environment applies."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- helpers


def _dataset(tmp_path: Path) -> Path:
    return make_prepared(
        tmp_path / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "calm piano", "genre": "jazz", "moods": ["calm"]},
            {"seconds": 2.0, "freq": 330.0, "description": "fast drums", "genre": "rock", "moods": ["energetic"]},
        ],
    )


def _short_params(dataset: Path, **overrides: tp.Any) -> TrainParams:
    values = {"epochs": 1, "updates_per_epoch": 6, "save_every": 3, "trigger": "zzq", **overrides}
    return tiny_params(dataset, **values)


def _assert_no_secret_in_tree(folder: Path) -> int:
    """Every file under `folder` (tar, checkpoints, wandb run files, params files, caches): no secret bytes."""
    scanned = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in data, f"{secret[:6]}... found in {path}"
            scanned += 1
    return scanned


def _assert_no_secret_in_logs(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def _log_text(caplog) -> str:
    return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records)


def _wandb_records(run_file: Path) -> list[tp.Any]:
    """The records of a wandb `.wandb` run file (wandb's LevelDB-style log: 7-byte file header, then 32 KiB blocks
    of chunks `crc32 <I, length <H, type <B` where type 1 = full record, 2/3/4 = first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _wandb_history_and_config(output_dir: Path) -> tuple[list[dict], dict]:
    run_files = list((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    history, config = [], {}
    for record in _wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return history, config


def _wandb_summary(output_dir: Path) -> dict:
    """The run's summary as written to its offline run file (the last value of each key)."""
    (run_file,) = (output_dir / "wandb").glob("offline-run-*/run-*.wandb")
    summary = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    return summary


# ---------------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "inputs,name,words",
    [
        ({"hf_repo_id": REPO}, "hf_token", "hf_repo_id"),
        ({"hf_token": HF_TOKEN}, "hf_repo_id", "user/name"),
        ({"hf_repo_id": "my-musicgen", "hf_token": HF_TOKEN}, "hf_repo_id", "user/name"),
        ({"hf_repo_id": "alice/sub/model", "hf_token": HF_TOKEN}, "hf_repo_id", "not a Hugging Face repo id"),
        ({"hf_repo_id": "alice/my model", "hf_token": HF_TOKEN}, "hf_repo_id", "not a Hugging Face repo id"),
        ({"hf_repo_id": "alice/a--b", "hf_token": HF_TOKEN}, "hf_repo_id", "'--'"),
        ({"use_wandb": True}, "use_wandb", "wandb_api_key"),
    ],
)
def test_incomplete_or_malformed_publish_inputs_are_refused_before_any_work(monkeypatch, inputs, name, words):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    params = from_kwargs(TrainParams, dataset_path="x.zip", **inputs)
    with pytest.raises(InputError) as err:
        check_inputs(params)
    assert words in str(reported_problem(err.value, name))
    assert HF_TOKEN not in str(err.value)


def test_complete_publish_inputs_are_accepted(monkeypatch, two_clips):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # a dataset and a model that exist: check_inputs reports every problem, and these inputs must add none
    check_inputs(tiny_params(two_clips, hf_repo_id="alice-team/musicgen.v2_lofi", hf_token=HF_TOKEN))
    check_inputs(tiny_params(two_clips, wandb_api_key=WANDB_KEY))  # turns wandb on


# ---------------------------------------------------------------------------------------------------- model card


def test_model_card_holds_inputs_labels_plot_samples_base_and_license_but_no_secret():
    finetune = {
        "model_version": "stereo-melody",
        "method": "lora",
        "trigger": "zzq",
        # finetune.json never holds secrets; the card drops them even if a caller passes them
        "training_inputs": {"epochs": 3, "lr": 1.0, "method": "lora", "hf_token": HF_TOKEN, "wandb_api_key": WANDB_KEY},
        "labels": {"genre": ["jazz", "rock"], "moods": ["calm"]},
        "descriptions": ["zzq, calm piano", "zzq, fast drums"],
        "training": {"steps": 300, "clips": 12, "first_loss": 6.1234567, "final_loss": 3.25, "precision": "bf16"},
        "samples": [{"file": "samples/sample_0.wav", "description": "zzq, calm piano"}],
        "validation": {"base_loss": 6.5, "best_loss": 4.25, "final_loss": 4.5, "flags": ["validation up"]},
    }
    files = ["loss.png", "report.html", "samples/sample_0.wav", "samples/sample_1.wav"]
    card = publish.model_card(finetune, REPO, files)
    for secret in SECRETS:
        assert secret not in card
    assert "hf_token" not in card and "wandb_api_key" not in card
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "license: cc-by-nc-4.0" in front and 'base_model: "facebook/musicgen-stereo-melody"' in front
    assert "pipeline_tag: text-to-audio" in front and '"lora"' in front
    assert body.startswith("\n# my-musicgen\n")
    assert "[facebook/musicgen-stereo-melody](https://huggingface.co/facebook/musicgen-stereo-melody)" in body
    assert "LoRA" in body and "Trigger word: `zzq`" in body
    assert "![training loss](loss.png)" in body
    assert "## Validation\n\nOn held-out tracks: validation loss 6.5000 (base) -> 4.2500 (fine-tuned" in body
    assert "; flags: validation up." in body and "[report.html](report.html)" in body
    assert "- [samples/sample_0.wav](samples/sample_0.wav): zzq, calm piano" in body
    assert '<audio controls src="samples/sample_1.wav"></audio>' in body
    assert "- genre: jazz, rock" in body and "- moods: calm" in body
    assert "- zzq, fast drums" in body
    assert "- optimizer steps: 300" in body and "- first loss: 6.1235" in body and "- precision: bf16" in body
    inputs = json.loads(body.split("## Training inputs\n\n```json\n")[1].split("```")[0])
    assert inputs == {"epochs": 3, "lr": 1.0, "method": "lora"}
    assert f"https://huggingface.co/{REPO}/resolve/main/trained_model.tar" in body
    assert "CC-BY-NC 4.0" in body and "non-commercial" in body


def test_model_card_of_a_model_without_meta_weights_sets_no_meta_license():
    card = publish.model_card({"model_version": "tiny", "method": "full", "training_inputs": {}}, REPO)
    assert "license: other" in card and "base_model" not in card and "loss.png" not in card
    micro = publish.model_card({"model_version": "micro", "method": "full"}, REPO)
    assert "license: cc-by-nc-4.0" in micro and "from scratch" in micro


# ---------------------------------------------------------------------------------------------------- runs


def test_training_logs_to_wandb_and_pushes_to_the_hub_without_leaking_a_secret(
    tmp_path, hub_env, fresh_wandb, monkeypatch, caplog, capfd
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    caplog.set_level(logging.INFO)
    with FakeHub(HF_TOKEN) as hub:
        hub_env(hub.url)
        params = _short_params(_dataset(tmp_path), wandb_api_key=WANDB_KEY, hf_repo_id=REPO, hf_token=HF_TOKEN)
        assert params.use_wandb is False  # the key alone turns wandb on
        out = tmp_path / "out"
        tar = run_training(params, out)
    logs = _log_text(caplog)
    captured = capfd.readouterr()

    # wandb: on because of the key, every step's metrics in its run file, config = inputs without secrets
    assert "use_wandb turned on: wandb_api_key was given" in logs
    history, config = _wandb_history_and_config(out)
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(h["loss"], float) and h["loss"] > 0 for h in steps)
    assert any(k.startswith("samples/") for h in history for k in h)  # the two samples, logged as audio
    assert config["epochs"] == 1 and config["trigger"] == "zzq" and config["hf_repo_id"] == REPO
    assert not set(publish.SECRET_FIELDS) & set(config)

    # the Hub: a private repo, one commit with the tar (byte for byte), the card and the files it links
    assert hub.repos[REPO]["visibility"] == "private"
    files = hub.files[REPO]
    report = ["loss.png", "metrics.json", "report.html", "samples/sample_0.wav", "samples/sample_1.wav"]
    assert sorted(files) == sorted(["README.md", *report, TAR])
    assert files[TAR] == tar.read_bytes()
    with tarfile.open(tar) as archive:
        assert files["loss.png"] == archive.extractfile("loss.png").read()
        assert files["samples/sample_1.wav"] == archive.extractfile("samples/sample_1.wav").read()
        assert files["report.html"] == archive.extractfile("report.html").read()
        finetune = json.loads(archive.extractfile("finetune.json").read())
    assert files["loss.png"][:8] == b"\x89PNG\r\n\x1a\n" and files["samples/sample_0.wav"][:4] == b"RIFF"
    card = files["README.md"].decode()
    # the card describes this run (its finetune.json), and every file it links or plays was pushed beside it
    linked = re.findall(r"\]\(([^)]+)\)|src=\"([^\"]+)\"", card)
    local = {a or b for a, b in linked if not (a or b).startswith("http")}
    assert local == {"loss.png", "samples/sample_0.wav", "samples/sample_1.wav"} and local <= set(files)
    assert card.startswith("---\nlicense: other\n") and "base_model" not in card  # tiny: no Meta weights
    assert "\n# my-musicgen\n" in card and "Trigger word: `zzq`" in card and "- genre: jazz, rock" in card
    assert f"hf download {REPO} trained_model.tar" in card and '--prompt "zzq, rainy night' in card
    training = finetune["training"]
    assert training["steps"] == 6 and "- optimizer steps: 6\n" in card and "- training clips: 2\n" in card
    assert f"- first loss: {round(training['first_loss'], 4)}\n" in card
    assert f"- final loss: {round(training['final_loss'], 4)}\n" in card
    for sample in finetune["samples"]:
        assert f"- [{sample['file']}]({sample['file']}): {sample['description']}\n" in card
    inputs = json.loads(card.split("## Training inputs\n\n```json\n")[1].split("```")[0])
    assert inputs == finetune["training_inputs"] and inputs["trigger"] == "zzq"
    assert f"Pushed to {hub.url}/{REPO}" in logs
    assert len(hub.commits) == 1

    # secrets: in no file under the output folder (tar, finetune.json, checkpoints, wandb files), the Hub's copies,
    # the logs or the console
    assert not set(publish.SECRET_FIELDS) & set(finetune["training_inputs"])
    assert _assert_no_secret_in_tree(out) > 10
    for content in files.values():
        assert all(s.encode() not in content for s in SECRETS)
    _assert_no_secret_in_logs(logs, captured.out, captured.err)
    assert not any(s in "".join(os.environ.values()) for s in SECRETS)


def test_a_refused_push_and_an_unreachable_wandb_still_return_the_weights(
    tmp_path, hub_env, fresh_wandb, monkeypatch, caplog, capfd
):
    # wandb online against a closed loopback port: its login/init fails (after WANDB_INIT_TIMEOUT)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_SILENT", "true")
    caplog.set_level(logging.INFO)
    with FakeHub(HF_TOKEN, refuse=True) as hub:
        hub_env(hub.url)
        params = _short_params(
            _dataset(tmp_path), wandb_api_key=WANDB_KEY, hf_repo_id=REPO, hf_token=HF_TOKEN, sample_duration=0.0
        )
        out = tmp_path / "out"
        tar = run_training(params, out)
    logs = _log_text(caplog)
    captured = capfd.readouterr()
    assert tar == out / TAR and tarfile.is_tarfile(tar)
    with tarfile.open(tar) as archive:
        assert json.loads(archive.extractfile("finetune.json").read())["training"]["steps"] == 6
    assert ("POST", "/api/repos/create") in hub.requests  # it did try, and was refused
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("Weights & Biases could not start" in e and "continues without wandb" in e for e in errors)
    assert any(f"Push to Hugging Face {REPO} failed" in e and "still returned" in e for e in errors)
    assert any("***" in e for e in errors)  # the server echoed the token: masked in our line
    assert "step 6/6" in logs  # the training ran to the end
    _assert_no_secret_in_logs(logs, captured.out, captured.err)
    _assert_no_secret_in_tree(out)


def test_an_unreachable_hub_still_returns_the_weights(tmp_path, hub_env, caplog):
    hub_env(f"http://127.0.0.1:{_closed_port()}")
    caplog.set_level(logging.INFO)
    params = _short_params(_dataset(tmp_path), hf_repo_id=REPO, hf_token=HF_TOKEN, sample_duration=0.0)
    tar = run_training(params, tmp_path / "out")
    assert tarfile.is_tarfile(tar)
    assert any(f"Push to Hugging Face {REPO} failed" in r.getMessage() for r in caplog.records)
    _assert_no_secret_in_logs(_log_text(caplog))


def _sigterm_at_step(monkeypatch, step: int) -> None:
    """Deliver a real SIGTERM to this process once `step` is done (the loop's handler turns it into a clean stop
    with a checkpoint, then TrainingInterrupted), keeping whatever metrics hook the run installs."""
    real = run_mod.train_loop

    def train_loop(*args, on_metrics=None, **kwargs):
        def hook(metrics):
            if on_metrics is not None:
                on_metrics(metrics)
            if metrics["step"] == step:
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, on_metrics=hook, **kwargs)

    monkeypatch.setattr(run_mod, "train_loop", train_loop)


def test_sigterm_pushes_the_resume_checkpoint_and_logs_the_exact_resume_from(tmp_path, hub_env, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    _sigterm_at_step(monkeypatch, 2)
    with FakeHub(HF_TOKEN) as hub:
        hub_env(hub.url)
        params = _short_params(_dataset(tmp_path), hf_repo_id=REPO, hf_token=HF_TOKEN, save_every=0)
        out = tmp_path / "out"
        with pytest.raises(TrainingInterrupted):
            run_training(params, out)
        local = out / "checkpoints" / "checkpoint-00000002.pt"
        assert local.is_file()
        assert hub.files[REPO] == {"checkpoints/checkpoint-00000002.pt": local.read_bytes()}
        url = f"{hub.url}/{REPO}/resolve/main/checkpoints/checkpoint-00000002.pt"
        logs = _log_text(caplog)
        assert f"start a training with the same inputs and resume_from={url}" in logs
        # the logged URL serves the checkpoint (to its owner: the repo is private)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {HF_TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.read() == local.read_bytes()
    _assert_no_secret_in_tree(out)
    _assert_no_secret_in_logs(logs)


def test_a_cog_cancel_without_hf_repo_says_the_checkpoint_dies_with_the_container(tmp_path, monkeypatch, caplog):
    """Cog cancels by raising its CancelationException (a BaseException) inside the training."""
    from cog import CancelationException

    caplog.set_level(logging.INFO)
    real = run_mod.train_loop

    def train_loop(*args, on_metrics=None, **kwargs):
        def hook(metrics):
            if metrics["step"] == 3:
                raise CancelationException()

        return real(*args, on_metrics=hook, **kwargs)

    monkeypatch.setattr(run_mod, "train_loop", train_loop)
    out = tmp_path / "out"  # pytest's tmp_path lies in the system temp folder, like Cog's training folder
    with pytest.raises(CancelationException):
        run_training(_short_params(_dataset(tmp_path), save_every=0), out)
    lost = "cannot be reached after the container stops"
    warning = next(r.getMessage() for r in caplog.records if lost in r.getMessage())
    assert str(out / "checkpoints" / "checkpoint-00000003.pt") in warning and "hf_repo_id" in warning


def test_ctrl_c_with_hf_repo_pushes_the_checkpoint_too(tmp_path, hub_env, monkeypatch, caplog):
    """Ctrl-C reaches run_worker as TrainingInterrupted (the loop turns KeyboardInterrupt into it)."""
    caplog.set_level(logging.INFO)
    real = run_mod.train_loop

    def train_loop(*args, on_metrics=None, **kwargs):
        def hook(metrics):
            if metrics["step"] == 1:
                raise KeyboardInterrupt

        return real(*args, on_metrics=hook, **kwargs)

    monkeypatch.setattr(run_mod, "train_loop", train_loop)
    with FakeHub(HF_TOKEN) as hub:
        hub_env(hub.url)
        with pytest.raises((TrainingInterrupted, KeyboardInterrupt)):
            run_training(_short_params(_dataset(tmp_path), hf_repo_id=REPO, hf_token=HF_TOKEN), tmp_path / "out")
    assert list(hub.files[REPO]) == ["checkpoints/checkpoint-00000001.pt"]
    assert f"resume_from={hub.url}/{REPO}/resolve/main/checkpoints/checkpoint-00000001.pt" in _log_text(caplog)


# ---------------------------------------------------------------------------------------------------- torchrun


def _launch_in_process(monkeypatch, launched: list[dict], step_to_stop: int | None = None):
    """A stand-in for `launch_torchrun` that runs the one worker `python -m training.worker` would run, in this
    process, with the arguments and environment run_training gives torchrun (a world of 1: RANK 0 of 1). With
    `step_to_stop`, the worker gets a SIGTERM there, as torchrun relays a cancel, and the launch then raises Cog's
    CancelationException, as launch_torchrun re-raises the cancel that made it stop its workers."""
    from cog import CancelationException

    def launch(nproc, module, args, env=None):
        params_file = Path(args[args.index("--params_json") + 1])
        launched.append({"nproc": nproc, "module": module, "env": dict(env or {}), "file": params_file.read_text()})
        for name, value in {**(env or {}), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(name, value)
        if step_to_stop is not None:
            _sigterm_at_step(monkeypatch, step_to_stop)
        try:
            worker_mod.main(args)
        except TrainingInterrupted:
            raise CancelationException() from None
        finally:
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                monkeypatch.delenv(name)

    monkeypatch.setattr(run_mod.dist_mod, "launch_torchrun", launch)


def test_a_worker_takes_the_secrets_out_of_its_environment_before_it_starts_any_process(tmp_path):
    """`python -m training.worker` pops the secrets before importing the training code, which starts processes:
    matplotlib (audiocraft -> torchmetrics -> matplotlib) runs `fc-list` to build its font cache. A stand-in `fc-list`
    first on PATH records the environment it inherits; it must hold no secret (CI caught that leak once)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "fc-list-env"
    bin_dir.mkdir()
    fake = bin_dir / "fc-list"
    fake.write_text(f"#!/bin/sh\nenv >> {record}\n")  # prints nothing: matplotlib then finds no system font
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MPLCONFIGDIR": str(tmp_path / "mpl"),  # no font cache yet: matplotlib runs fc-list at import
        **{
            f"MGFT_SECRET_{name.upper()}": value
            for name, value in (("hf_token", HF_TOKEN), ("wandb_api_key", WANDB_KEY))
        },
    }
    proc = subprocess.run(
        [sys.executable, "-m", "training.worker", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--params_json" in proc.stdout
    inherited = record.read_text()  # the import did start fc-list (else this test would prove nothing)
    assert "MPLCONFIGDIR=" in inherited
    assert all(secret not in inherited for secret in SECRETS)


def test_torchrun_workers_get_the_secrets_from_their_environment_not_the_params_file(
    tmp_path, hub_env, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    launched: list[dict] = []
    _launch_in_process(monkeypatch, launched)
    with FakeHub(HF_TOKEN) as hub:
        hub_env(hub.url)
        params = _short_params(_dataset(tmp_path), hf_repo_id=REPO, hf_token=HF_TOKEN, sample_duration=0.0)
        out = tmp_path / "out"
        tar = run_training(params, out, nproc=2)
    (call,) = launched
    assert call["module"] == "training.worker"
    inputs = json.loads(call["file"])  # train_params.json, as the workers read it
    assert inputs["hf_repo_id"] == REPO and not set(publish.SECRET_FIELDS) & set(inputs)
    assert HF_TOKEN in call["env"].values()  # the token reached the worker through its environment...
    assert hub.files[REPO][TAR] == tar.read_bytes()  # ...which pushed with it
    assert all(s not in "".join(os.environ.values()) for s in SECRETS)  # and took it out of its environment
    assert _assert_no_secret_in_tree(out) > 5
    _assert_no_secret_in_logs(_log_text(caplog))


def test_a_cancelled_torchrun_run_pushes_its_checkpoint_once_from_the_launching_process(
    tmp_path, hub_env, monkeypatch, caplog
):
    from cog import CancelationException

    caplog.set_level(logging.INFO)
    _launch_in_process(monkeypatch, [], step_to_stop=2)
    with FakeHub(HF_TOKEN) as hub:
        hub_env(hub.url)
        params = _short_params(_dataset(tmp_path), hf_repo_id=REPO, hf_token=HF_TOKEN, save_every=0)
        with pytest.raises(CancelationException):
            run_training(params, tmp_path / "out", nproc=2)
    assert list(hub.files[REPO]) == ["checkpoints/checkpoint-00000002.pt"]
    assert len(hub.commits) == 1  # the worker left the push to the launching process: no second copy
    # ...nor a second attempt (huggingface_hub skips the commit of an unchanged file, so the hub alone cannot tell)
    pushes = [r for r in caplog.records if r.getMessage().startswith("Pushing the resume checkpoint")]
    assert len(pushes) == 1, [r.getMessage() for r in pushes]
    assert f"resume_from={hub.url}/{REPO}/resolve/main/checkpoints/checkpoint-00000002.pt" in _log_text(caplog)


def test_the_cog_entry_point_unwraps_secret_inputs_for_the_push(tmp_path, hub_env, caplog):
    """train.py's `train()` as Cog calls it: secrets arrive as cog.Secret, omitted inputs as their defaults."""
    from cog import Secret

    import train as cog_train

    caplog.set_level(logging.INFO)
    with FakeHub(HF_TOKEN) as hub:
        hub_env(hub.url)
        output = cog_train.train(
            dataset_path=str(_dataset(tmp_path)),
            model_version="tiny",
            auto_labeling=False,
            drop_vocals=False,
            epochs=1,
            updates_per_epoch=2,
            batch_size=2,
            segment_duration=2.0,
            sample_duration=0.0,
            hf_repo_id=REPO,
            hf_token=Secret(HF_TOKEN),
        )
    assert hub.files[REPO][TAR] == Path(output.weights).read_bytes()
    assert "README.md" in hub.files[REPO]
    _assert_no_secret_in_logs(_log_text(caplog))
    work = Path(output.weights).parent  # train()'s own temporary training folder
    try:
        assert _assert_no_secret_in_tree(work) >= 3  # the tar and the code caches
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _ProcessWatch:
    """Polls /proc while a run goes on: the command line of every process, and the environment of every process a
    training worker started (wandb's service, ...), collecting any that holds a secret."""

    def __init__(self) -> None:
        self.workers: dict[int, str] = {}  # pid -> command line of a `training.worker` worker
        self.leaks: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _read(pid: str, name: str) -> bytes:
        try:
            return Path(f"/proc/{pid}/{name}").read_bytes()
        except OSError:  # gone, or not ours
            return b""

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                cmdline = self._read(pid, "cmdline").replace(b"\0", b" ")
                if any(s.encode() in cmdline for s in SECRETS):
                    self.leaks.append(f"argv of {pid}: {cmdline[:200]!r}")
                # a worker (torchrun's launcher names the module too; it hands the environment on, by design)
                if b"training.worker --params_json" in cmdline and b"torch.distributed.run" not in cmdline:
                    self.workers[int(pid)] = cmdline.decode(errors="replace")
                stat = self._read(pid, "stat").rsplit(b")", 1)[-1].split()
                # Started by a worker, and no longer the worker itself: between a fork and its exec a child is the
                # worker's memory (its environment block too), with the worker's command line.
                parent = int(stat[1]) if len(stat) > 1 else None
                if parent in self.workers and cmdline.decode(errors="replace") != self.workers[parent]:
                    environ = self._read(pid, "environ")
                    if any(s.encode() in environ for s in SECRETS):
                        self.leaks.append(f"environment of {pid} (child of worker {parent}): {cmdline[:120]!r}")


@pytest.mark.slow
def test_secrets_reach_real_torchrun_workers_and_nothing_else(tmp_path, hub_env, fresh_wandb, monkeypatch, capfd):
    """Two real torchrun processes (gloo) with both secrets: rank 0 logs to wandb (offline) and pushes with the
    token, so both reached it; neither is in any process's command line, in what a worker starts, in the params
    file or any other file, in the output, or in ~/.netrc (the user's own is left as it was)."""
    home = tmp_path / "home"
    home.mkdir()
    users_netrc = "machine example.org login alice password keep-me\n"
    (home / ".netrc").write_text(users_netrc)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the workers' huggingface_hub reads it from the environment
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "out"
    with FakeHub(HF_TOKEN) as hub, _ProcessWatch() as watch:
        hub_env(hub.url)
        params = _short_params(
            _dataset(tmp_path), wandb_api_key=WANDB_KEY, hf_repo_id=REPO, hf_token=HF_TOKEN, sample_duration=0.0,
            updates_per_epoch=2, save_every=2, segment_duration=1.0,
        )  # fmt: skip
        tar = run_training(params, out, nproc=2)
    captured = capfd.readouterr()
    assert len(watch.workers) == 2, watch.workers  # the scan saw both workers
    assert all("--params_json" in cmdline for cmdline in watch.workers.values())
    assert watch.leaks == []
    # both secrets reached rank 0: the push carried the token, the wandb run exists only because of the key
    assert hub.files[REPO][TAR] == tar.read_bytes() and "README.md" in hub.files[REPO]
    history, config = _wandb_history_and_config(out)
    assert [h["step"] for h in history if "loss" in h] == [1, 2] and not set(publish.SECRET_FIELDS) & set(config)
    inputs = json.loads((out / "train_params.json").read_text())
    assert inputs["hf_repo_id"] == REPO and not set(publish.SECRET_FIELDS) & set(inputs)
    assert _assert_no_secret_in_tree(out) > 5
    _assert_no_secret_in_logs(captured.out, captured.err)
    assert "Data parallelism over 2 processes" in captured.err  # the workers' logs are in what was scanned
    assert (home / ".netrc").read_text() == users_netrc
    _assert_no_secret_in_tree(home)
