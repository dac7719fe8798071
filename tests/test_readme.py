"""The README is true: every bash block in it runs as written on a fresh clone, or says what more it needs.

Each block starts with `# Needs: ...`. A block that needs `nothing` (or only inputs this test stands in for, such
as `my_tracks.zip`) is run, in order, with bash, in a copy of the checkout (the tracked files and the venv link: a
fresh clone after `./scripts/setup.sh`), so its outputs do not litter the checkout; every file it writes must be
git-ignored. A block that needs the network, a GPU or Docker is checked without them: its commands name files,
flags and model versions that exist, and a model that cannot be downloaded fails fast with one error line. A block
of `cog ...` commands only needs no marker (Docker), nor one that starts a server in the foreground (a second
terminal). Prose figures (`N.NNx`) come from the benchmark table; commands use the venv's Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import table
from core.catalogue import MODEL_VERSION_CHOICES, STYLE_TINY_VERSIONS, TINY_VERSIONS
from generation.params import PredictParams
from tests.helpers import free_port
from training.params import TrainParams

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"nothing"}  # what a fresh clone after set-up has
STAND_INS = {"my_tracks.zip": "demo.zip"}  # inputs a block may need, and the earlier output that stands in for them
NOT_HERE = ("network", "GPU", "Docker", "second terminal")
# The set-up and the test suite are what this test runs in: they are checked to exist, not run again.
ENVIRONMENT = ("./scripts/setup.sh", "./scripts/test.sh")
CLI_FLAGS = {
    "predict.py": {f.name for f in dataclasses.fields(PredictParams)} | {"output", "weights", "help"},
    "train.py": {f.name for f in dataclasses.fields(TrainParams)} | {"output_dir", "help"},
}
OFFLINE_VERSIONS = {*TINY_VERSIONS, *STYLE_TINY_VERSIONS, "tiny-micro", "fine-tuned"}
WRITES = ("--output", "--output_dir", "--json", "--samples_dir", "-o")


@dataclasses.dataclass
class Block:
    line: int  # where it starts in README.md
    text: str
    needs: set[str]

    @property
    def commands(self) -> list[str]:
        """The block's commands: continuation lines joined, comment lines dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]

    @property
    def runnable(self) -> bool:
        return self.needs <= RUNNABLE | set(STAND_INS)

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def _needs(text: str) -> set[str] | None:
    first = text.splitlines()[0] if text.strip() else ""
    marked = re.match(r"#\s*Needs:\s*(.*)", first)
    if marked:
        said = marked.group(1)
        needs = {word for word in (*RUNNABLE, *STAND_INS, *NOT_HERE) if word.lower() in said.lower()}
        return needs or None
    commands = Block(0, text, set()).commands
    if commands and all(c.startswith("cog ") for c in commands):
        return {"Docker"}
    if any("cog.server.http" in c and not c.endswith("&") for c in commands):
        return {"second terminal"}
    return None


def bash_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    blocks = []
    for match in re.finditer(r"^```(?:bash|sh)\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match.group(1), _needs(match.group(1)) or set()))
    return blocks


def prose(text: str | None = None) -> str:
    """README without its code blocks and its benchmark table."""
    text = README.read_text() if text is None else text
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    before, rest = text.split(table.BEGIN, 1)
    return before + rest.split(table.END, 1)[1]


def written_paths(command: str) -> list[str]:
    """The paths a command writes (`--output x.wav`, `>file`, ...), as `<stem>_<i>` for `--num_outputs N`."""
    argv = shlex.split(command, comments=True)
    paths = [value for flag, value in zip(argv, argv[1:], strict=False) if flag in WRITES]
    paths += [a[1:] for a in argv if a.startswith(">") and len(a) > 1 and a[1] != "&"]
    if "preprocessing.demo" in argv:
        paths.append(argv[argv.index("preprocessing.demo") + 1])
    if "--num_outputs" in argv and "--output" in argv and int(argv[argv.index("--num_outputs") + 1]) > 1:
        target = Path(argv[argv.index("--output") + 1])
        paths.remove(str(target))
        n = int(argv[argv.index("--num_outputs") + 1])
        paths += [str(target.with_name(f"{target.stem}_{i}{target.suffix}")) for i in range(n)]
    return list(dict.fromkeys(paths))


def _ignored(path: str) -> bool:
    name = path.rstrip("/")
    candidates = [name, name + "/"]
    return any(
        subprocess.run(["git", "check-ignore", "-q", "--no-index", c], cwd=ROOT).returncode == 0 for c in candidates
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The checkout as a fresh clone has it (tracked files as they are in the working tree), plus the venv link."""
    folder = tmp_path_factory.mktemp("readme") / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    (folder / ".venv").symlink_to(Path(sys.executable).parents[1])
    return folder


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a clone's commands import the clone
    env.update({"OMP_NUM_THREADS": "2", **extra})
    return env


def _run_script(script: str, cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """`script` with bash -euo pipefail in its own process group, which is ended after (servers it started)."""
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_every_block_says_what_it_needs():
    blocks = bash_blocks()
    assert len(blocks) >= 5
    unmarked = [str(b) for b in blocks if not b.needs]
    assert unmarked == [], "start each bash block with '# Needs: nothing' (or what more it needs)"
    quick = [b for b in blocks if b.runnable and any("train.py" in c for c in b.commands)]
    assert quick, "the quick start (a training offline) is a block that needs nothing"


def test_commands_use_the_venvs_python():
    text = README.read_text()
    plain = [m.group(0) for m in re.finditer(r"`(python3? (?:-m [\w.]+|\S+\.py)[^`]*)`", text)]
    assert plain == [], "write .venv/bin/python: a fresh clone has no python with our packages on PATH"
    for block in bash_blocks():
        for command in block.commands:
            words = shlex.split(command, comments=True)
            while words and re.match(r"[A-Za-z_]\w*=", words[0]):  # VAR=value before the command
                words.pop(0)
            if words and words[0] in ("python", "python3") and "-c" not in words[:2]:
                assert re.search(r"PATH=\S*\.venv/bin", command), (str(block), command)


def test_prose_speed_figures_come_from_the_benchmark_table():
    shown = README.read_text().split(table.BEGIN, 1)[1].split(table.END, 1)[0]
    figures = set(re.findall(r"(?<![\w.])\d+\.\d+x\b", shown))
    said = re.findall(r"(?<![\w.])\d+\.\d+x\b", prose())
    assert said, "the prose names the measured speed-ups"
    assert [f for f in said if f not in figures] == []


def test_every_path_the_readme_writes_is_git_ignored():
    written = [p for b in bash_blocks() for c in b.commands for p in written_paths(c)]
    assert {"out.wav", "demo.zip", "demo-out/", "mine.wav"} <= set(written)
    assert [p for p in written if not _ignored(p)] == []


def test_blocks_that_need_more_are_checked_without_it(clone):
    """Without the network, a GPU or Docker: the files and flags they name exist, their model versions are real,
    and a model that cannot be downloaded fails at once with one error line naming it (not a traceback)."""
    checked = 0
    for block in (b for b in bash_blocks() if not b.runnable):
        for command in block.commands:
            argv = shlex.split(command, comments=True)
            if argv[0] == "cog":
                assert "Docker" in block.needs, (str(block), command)
                continue
            script = next((a for a in argv if a in CLI_FLAGS), None)
            if script is None:
                continue
            assert (clone / script).is_file()
            flags = {a[2:] for a in argv if a.startswith("--")}
            assert flags <= CLI_FLAGS[script], (str(block), flags - CLI_FLAGS[script])
            if "--model_version" in argv:
                version = argv[argv.index("--model_version") + 1]
                assert version in MODEL_VERSION_CHOICES, (str(block), version)
                assert version in OFFLINE_VERSIONS or "network" in block.needs, (str(block), command)
            checked += 1
    assert checked >= 3
    network = next(
        c for b in bash_blocks() if "network" in b.needs for c in b.commands if "predict.py" in c and "--model_ver" in c
    )
    hub = clone.parent / "empty-hf-home"
    run = _run_script(network, clone, timeout=180, HF_HOME=str(hub), HF_HUB_OFFLINE="1")
    version = shlex.split(network)[shlex.split(network).index("--model_version") + 1]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and version in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_the_readme_runs_on_a_fresh_clone(clone):
    """Every block that needs nothing more runs as written, in order, in a fresh clone; what it writes is there and
    git-ignored."""
    before = {p.name for p in clone.iterdir()}
    ran = []
    for block in (b for b in bash_blocks() if b.runnable):
        commands = []
        for command in block.commands:
            if command in ENVIRONMENT:
                assert os.access(clone / command, os.X_OK), command
                continue
            commands.append(command)
        for need in block.needs & set(STAND_INS):
            shutil.copy(clone / STAND_INS[need], clone / need)
        port = str(free_port())  # the README's port 5000 may be taken on this machine
        script = "\n".join(commands).replace("localhost:5000", f"localhost:{port}").replace("PORT=5000", f"PORT={port}")
        run = _run_script(script, clone, timeout=900)
        assert run.returncode == 0, (str(block), run.stdout[-2000:], run.stderr[-4000:])
        for path in (p for c in commands for p in written_paths(c)):
            target = clone / path
            assert target.exists() and (target.is_dir() or target.stat().st_size > 0), (str(block), path)
        ran.append(block)
    assert len(ran) >= 4
    new = sorted({p.name for p in clone.iterdir()} - before)
    assert {"demo.zip", "demo-out", "out.wav", "mine.wav", "cog-out.wav"} <= set(new)
    assert [n for n in new if not _ignored(n + ("/" if (clone / n).is_dir() else ""))] == []
