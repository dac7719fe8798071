"""cog.yaml's `build.run` steps (issue 19, point 1): the image builds with no flags. Cog writes each step as
`RUN <step>` (run by /bin/sh -c) before it copies the project in, so the steps run here the same way: in an empty
folder, without the project's files on any path, with every download served on loopback (a fake hub through
HF_ENDPOINT, a fake mirror of the other hosts through MGFT_BAKE_MIRROR) and any other connection refused. Then a
trained version sets up and predicts from the caches they filled, with HF_HUB_OFFLINE=1 and no network."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.core.lora_tars import lora_tar
from tests.fake_http import Server, hub_routes
from tests.generation.test_boot import NO_NETWORK

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bake_weights.py"
REWRITE = "python3 scripts/bake_weights.py --write-cog-yaml cog.yaml"


def load_bake():
    spec = importlib.util.spec_from_file_location("bake_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bake = load_bake()


def run_steps() -> list[str]:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["run"]


def bake_step() -> tuple[str, bytes, str]:
    """(the step, the program it carries, its arguments)."""
    found = [(step, bake.parse_cog_command(step)) for step in run_steps() if isinstance(step, str)]
    ((step, (program, args)),) = [(s, parsed) for s, parsed in found if parsed]
    return step, program, args


def test_the_bake_step_carries_the_current_script():
    """The step's text is the script: an edit to the script that is not written into cog.yaml fails here, and an
    edit that is changes the step's text (so Docker cannot reuse the old layer)."""
    step, program, args = bake_step()
    assert program == SCRIPT.read_bytes(), f"cog.yaml's bake step carries an older {SCRIPT.name}: run `{REWRITE}`"
    assert args == "--t5-revision main --encodec-revision main"
    edited = SCRIPT.read_bytes().replace(b"ATTEMPTS = 4", b"ATTEMPTS = 5")
    assert edited != SCRIPT.read_bytes() and bake.cog_command(edited, args) != step
    # Cog refuses a step with a newline; BuildKit a Dockerfile line over 64 KiB
    assert "\n" not in step and len(f"RUN {step}") <= bake.MAX_DOCKERFILE_LINE


def test_write_cog_yaml_rewrites_only_the_bake_step(tmp_path):
    copy = tmp_path / "cog.yaml"
    shutil.copy(ROOT / "cog.yaml", copy)
    before = copy.read_text().splitlines()
    edited = SCRIPT.read_bytes() + b"\n# an edit\n"
    assert bake.write_cog_yaml(copy, edited) is True
    after = copy.read_text().splitlines()
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) == 1 and after[changed[0]].strip().startswith("- python3 -c ")
    step = yaml.safe_load(copy.read_text())["build"]["run"][-1]
    assert bake.parse_cog_command(step) == (edited, "--t5-revision main --encodec-revision main")
    assert bake.write_cog_yaml(copy, edited) is False  # already current: the file is left as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cog.yaml"]  # no temporary file left


def test_every_step_runs_on_both_base_images():
    """`python3` is the only interpreter both of Cog's base images link (nvidia/cuda + `uv python install` has no
    `python` in Cog 0.22); bare `pip` may be missing or refused there as externally managed."""
    (pin,) = [line for line in (ROOT / "requirements-nodeps.txt").read_text().splitlines() if "==" in line]
    assert run_steps()[0] == f"PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-deps {pin}"
    for step in run_steps():
        assert isinstance(step, str), f"{step!r}: a mount (secret, cache) would need a flag or a cached layer"
        words = shlex.split(step)
        while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words.pop(0)
        assert words[0] == "python3", step[:80]


# ---------------------------------------------------------------------------------------------------- end to end

T5_FILES = {
    "config.json": json.dumps({"model_type": "t5", "d_model": 768}).encode(),
    "tokenizer.json": json.dumps({"version": "1.0"}).encode(),
    "tokenizer_config.json": b"{}",
    "spiece.model": b"\x0a\x05piece" * 100,
    "special_tokens_map.json": b"{}",
    "model.safetensors": b"t5 weights " * 30000,
}
ENCODEC_FILES = {
    "config.json": json.dumps({"model_type": "encodec"}).encode(),
    "preprocessor_config.json": b"{}",
    "model.safetensors": b"encodec weights " * 20000,
}
# laion/larger_clap_music's kinds of files: configs, the RoBERTa tokenizer's, weights in the older format only
CLAP_FILES = {
    "config.json": json.dumps({"model_type": "clap"}).encode(),
    "preprocessor_config.json": b"{}",
    "vocab.json": b"{}",
    "merges.txt": b"#version: 0.2\n",
    "pytorch_model.bin": b"clap weights " * 20000,
}


def fake_bytes(name: str, size: int) -> bytes:
    unit = name.encode() + b"\0"
    return (unit * (size // len(unit) + 1))[:size]


def mirror_routes(program: bytes) -> tuple[dict, bytes, dict[str, bytes]]:
    """Routes of the fake mirror (each file at its recorded size), the program with each recorded sha256 replaced
    by the fake file's (the only change: no other bytes can match them), and the files by destination name."""
    assets = [(bake.HTDEMUCS_URL, bake.HTDEMUCS_SHA256, bake.HTDEMUCS_SIZE)]
    assets += [(f"{bake.ESSENTIA_BASE}/{path}", sha, size) for path, sha, size in bake.ESSENTIA_FILES]
    routes, files = {}, {}
    for i, (url, sha, size) in enumerate(assets):
        data = fake_bytes(url, size if size is not None else 1000 + i)
        if sha:
            assert program.count(sha.encode()) == 1, sha
            program = program.replace(sha.encode(), hashlib.sha256(data).hexdigest().encode())
        routes["/" + url.split("://", 1)[1]] = [(200, {}, data)]
        files[url.rsplit("/", 1)[1]] = data
    return routes, program, files


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A build's environment: nothing of the project on a path, caches in `tmp_path`, no network but loopback."""
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    venv_bin = Path(sys.executable).parent  # stands for the image's python3 (its pip, huggingface_hub)
    env = {
        "PATH": f"{venv_bin}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(tmp_path / "site"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "MGFT_CACHE": str(tmp_path / "mgft"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.update(extra)
    return env


def sh(step: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(["/bin/sh", "-c", step], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{step[:120]}... failed:\n{out[-4000:]}"
    return out


def test_the_steps_bake_everything_and_a_trained_version_predicts_offline(tmp_path):
    step, program, args = bake_step()
    routes, fake_program, mirror_files = mirror_routes(program)
    lfs = ("model.safetensors", "pytorch_model.bin")
    hub = {
        **hub_routes("t5-base", "1" * 40, T5_FILES, lfs),
        **hub_routes("facebook/encodec_32khz", "2" * 40, ENCODEC_FILES, lfs),
        **hub_routes("laion/larger_clap_music", "3" * 40, CLAP_FILES, lfs),
    }
    build = tmp_path / "build"  # the working folder of the steps: empty, as in the image before `COPY . /src`
    build.mkdir()
    with Server(hub) as hub_server, Server(routes) as mirror:
        env = clean_env(tmp_path, HF_ENDPOINT=hub_server.url, MGFT_BAKE_MIRROR=mirror.url)
        probe = "import predict"  # what the steps can see: not the project
        assert subprocess.run(["python3", "-c", probe], cwd=build, env=env, capture_output=True).returncode == 1
        pip_out = sh(run_steps()[0] + " --dry-run", build, {**env, "PIP_NO_INDEX": "1"})  # no index: no network
        assert "audiocraft" in pip_out
        bake_out = sh(bake.cog_command(fake_program, args), build, env)
        assert sorted(build.iterdir()) == []  # nothing written where it ran
        assert all(n == 1 for n in {**hub_server.hits, **mirror.hits}.values()), (hub_server.hits, mirror.hits)
        assert set(mirror.hits) == set(routes)  # every non-hub file came from the mirror
    assert "MGFT_BAKE_MIRROR is set" in bake_out and "Traceback" not in bake_out

    tar = lora_tar(tmp_path / "trained_model.tar", base="tiny", seed=1)
    expected = {
        "hub": {repo: {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
                for repo, files in (("t5-base", T5_FILES), ("facebook/encodec_32khz", ENCODEC_FILES),
                                    ("laion/larger_clap_music", CLAP_FILES))},
        "essentia": {name: len(data) for name, data in mirror_files.items() if name.endswith((".pb", ".json"))},
        "htdemucs": len(mirror_files[bake.HTDEMUCS_URL.rsplit("/", 1)[1]]),
    }  # fmt: skip
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = textwrap.dedent(
        f"""
        import hashlib, json, logging, urllib.request
        try:
            urllib.request.urlopen("https://huggingface.co", timeout=5)
            raise SystemExit("the network is reachable: the test would prove nothing")
        except OSError as e:
            print("network refused:", e)
        from huggingface_hub import hf_hub_download
        from preprocessing import analysis, vocals
        expected = json.load(open({str(tmp_path / "expected.json")!r}))
        for repo, files in expected["hub"].items():  # as transformers and audiocraft read them, offline
            for name, sha in files.items():
                path = hf_hub_download(repo, name)
                assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha, (repo, name)
        found = {{p.name: p.stat().st_size for p in analysis.default_models_dir().iterdir()}}
        assert found == expected["essentia"], found
        assert vocals.torch_cache_file().stat().st_size == expected["htdemucs"]
        print("BAKED FILES FOUND")
        from predict import Predictor
        from core.params import from_kwargs
        from generation.params import PredictParams
        predictor = Predictor()
        predictor.setup(weights={str(tar)!r})
        params = from_kwargs(PredictParams, prompt="calm piano", duration=1, top_k=50, seed=3)
        result = predictor.generator.generate(params)
        print("GENERATED", tuple(result.wavs.shape), predictor.generator._model.name)
        """
    )
    env = clean_env(tmp_path, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] += os.pathsep + str(ROOT)  # the image's /src, copied after the steps
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "network refused" in out and "BAKED FILES FOUND" in out, out[-3000:]
    assert "GENERATED (1, 1, 32000) lora fine-tune of tiny" in out, out[-3000:]
    assert re.search(r"Cog runtime: coglet \d+\.\d+", out), out[-3000:]  # a deployment shows the coglet it got


def test_a_training_logs_the_coglet_it_got(tmp_path, caplog):
    """train() (Cog's training entry) names the coglet a deployment resolved, as setup() does (above), before it
    checks its inputs: this one is refused at once."""
    import train
    from core.errors import InputError

    caplog.set_level("INFO")
    with pytest.raises(InputError):
        train.train(dataset_path=tmp_path / "missing.zip", model_version="fine-tuned")
    assert f"Cog runtime: coglet {importlib.metadata.version('coglet')}" in caplog.text
