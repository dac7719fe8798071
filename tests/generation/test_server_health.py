"""A prediction server that stays healthy (issue 24): through the real Cog HTTP server, a request whose weights fail
to load (not a tar, a missing path or repo, a corrupt tar, hostile finetune.json, weights that do not build, a
cancelled download) leaves the next request as if it were the first: the previous model still predicts."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pytest

from core import weights
from core.versions import load_musicgen
from tests.core.lora_tars import edit_finetune, rewrite_tar
from tests.fake_http import Trickle
from tests.helpers import CogServer

pytestmark = pytest.mark.slow


def full_tar(path, scale: float = 1.0, drop: str | None = None):
    """A full tiny fine-tune (weights scaled by `scale`); `drop`: a state-dict key left out (checksums still
    match: the tar is well-formed, only its LM cannot be built)."""
    model = load_musicgen("tiny", device="cpu").musicgen
    state = {k: v * scale if v.is_floating_point() else v for k, v in model.lm.state_dict().items() if k != drop}
    return weights.write_trained_model(
        path, state_dict=state, cfg=model.lm.cfg, base_model="tiny", finetune={"method": "full"}
    )


def bad_weights(tmp_path) -> dict[str, str]:
    """Each kind of `replicate_weights` that fails to load, by name."""
    good = full_tar(tmp_path / "good.tar", scale=1.1)
    (tmp_path / "notes.txt").write_text("not a tar\n" * 100)
    data = good.read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    hostile = rewrite_tar(good, tmp_path / "list.tar", lambda name, b: b"[1, 2]" if name == "finetune.json" else b)
    newer = rewrite_tar(good, tmp_path / "newer.tar", edit_finetune(lambda info: info.update(format_version=99)))
    unbuildable = full_tar(tmp_path / "unbuildable.tar", drop="out_norm.weight")
    return {
        "not a tar": str(tmp_path / "notes.txt"),
        "missing path": str(tmp_path / "nowhere" / "trained_model.tar"),
        "missing repo": "nobody-here/no-such-weights",
        "corrupt tar": str(tmp_path / "truncated.tar"),
        "finetune.json a list": str(hostile),
        "newer format": str(newer),
        "weights that do not build": str(unbuildable),
    }


def private_cache(tmp_path) -> dict[str, str]:
    """The server's env: its own weights cache (the shared tiny models linked in), so what the test downloads and
    unpacks can be inspected and leaks into no other test."""
    root = tmp_path / "mgft-cache"
    root.mkdir(exist_ok=True)
    shared = Path.home() / ".cache" / "musicgen-ft" / "models"
    if shared.is_dir() and not (root / "models").exists():
        (root / "models").symlink_to(shared)
    return {"MGFT_CACHE": str(root)}


def run(srv: CogServer, **inputs) -> dict:
    status, body = srv.post("/predictions", {"input": inputs})
    assert status == 200, (status, body)
    return body


def test_failed_weights_loads_never_poison_the_server(tmp_path):
    """Preloaded tiny: after each failing replicate_weights, a tiny prediction succeeds (on the model kept loaded,
    or reloaded when the failure came after the old model was freed)."""
    srv = CogServer(tmp_path, env={"MGFT_PRELOAD": "tiny", **private_cache(tmp_path)})
    try:
        assert srv.wait_ready()["status"] == "READY", srv.log()[-3000:]
        default = {"model_version": "tiny", "duration": 1, "seed": 3}
        assert run(srv, **default)["status"] == "succeeded"
        for case, ref in bad_weights(tmp_path).items():
            failed = run(srv, replicate_weights=ref, duration=1)
            assert failed["status"] == "failed", (case, failed)
            assert "Traceback" not in failed["error"] and "NoneType" not in failed["error"], (case, failed["error"])
            after = run(srv, **default)
            assert after["status"] == "succeeded", (case, after.get("error"))
    finally:
        srv.stop()


def test_a_trained_version_predicts_after_a_bad_request(tmp_path):
    """COG_WEIGHTS = a trained tiny tar (a trained version on Replicate): after one bad replicate_weights, three
    default predictions (no inputs but a short duration) all succeed."""
    tar = full_tar(tmp_path / "trained_model.tar", scale=1.5)
    srv = CogServer(tmp_path, env={"COG_WEIGHTS": str(tar), "MGFT_PRELOAD": "", **private_cache(tmp_path)})
    try:
        assert srv.wait_ready()["status"] == "READY", srv.log()[-3000:]
        for ref in (str(tmp_path / "missing.tar"), str(full_tar(tmp_path / "bad.tar", drop="out_norm.weight"))):
            assert run(srv, replicate_weights=ref, duration=1)["status"] == "failed"
            for _ in range(3):
                body = run(srv, duration=1)
                assert body["status"] == "succeeded", body.get("error")
    finally:
        srv.stop()


def _request(srv: CogServer, method: str, path: str, payload: dict | None = None, headers: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else b""
    req = urllib.request.Request(
        srv.url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def test_a_cancelled_download_leaves_the_server_healthy(tmp_path):
    trickle = Trickle(full_tar(tmp_path / "slow.tar", scale=0.9).read_bytes(), delay=0.2)
    srv = CogServer(tmp_path, env={"MGFT_PRELOAD": "tiny", **private_cache(tmp_path)})
    try:
        assert srv.wait_ready()["status"] == "READY", srv.log()[-3000:]
        pid = uuid.uuid4().hex
        _request(
            srv,
            "PUT",
            f"/predictions/{pid}",
            {"id": pid, "input": {"replicate_weights": trickle.url, "duration": 1}},
            {"Prefer": "respond-async"},
        )
        assert trickle.started.wait(60), srv.log()[-3000:]
        _request(srv, "POST", f"/predictions/{pid}/cancel")
        # the next prediction waits for the cancelled one's slot (CogServer.post retries "at capacity")
        body = run(srv, model_version="tiny", duration=1, seed=3)
        assert body["status"] == "succeeded", body.get("error")
    finally:
        srv.stop()
        trickle.close()
    downloads = tmp_path / "mgft-cache" / "downloads"
    assert not [p.name for p in downloads.iterdir()], "the cancelled download left its partial file"
