"""The pushed model card's three ways to use a fine-tune, run as the card writes them: our predictor's command, the
audiocraft snippet and the transformers snippet, each in a fresh process on the files the push uploads (the tar,
and the transformers form at the repo's root). Only the download is replaced: the repo's files are laid out in a
local folder, which the transformers snippet names in place of the repo id (`from_pretrained` takes either).
`python -m evaluation` reads the transformers form as it reads the tar."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
import soundfile as sf

from core import tiny, weights
from tests.helpers import ROOT
from tests.training.conftest import make_prepared, tiny_params
from training import publish
from training.run import run_training

REPO = "alice/lofi-tiny"


def _python_block(card: str, heading: str) -> str:
    """The first ```python block after `heading` in the card."""
    section = card.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, f"no python block under {heading!r}:\n{section[:800]}"
    return match.group(1)


def _run(args: list[str], cwd, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A merged-LoRA fine-tune of `tiny-t5` (the whole model in both forms), its card, and the repo's files."""
    root = tmp_path_factory.mktemp("card")
    dataset = make_prepared(
        root / "prepared",
        [
            {"seconds": 2.5, "freq": 220.0, "description": "calm piano"},
            {"seconds": 2.0, "freq": 330.0, "description": "fast drums"},
        ],
    )
    params = tiny_params(
        dataset, model_version="tiny-t5", method="lora", lora_rank=4, lora_merge=True, epochs=1,
        updates_per_epoch=3, save_every=0, sample_duration=0.0,
    )  # fmt: skip
    out = root / "out"
    tar = run_training(params, out)
    with tarfile.open(tar) as archive:
        finetune = json.load(archive.extractfile(weights.FINETUNE_FILE))
    card = publish.model_card(finetune, REPO)
    repo = root / "repo"  # what `hf download` of the pushed repo gives: the tar, the transformers form at the root
    shutil.copytree(out / weights.TRANSFORMERS_FOLDER, repo)
    shutil.copy(tar, repo / "trained_model.tar")
    # the subprocesses read tiny-t5's T5 from its own cache, offline, as core.tiny.tiny_t5_hub does in process
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tiny.tiny_dir("tiny-t5") / tiny.T5_HUB_DIR),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    return card, repo, env, dataset


def test_the_cards_predict_command_runs(pushed):
    card, repo, env, _ = pushed
    (line,) = [ln for ln in card.splitlines() if ln.startswith("python predict.py ")]
    args = shlex.split(line)
    _run([sys.executable, str(ROOT / "predict.py"), *args[2:]], repo, env)
    audio, rate = sf.read(repo / "output.wav")
    assert rate == 32000 and len(audio) > rate  # the default duration, on the fine-tune


def test_the_cards_audiocraft_snippet_runs(pushed):
    card, repo, env, _ = pushed
    code = _python_block(card, "### With audiocraft")
    assert "MusicGen.get_pretrained" in code
    code += (
        "\nassert wav.dim() == 3 and wav.shape[0] == 1 and model.sample_rate == 32000, (wav.shape, model.sample_rate)\n"
    )
    _run([sys.executable, "-c", code], repo, env)


def test_the_cards_transformers_snippet_runs(pushed):
    card, repo, env, _ = pushed
    code = _python_block(card, "### With transformers")
    assert f'from_pretrained("{REPO}")' in code
    code = code.replace(f'"{REPO}"', repr(str(repo)))  # the downloaded repo, in place of its id
    code += "\nassert audio.dim() == 3 and audio.shape[0] == 1 and audio.shape[-1] > 0, audio.shape\n"
    code += "assert rate == 32000, rate\n"
    _run([sys.executable, "-c", code], repo, env)


def test_python_m_evaluation_reads_the_transformers_form_as_the_tar(pushed, tmp_path):
    """The folder (and a PEFT-free whole model) holds the tar's fp16 values: the same validation loss."""
    from evaluation.__main__ import main

    _, repo, _, dataset = pushed
    out = tmp_path / "report.json"
    argv = ["--dataset", str(dataset), "--weights", str(repo / "trained_model.tar"), str(repo)]
    assert main([*argv, "--samples", "0", "--segment", "2", "--clap", "none", "--json", str(out)]) == 0
    tar_row, folder_row = json.loads(out.read_text())["models"]
    assert folder_row["weights"] == str(repo)
    assert folder_row["val_loss"] == pytest.approx(tar_row["val_loss"], abs=1e-6)
