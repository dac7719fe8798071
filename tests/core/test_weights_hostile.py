"""Weights as untrusted input (issue 24): whatever a trained_model.tar holds, loading it ends in a `WeightsError`
naming the file and the fix, never a traceback, never an allocation its config asks for, never a look outside the
weights folder; downloads have a total deadline, and the cache is evicted only for sizes that were verified."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from core import weights
from core.errors import WeightsError
from core.versions import load_musicgen
from tests.core import test_weights_sources as sources
from tests.core.lora_tars import edit_finetune, rewrite_tar
from tests.core.test_weights_sources import Server, _cached, fake_disk, make_tar
from tests.fake_http import Trickle

cache = sources.cache  # the private weights cache fixture

FINETUNE = weights.FINETUNE_FILE


@pytest.fixture(scope="module")
def good_tar(tmp_path_factory) -> Path:
    return make_tar(tmp_path_factory.mktemp("good") / "trained_model.tar", seed=4)


def replace_finetune(raw: bytes):
    """An edit for `rewrite_tar`: finetune.json's bytes replaced by `raw` (checksums of the weights untouched)."""
    return lambda name, data: raw if name == FINETUNE else data


def resealed(src: Path, dst: Path, change_cfg) -> Path:
    """A copy of `src` whose state_dict.bin config was changed by `change_cfg(cfg)`, with finetune.json's checksum
    and architecture fingerprint recomputed to match: everything a forger can do."""
    with tarfile.open(src) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    pkg = torch.load(io.BytesIO(members["state_dict.bin"]), weights_only=True)
    change_cfg(pkg["xp.cfg"])
    buffer = io.BytesIO()
    torch.save(pkg, buffer)
    members["state_dict.bin"] = buffer.getvalue()
    info = json.loads(members[FINETUNE])
    info["integrity"]["sha256"]["state_dict.bin"] = hashlib.sha256(members["state_dict.bin"]).hexdigest()
    info["integrity"]["base_architecture"] = weights.architecture_fingerprint(pkg["xp.cfg"])
    members[FINETUNE] = json.dumps(info).encode()
    return weights.write_tar(dst, members)


def deeply_nested(depth: int = 200_000) -> bytes:
    return b'{"integrity": ' + b"[" * depth + b"]" * depth + b"}"


FINETUNE_CASES = {
    "a list": (b"[1, 2, 3]", "expected a JSON object, found a list"),
    "null": (b"null", "found null"),
    "integrity a string": (b'{"integrity": "sha256"}', "integrity must be an object"),
    "sha256 a list": (b'{"integrity": {"sha256": ["state_dict.bin"]}}', "integrity.sha256 must be an object"),
    "a digest a number": (b'{"integrity": {"sha256": {"state_dict.bin": 5}}}', "not a sha256 hex digest"),
    "nested 200k deep": (deeply_nested(), "nested too deeply"),
    "a latin-1 byte": ('{"method": "full", "note": "caf\xe9"}'.encode("latin-1"), "not UTF-8"),
    "base_model a number": (b'{"base_model": 7}', "base_model must be a string"),
}


@pytest.mark.parametrize("case", FINETUNE_CASES)
def test_hostile_finetune_json_is_one_clear_error(cache, good_tar, tmp_path, case):
    raw, words = FINETUNE_CASES[case]
    tar = rewrite_tar(good_tar, tmp_path / "hostile.tar", replace_finetune(raw))
    with pytest.raises(WeightsError) as err:
        weights.load_trained_model(tar, device="cpu")
    message = str(err.value)
    assert FINETUNE in message and words in message and "Re-export" in message, message
    assert str(tar) in message  # names the weights the user gave


def test_evaluation_loads_through_the_same_reader(cache, good_tar, tmp_path):
    """`python -m evaluation --weights hostile.tar`: its loader refuses the same way (one line from cli_errors)."""
    from evaluation.compare import load_weights

    tar = rewrite_tar(good_tar, tmp_path / "hostile.tar", replace_finetune(b"null"))
    with pytest.raises(WeightsError, match="expected a JSON object"):
        load_weights(str(tar), "cpu")


@pytest.mark.parametrize(
    ("version", "words"),
    [(99, "newer version of this fine-tuner"), ("1", "not a format this code knows"), (0, "not a format")],
)
def test_format_version_is_checked(cache, good_tar, tmp_path, version, words):
    tar = rewrite_tar(good_tar, tmp_path / "v.tar", edit_finetune(lambda info: info.update(format_version=version)))
    with pytest.raises(WeightsError, match=words) as err:
        weights.load_trained_model(tar, device="cpu")
    assert version != 99 or "upgrade" in str(err.value)


def test_member_paths_stay_in_the_weights_folder(cache, good_tar, tmp_path):
    """finetune.json listing `../secret` (or an absolute path) as a member: refused by name before anything outside
    is read, and the error says nothing about the outside file (neither existence nor hash)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private")
    for name in ("../../../secret.bin", str(secret), "state_dict.bin/../../secret.bin"):

        def add(info, name=name):
            info["integrity"]["sha256"][name] = hashlib.sha256(b"private").hexdigest()

        tar = rewrite_tar(good_tar, tmp_path / "paths.tar", edit_finetune(add))
        with pytest.raises(WeightsError) as err:
            weights.load_trained_model(tar, device="cpu")
        message = str(err.value)
        assert "not a weights member" in message, message
        assert (
            "missing" not in message
            and "corrupt" not in message
            and hashlib.sha256(b"private").hexdigest()[:8] not in message
        )


def test_a_link_out_of_a_weights_folder_is_refused(cache, good_tar, tmp_path):
    """A weights folder whose state_dict.bin links to a file elsewhere: refused without hashing (and so without
    reporting) the file it points to."""
    folder = weights.unpack(good_tar)
    linked = tmp_path / "linked"
    shutil.copytree(folder, linked)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"someone else's file")
    (linked / "state_dict.bin").unlink()
    (linked / "state_dict.bin").symlink_to(outside)
    with pytest.raises(WeightsError) as err:
        weights.load_trained_model(linked, device="cpu")
    message = str(err.value)
    assert "link leading out of the weights folder" in message, message
    assert hashlib.sha256(outside.read_bytes()).hexdigest()[:16] not in message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"dim": 4_000_000}, "transformer_lm.dim is 4000000, outside"),
        ({"num_layers": 10_000}, "transformer_lm.num_layers is 10000, outside"),
        ({"card": "256"}, "transformer_lm.card is 256, outside"),
        ({"dim": 8192, "num_layers": 96, "num_heads": 64}, "B parameters, more than any MusicGen"),
        ({"dim": 128}, "does not have the architecture of its base model tiny: dim 128 (base: 64)"),
        ({"n_q": 8}, "n_q 8 (base: 4)"),
        ({"dim": 65, "num_heads": 4}, "not a multiple of num_heads"),
    ],
)
def test_lm_config_is_checked_against_the_base_before_building(cache, good_tar, tmp_path, change, words, monkeypatch):
    """A config forged with matching checksums and fingerprint: refused by name, and nothing is built from it."""
    tar = resealed(good_tar, tmp_path / "forged.tar", lambda cfg: cfg["transformer_lm"].update(change))
    import audiocraft.models.loaders as loaders

    def never(*args, **kwargs):
        raise AssertionError("the LM was built from a config that should have been refused")

    monkeypatch.setattr(loaders, "load_lm_model", never)
    with pytest.raises(WeightsError) as err:
        weights.load_trained_model(tar, device="cpu")
    assert words in str(err.value) and "state_dict.bin" in str(err.value), str(err.value)


def test_a_catalogue_base_fixes_the_architecture():
    assert weights.base_architecture("large") == {
        "num_layers": 48,
        "n_q": 4,
        "dim": 2048,
        "num_heads": 32,
        "card": 2048,
    }
    assert weights.base_architecture("facebook/musicgen-stereo-small")["n_q"] == 8
    tiny = load_musicgen("tiny", "cpu").lm
    assert weights.base_architecture("tiny") == {
        "dim": tiny.dim, "num_heads": 4, "num_layers": len(tiny.transformer.layers), "n_q": tiny.n_q, "card": tiny.card
    }  # fmt: skip
    assert weights.base_architecture("/some/local/folder") == {}


def test_a_download_has_a_total_deadline(cache, good_tar, monkeypatch):
    """Each read returns within the per-read timeout, and still the download ends at the deadline."""
    monkeypatch.setattr(weights.cache, "DOWNLOAD_DEADLINE", 1.5)
    server = Trickle(good_tar.read_bytes())
    try:
        with pytest.raises(WeightsError, match="not finished after 2 s") as err:
            weights.unpack(server.url)
    finally:
        server.close()
    assert server.url in str(err.value)
    assert not [p for p in (cache / "downloads").iterdir()], "the partial download was left behind"


def test_a_content_length_header_evicts_nothing(cache, tmp_path):
    """A server announcing 1 TB for a 2 MB tar: the cache evicts only for the bytes that really arrive; with room
    for them, every cached weights folder stays."""
    tars = [make_tar(tmp_path / f"t{i}" / "trained_model.tar", seed=10 + i) for i in range(3)]
    size = sum(f.stat().st_size for f in weights.unpack(tars[0]).iterdir())
    free = fake_disk(cache, capacity=10 * size)
    for tar in tars[1:]:
        weights.unpack(tar, min_free_bytes=size, free_bytes=free)
    before = _cached(cache)
    assert len(before) == 3
    data = make_tar(tmp_path / "new" / "trained_model.tar", seed=20).read_bytes()
    server = Server({"/w.tar": (200, {}, data)})
    original = server.httpd.RequestHandlerClass.do_HEAD

    def head(handler):  # the HEAD answer claims 1 TB; GET sends the real bytes
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**12))
        handler.end_headers()

    server.httpd.RequestHandlerClass.do_HEAD = head
    try:
        folder = weights.unpack(server.url + "/w.tar", min_free_bytes=size, free_bytes=free)
    finally:
        server.httpd.RequestHandlerClass.do_HEAD = original
        server.close()
    assert set(before) <= set(_cached(cache)) and folder.name in _cached(cache)
    assert os.path.isdir(folder)


def test_unpacking_onto_a_full_disk_is_one_line(good_tar, tmp_path):
    """Extraction past a real file-size limit (RLIMIT_FSIZE in a child process): a DiskError naming the weights and
    the cache folder, and no half-unpacked folder left in the cache."""
    from tests.core.test_audio_write import run_limited

    code = f"""
    import os
    os.environ["MGFT_CACHE"] = "{tmp_path}/cache"
    from core import weights
    from core.errors import DiskError
    try:
        weights.unpack("{good_tar}")
    except DiskError as e:
        print("DiskError:", e)
    """
    result = run_limited(code, 100_000, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"DiskError: Could not unpack the weights {good_tar} into "), result.stdout
    assert "Free disk space" in result.stdout
    assert not [p.name for p in (tmp_path / "cache" / "weights").iterdir()]
