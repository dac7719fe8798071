"""One source of truth for the install: cog.yaml, the set-up script, CI and the README agree; lint is clean."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import yaml

from tests.helpers import ROOT


def pins(path) -> dict[str, str]:
    out = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert "==" in line, f"{path}: {line!r} is not pinned with =="
        name, version = line.split("==", 1)
        out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def test_cog_yaml():
    cfg = yaml.safe_load((ROOT / "cog.yaml").read_text())
    build = cfg["build"]
    assert build["gpu"] is True
    assert str(build["cuda"]) == "12.8"  # torch 2.9.1's CUDA wheels
    assert str(build["python_version"]) == "3.11"
    assert build["python_requirements"] == "requirements.txt"
    assert cfg["run"] == "predict.py:Predictor" and cfg["train"] == "train.py:train" and "predict" not in cfg
    assert build["sdk_version"] == pins("requirements.txt")["cog"] == pins("requirements.txt")["coglet"]
    nodeps = [cmd for cmd in build["run"] if "--no-deps" in str(cmd)]
    assert len(nodeps) == 1
    pinned = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", str(nodeps[0])))
    assert {k.lower(): v for k, v in pinned.items()} == pins("requirements-nodeps.txt") == {"audiocraft": "1.3.0"}
    # weights are baked by scripts/bake_weights.py (checksums, retries), carried in the step's own text (cog copies
    # the project only after `run:`); tests/test_build_steps.py runs the steps and checks that copy is current
    (bake,) = [step for step in build["run"] if "'bake_weights.py','exec'" in str(step)]
    assert isinstance(bake, str) and bake.startswith("python3 -c ")


def test_setup_installs_the_same_files_as_cog():
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert "-r requirements.txt" in setup
    assert "--no-deps -r requirements-nodeps.txt" in setup


def test_stack_pins():
    runtime = pins("requirements.txt")
    assert runtime["torch"] == "2.9.1" and runtime["torchaudio"] == "2.9.1"
    assert runtime["xformers"] == "0.0.33.post2"
    for needed in ("einops", "flashy", "hydra-core", "julius", "num2words", "sentencepiece", "spacy",
                   "huggingface-hub", "tqdm", "transformers", "av", "soundfile", "librosa", "torchmetrics",
                   "demucs", "essentia-tensorflow", "cog", "dadaptation", "peft"):  # fmt: skip
        assert needed in runtime, needed
    assert runtime["librosa"].startswith("0.")
    for banned in ("torchvision", "torchtext", "gradio"):
        assert banned not in runtime
    pins("requirements-dev.txt")


def test_installed_versions_match_the_pins():
    wanted = {**pins("requirements.txt"), **pins("requirements-dev.txt"), **pins("requirements-nodeps.txt")}
    wrong = {}
    for name, version in wanted.items():
        try:
            got = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            got = None
        if got != version:
            wrong[name] = (version, got)
    assert wrong == {}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README needs the quickstart block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_commands():
    commands = readme_commands()
    setup, test = commands[0], commands[1]
    assert setup == "./scripts/setup.sh" and test == "./scripts/test.sh"
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip()]
    assert ci.index(setup) < ci.index(test)
    assert any("predict.py" in c and "--model_version tiny" in c for c in commands)


def test_ruff_is_clean():
    check = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-4000:]
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout[-4000:]


def test_readme_shows_the_latest_benchmarks():
    from bench import table

    text = (ROOT / "README.md").read_text()
    assert table.BEGIN in text and table.END in text
    shown = text.split(table.BEGIN, 1)[1].split(table.END, 1)[0].strip()
    assert shown == table.render(), "README's benchmark table is stale: run .venv/bin/python bench/table.py --write"
    assert len(table.rows()) >= 4  # generate, train step (speed, memory), prepare


def test_the_template_files_ship_in_the_image():
    """report.html and the model card are rendered from files beside the code (training/templates/): `cog build`
    copies the tree into the image except what .dockerignore names, so no pattern of it may catch them."""
    import fnmatch

    templates = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/templates/*") if p.is_file())
    assert {"training/templates/report.html", "training/templates/model_card.md"} <= set(templates)
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in templates:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the file and every folder above it
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            caught = [p for p in prefixes if fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.split("/")[-1], bare)]
            assert not caught, f".dockerignore's {pattern!r} leaves {path} out of the image"
