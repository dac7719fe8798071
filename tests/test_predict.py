"""predict.py: the Cog signature and the CLI are the same definition; the CLI generates offline."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import soundfile as sf

from core.params import build_parser
from generation.params import PredictParams
from predict import Predictor
from tests.cog_schema import signature_generator
from tests.helpers import ROOT


def test_cog_signature_is_written_from_the_dataclass():
    generator = signature_generator()
    assert "predict.py" not in generator.stale(), f"predict.py's Cog signature is stale: run {generator.COMMAND}"


def test_cli_flags_match_the_dataclass():
    parser = build_parser(PredictParams)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(PredictParams)}
    assert list(flags) == list(fields)
    for name, action in flags.items():
        assert action.default == fields[name].default, name
        assert action.choices == fields[name].metadata["choices"], name


def run_cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_help_lists_every_input():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for f in dataclasses.fields(PredictParams):
        assert f"--{f.name}" in out.stdout
    assert "--output" in out.stdout


def test_cli_generates_offline(tmp_path):
    out = run_cli("--model_version", "tiny", "--prompt", "lofi beat", "--duration", "2", "--seed", "3",
                  "--output", str(tmp_path / "out.wav"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    info = sf.info(str(tmp_path / "out.wav"))
    assert (info.samplerate, info.channels, info.frames) == (32000, 1, 64000)


def test_cli_writes_one_file_per_output(tmp_path):
    out = run_cli("--model_version", "tiny", "--prompt", "lofi beat", "--duration", "1", "--seed", "3",
                  "--num_outputs", "2", "--output", str(tmp_path / "out.wav"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_0.wav", "out_1.wav"]
    first, sr = sf.read(str(tmp_path / "out_0.wav"))
    second, _ = sf.read(str(tmp_path / "out_1.wav"))
    assert sr == 32000 and first.shape == second.shape == (32000,)
    assert not (first == second).all()


def test_run_returns_one_path_as_the_audio_peers_do():
    import typing

    from cog import Path

    assert typing.get_type_hints(Predictor.run)["return"] is Path


def test_cli_bad_input_is_one_line_naming_it(tmp_path):
    out = run_cli("--model_version", "tiny", "--top_p", "2", "--output", str(tmp_path / "x.wav"))
    assert out.returncode == 2
    assert "Invalid input 'top_p'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x.wav").exists()


def test_cli_output_format_mp3_with_the_default_name_writes_mp3(tmp_path):
    out = run_cli("--model_version", "tiny", "--duration", "1", "--seed", "2", "--output_format", "mp3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["output.mp3"]
    head = (tmp_path / "output.mp3").read_bytes()[:3]
    assert head == b"ID3" or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # an ID3 tag or an MPEG frame sync


def test_cli_output_into_an_existing_folder(tmp_path):
    folder = tmp_path / "renders"
    folder.mkdir()
    out = run_cli("--model_version", "tiny", "--duration", "1", "--output", str(folder))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.name for p in folder.iterdir()] == ["output.wav"]
    assert not (tmp_path / "renders.wav").exists()


def test_help_prints_open_ranges_without_none():
    out = run_cli("--help").stdout
    assert "None.." not in out and "..None" not in out
    assert "[>= 0]" in " ".join(out.split())  # top_k: open above


def test_a_training_only_model_version_is_refused_for_prediction_naming_the_fix():
    import pytest

    from core.params import InputError, from_kwargs
    from generation.generate import validate_request

    with pytest.raises(InputError, match="model_version.*replicate_weights"):
        validate_request(from_kwargs(PredictParams, model_version="tiny-micro"), None)


def test_setup_reads_the_deployment_environment(monkeypatch, caplog):
    """MGFT_PRELOAD and MGFT_WEIGHTS_MIN_FREE_GB are read by predict.py's setup (the entry point) and passed on; the
    retired MGFT_QUANTIZE is named in a warning, not silently ignored."""
    monkeypatch.setenv("MGFT_PRELOAD", "tiny")
    monkeypatch.setenv("MGFT_WEIGHTS_MIN_FREE_GB", "2.5")
    monkeypatch.setenv("MGFT_QUANTIZE", "none")
    predictor = Predictor()
    predictor.setup()
    assert "MGFT_QUANTIZE is no longer read: use the input sampler_precision" in caplog.text
    assert predictor.generator.min_free_bytes == int(2.5 * 2**30)
    assert predictor.generator.loaded_weights is None and predictor.generator._model.name == "tiny"
    monkeypatch.setenv("MGFT_PRELOAD", "")
    predictor.setup()
    assert predictor.generator._model is None
