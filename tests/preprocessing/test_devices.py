"""Preparation across processes (issue 20, part 4): the tracks spread over track processes (one per GPU, or per share
of the CPU) and essentia workers give the same dataset as one process; a worker that dies or an interrupt stops
everything, names the track and leaves no process behind.

Real components throughout: the small random HTDemucs saved as a demucs repo (core.tiny), essentia with the small
stand-in graphs (fake_essentia), real worker processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest
import soundfile as sf
import torch

from core.params import InputError, from_kwargs
from core.tiny import save_htdemucs_repo
from preprocessing import PrepareParams, load_prepared, prepare
from preprocessing.workers import TrackFailed, plan
from tests.preprocessing import fake_essentia
from tests.preprocessing.audio_files import chord_with_beat, track, write_audio


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return save_htdemucs_repo(tmp_path_factory.mktemp("htdemucs"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return fake_essentia.write_models(tmp_path_factory.mktemp("essentia"))


def _params(src: Path, repo: Path, **kw) -> PrepareParams:
    return from_kwargs(PrepareParams, dataset_path=str(src), drop_vocals=True, demucs_repo=str(repo), **kw)


def _processes(marker: str) -> list[int]:
    """Running processes whose command line names `marker` (a test's temp folder: the track workers carry their
    log path there, the essentia workers their config path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def _zip(src: Path) -> Path:
    upload = src.with_suffix(".zip")
    with zipfile.ZipFile(upload, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return upload


def _snapshot(work: Path) -> dict:
    """Everything a preparation leaves in `work/dataset`, with the folder's own path taken out: clip bytes, sidecars,
    manifest lines, and the report without its timings."""
    folder = work / "dataset"
    files = {p.name: p.read_bytes() for p in sorted((folder / "clips").iterdir())}
    manifest = (folder / "data.jsonl").read_text(encoding="utf-8").replace(str(folder), "DATASET")
    # A skipped file's reason quotes the decoder's message, with the run's own unpack path in it.
    report = json.loads((folder / "report.json").read_text(encoding="utf-8").replace(str(work), "WORK"))
    for key in ("seconds_taken", "real_time_factor", "timings"):
        report.pop(key)
    return {"files": files, "manifest": manifest, "report": report}


def test_two_processes_prepare_the_same_dataset_as_one(tmp_path, repo, models):
    """Same clips (bytes), sidecars, manifest and report from one process and from two track processes + two
    essentia workers. The first track is the longest, so the second process finishes its tracks first; two tracks
    fold to the same clip name (the later one gets `-2` whichever process was faster)."""
    src = tmp_path / "upload"
    write_audio(src / "A long song.wav", track(24, 44100, 2, freq=220, seed=1), 44100)
    write_audio(src / "Beat.flac", chord_with_beat((220.0, 261.63, 329.63), 100, 9, 44100), 44100)
    write_audio(src / "beat.wav", track(7, 48000, 1, freq=330, seed=3), 48000)  # folds to "beat" too
    write_audio(src / "deep/short.ogg", track(6, 22050, 2, freq=440, seed=4), 22050)
    (src / "deep" / "short.txt").write_text("a described track")
    (src / "broken.mp3").write_bytes(b"not audio at all" * 100)
    upload = _zip(src)
    params = _params(upload, repo, auto_labeling=True, essentia_models=str(models), chunk_seconds=10)

    two = plan(True, "cpu", 4, processes=2)
    assert two.processes == 2 and two.essentia == 2
    # demucs' float sums depend on the number of threads (oneDNN splits the work): one process runs with the
    # threads each of the two gets, as a machine with half the cores would.
    threads = torch.get_num_threads()
    torch.set_num_threads(two.threads)
    try:
        one = prepare(params, tmp_path / "one", processes=1)
    finally:
        torch.set_num_threads(threads)
    both = prepare(params, tmp_path / "two", processes=2)

    a, b = _snapshot(tmp_path / "one"), _snapshot(tmp_path / "two")
    assert sorted(a["files"]) == sorted(b["files"])
    for name in a["files"]:
        assert a["files"][name] == b["files"][name], name
    assert a["manifest"] == b["manifest"]
    assert a["report"] == b["report"]
    # What is compared holds what it should: the separated long track first, in its 2 whole 10 s clips (the last
    # 4 s are too short for a clip), both "beat"s, labels and a skip.
    names = [c.path.name for c in both.clips]
    assert names[:3] == ["A_long_song_000.wav", "A_long_song_001.wav", "Beat_000.wav"]
    assert {"Beat_000.wav", "beat-2_000.wav"} <= set(names), names
    assert [s["file"] for s in both.report["skipped"]] == ["broken.mp3"]
    labelled = [c for c in both.clips if c.info["description_source"] == "auto_labels"]
    assert labelled and all(c.info["genre"] for c in labelled)
    assert [c.description for c in one.clips] == [c.description for c in both.clips]
    assert not _processes(str(tmp_path))


def _busy_worker(marker: str, deadline: float) -> tuple[int, str]:
    """(pid, track) of a track worker of this test that has started a track (its log says `preparing <track>`)."""
    while time.monotonic() < deadline:
        for pid in _processes(marker):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"preprocessing.track_worker" not in cmdline:
                continue
            log = Path(cmdline[cmdline.index(b"preprocessing.track_worker") + 1].decode())
            started = re.findall(r"^preparing (.+)$", log.read_text(errors="replace"), re.M) if log.is_file() else []
            if started:
                return pid, started[-1]
        time.sleep(0.1)
    raise AssertionError("no track worker started a track")


def _long_upload(folder: Path) -> Path:
    """Four tracks long enough that a worker is busy with one for seconds (the tiny HTDemucs: ~1 s per 10 s)."""
    for i in range(4):
        write_audio(folder / f"track {i}.wav", track(40, 44100, 2, freq=200 + 50 * i, seed=i), 44100)
    return _zip(folder)


def test_a_worker_that_dies_names_its_track_and_leaves_no_process(tmp_path, repo):
    """A track process killed mid-track (as the kernel's out-of-memory killer does): prepare() raises at once,
    naming the track that process was preparing; no process of the run is left, nothing is left in the way."""
    upload = _long_upload(tmp_path / "upload")
    killed: dict = {}

    def kill_one() -> None:
        pid, rel = _busy_worker(str(tmp_path), time.monotonic() + 120)
        killed.update(pid=pid, rel=rel)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    with pytest.raises(TrackFailed) as err:
        prepare(_params(upload, repo, auto_labeling=False), tmp_path / "work", processes=2)
    killer.join(timeout=10)
    message = str(err.value)
    assert f"while preparing {killed['rel']}" in message, message
    assert "killed by SIGKILL" in message and "out of memory" in message, message
    assert not _processes(str(tmp_path))
    assert not (tmp_path / "work" / "prepare-tmp").exists()
    with pytest.raises(InputError, match="not a prepared dataset"):
        load_prepared(tmp_path / "work" / "dataset")


def test_an_interrupt_stops_the_workers_and_leaves_nothing_that_looks_complete(tmp_path, repo, models):
    """Ctrl-C (SIGINT: KeyboardInterrupt in the preparing process; Cog's cancel takes the same way out) while the
    track processes work: every worker is stopped, no manifest is written (the folder is not a dataset) and no clip
    sits half-written under a final name."""
    upload = _long_upload(tmp_path / "upload")
    interrupted = threading.Event()

    def interrupt() -> None:
        _busy_worker(str(tmp_path), time.monotonic() + 120)
        interrupted.set()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    params = _params(upload, repo, auto_labeling=True, essentia_models=str(models))
    with pytest.raises(KeyboardInterrupt):
        prepare(params, tmp_path / "work", processes=2)
    assert interrupted.is_set()
    assert not _processes(str(tmp_path))
    assert not (tmp_path / "work" / "prepare-tmp").exists()
    dataset = tmp_path / "work" / "dataset"
    assert not (dataset / "data.jsonl").exists()
    for clip in (dataset / "clips").iterdir():  # any clip there was whole before it got its name
        assert clip.suffix == ".wav" and not clip.name.startswith(".")
        assert sf.info(str(clip)).frames in (30 * 32000, 10 * 32000)  # 40 s tracks: a 30 s and a 10 s clip
    with pytest.raises(InputError, match="not a prepared dataset"):
        load_prepared(dataset)


def test_how_many_processes_by_default():
    """One per GPU; on the CPU bounded by cores, memory and tracks; one (this process) without vocal removal, where
    the essentia workers take the other cores; a single track is prepared here."""
    gpus = plan(True, "cuda", 10, cores=64, memory_gib=500, gpus=8)
    assert gpus.devices == tuple(f"cuda:{i}" for i in range(8)) and gpus.threads == 8 and gpus.essentia == 8
    assert "one per GPU (8 visible)" in gpus.why
    few = plan(True, "cuda", 3, cores=64, memory_gib=500, gpus=8)
    assert few.devices == ("cuda:0", "cuda:1", "cuda:2") and "3 track(s)" in few.why
    memory = plan(True, "cpu", 10, cores=16, memory_gib=20, gpus=0)
    assert memory.devices == ("cpu",) * 6 and memory.threads == 2 and "20.0 GiB available" in memory.why
    cores = plan(True, "cpu", 10, cores=2, memory_gib=100, gpus=0)
    assert cores.devices == ("cpu", "cpu") and cores.threads == 1 and "2 usable cores" in cores.why
    plain = plan(False, "cpu", 10, cores=16, memory_gib=100, gpus=0)
    assert plain.devices == ("cpu",) and plain.threads is None and plain.essentia == 10
    single = plan(True, "cuda", 1, cores=64, memory_gib=500, gpus=8)
    assert single.devices == ("cuda",) and single.threads is None and "in this process" in single.why
    asked = plan(True, "cpu", 3, processes=5, cores=2, memory_gib=1)
    assert asked.processes == 3 and "5 asked for, bounded by the 3 track(s)" in asked.why
