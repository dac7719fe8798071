"""How many processes prepare the tracks, and the pool of track processes itself.

Vocal removal is the slow part of a preparation (htdemucs: seconds per track on a GPU, about twice real time on a
CPU core), so with `drop_vocals` the tracks are spread over one process per GPU, or on the CPU over as many
processes as cores and memory allow (`plan`). Each track process (`python -m preprocessing.track_worker`) loads
demucs once on its device, then takes one track at a time: decode, separate, resample, cut and write the clips into
a folder of its own under the scratch folder. The preparing process hands out the tracks and takes their outcomes
back in upload order (`TrackPool.outcomes`), so names, manifest and report never depend on which process finished
first. Beside them run as many essentia processes (`preprocessing.analysis.Analyzer`).

The protocol is one JSON object per line on the worker's stdin/stdout (its stderr goes to a log file whose tail
explains a crash). A worker that dies (killed for memory, a crash in a native library) closes its stdout: the pool
sees it at once and raises `TrackFailed` naming the track; every worker is stopped when the pool closes, on
success, error, Ctrl-C or a Cog cancel alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import selectors
import signal
import subprocess
import sys
import time
import typing as tp
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from core.errors import DiskError, ModelUnavailableError

logger = logging.getLogger(__name__)

# Peak memory of one htdemucs process on the CPU separating a long track (the model, the track and its four stems at
# 44.1 kHz, demucs' overlap buffers); measured ~1.5 GiB for a 4-minute track, with room for a 10-minute one.
DEMUCS_CPU_GIB = 3.0
ESSENTIA_GIB = 0.5  # one essentia process with the discogs-effnet graph and its heads loaded
MAX_ESSENTIA = 16  # uploads hold tens of tracks: more analysis processes would mostly wait
WORKER_MODULE = "preprocessing.track_worker"
ROOT = Path(__file__).resolve().parents[1]
STOP_SECONDS = 5.0  # how long a worker gets to exit after its input closes before it is killed


class TrackFailed(RuntimeError):
    """Preparing one track failed for a reason that is not the upload's fault (a crash, a worker killed for
    memory); the message names the track and the process."""


@dataclass(frozen=True)
class Plan:
    """`devices`: one per track process (one entry: the tracks are prepared in the preparing process itself);
    `threads`: torch threads per track process (None: the preparing process keeps its own); `essentia`: essentia
    processes; `why`: the log line saying what was chosen and why."""

    devices: tuple[str, ...]
    threads: int | None
    essentia: int
    why: str

    @property
    def processes(self) -> int:
        return len(self.devices)


def plan(
    drop_vocals: bool,
    device: str,
    n_tracks: int,
    processes: int | None = None,
    *,
    cores: int | None = None,
    memory_gib: float | None = None,
    gpus: int | None = None,
) -> Plan:
    """How many processes prepare `n_tracks` tracks with vocal removal on `device` ("cpu" or "cuda"), and how many
    analyse them. `processes` overrides the count (bounded by the tracks, logged). `cores`, `memory_gib` (available)
    and `gpus` default to what this machine has (given in tests)."""
    cores = cores or usable_cores()
    n_tracks = max(1, n_tracks)
    if processes is not None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        n = min(processes, n_tracks)
        why = f"{processes} asked for" + (f", bounded by the {n_tracks} track(s)" if n < processes else "")
    elif not drop_vocals:
        n = 1
        why = "no vocal removal: decoding and cutting take a fraction of a second per track in this process"
    elif device.startswith("cuda"):
        gpus = gpus if gpus is not None else _cuda_count()
        n = max(1, min(gpus, n_tracks))
        why = f"one per GPU ({gpus} visible)" + (f", bounded by the {n_tracks} track(s)" if n < gpus else "")
    else:
        memory_gib = memory_gib if memory_gib is not None else available_memory_gib()
        by_memory = max(1, int(memory_gib // DEMUCS_CPU_GIB))
        n = max(1, min(cores, by_memory, n_tracks))
        bound = min(
            (cores, f"{cores} usable cores"),
            (by_memory, f"{memory_gib:.1f} GiB available at ~{DEMUCS_CPU_GIB:g} GiB per demucs process"),
            (n_tracks, f"{n_tracks} track(s)"),
        )
        why = f"vocal removal on the CPU, bounded by the {bound[1]}"
    on_gpu = drop_vocals and device.startswith("cuda")
    if n == 1:
        devices: tuple[str, ...] = (device,)
        threads = None
    else:
        devices = tuple(f"cuda:{i}" for i in range(n)) if on_gpu else ("cpu",) * n
        threads = max(1, cores // n)
    if drop_vocals or processes is not None:
        essentia = n  # one analysis process beside each track process
    else:
        # This process decodes on one core; key/bpm/tags (the slower half, measured) take the others.
        memory_gib = memory_gib if memory_gib is not None else available_memory_gib()
        essentia = max(1, min(cores - 1, n_tracks, MAX_ESSENTIA, int(memory_gib // ESSENTIA_GIB)))
    where = "in this process" if n == 1 else f"in {n} processes ({', '.join(devices)}), {threads} torch thread(s) each"
    return Plan(devices, threads, essentia, f"Preparing tracks {where}: {why}; {essentia} essentia process(es)")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup CPU quota (a container's `--cpus`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def available_memory_gib() -> float:
    """Memory that can be used without swapping: MemAvailable, bounded by a cgroup v2 limit (a container's)."""
    available = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            available = 8 << 30
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, max(0, int(limit) - used))
    return available / 2**30


def _cuda_count() -> int:
    import torch  # defers torch: the plan without vocal removal needs no torch

    return torch.cuda.device_count()


# ------------------------------------------------------------------------------------------------ the pool


@dataclass
class _Worker:
    index: int
    device: str
    proc: subprocess.Popen
    log_path: Path
    buffer: bytes = b""
    job: int | None = None  # the index of the track it is preparing

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""


class TrackPool:
    """Track processes, one per entry of `devices`, each loading demucs from `repo` (None: no vocal removal).
    `outcomes(jobs)` yields each job's outcome in job order; `close()` stops every process (also on errors)."""

    def __init__(self, devices: tp.Sequence[str], threads: int, repo: Path | None, params: dict, scratch: Path):
        self.workers: list[_Worker] = []
        self.selector = selectors.DefaultSelector()
        config = {"threads": threads, "repo": str(repo) if repo else None, "params": params}
        env = dict(os.environ)
        # Each process gets its share of the cores (OpenMP reads this before torch sets its own thread count).
        env["OMP_NUM_THREADS"] = str(threads)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        try:
            for index, device in enumerate(devices):
                log_path = scratch / f"track-worker-{index}.log"
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(
                        # The log path on the command line names the run's processes (ps, and the tests' check).
                        [sys.executable, "-m", WORKER_MODULE, str(log_path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        env=env,
                        # Ctrl-C in a terminal reaches the whole foreground group: the workers are stopped by this
                        # process instead, in order (and they die with it, see track_worker).
                        start_new_session=True,
                    )
                worker = _Worker(index, device, proc, log_path)
                self.workers.append(worker)
                self._send(worker, {**config, "device": device})
                self.selector.register(proc.stdout, selectors.EVENT_READ, worker)
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Wait until every worker loaded demucs; its load error (a `ModelUnavailableError`) if one could not."""
        waiting = set(range(len(self.workers)))
        while waiting:
            for worker, message in self._messages():
                if message.get("type") == "error":
                    raise ModelUnavailableError(message["message"])
                waiting.discard(worker.index)

    def outcomes(self, jobs: list[dict]) -> tp.Iterator[dict]:
        """Each job's outcome, in the order of `jobs`, while the workers go on with the next ones."""
        pending = deque(range(len(jobs)))
        done: dict[int, dict] = {}
        idle = deque(self.workers)
        rels = [job["rel"] for job in jobs]
        for position in range(len(jobs)):
            while position not in done:
                while idle and pending:
                    worker, job = idle.popleft(), pending.popleft()
                    worker.job = job
                    self._send(worker, {**jobs[job], "job": job})
                for worker, message in self._messages(rels):
                    if message.get("type") == "failed":
                        raise _failure(message, rels[worker.job], worker)
                    done[worker.job] = message["outcome"]
                    worker.job = None
                    idle.append(worker)
            yield done.pop(position)

    def _messages(self, rels: list[str] | None = None) -> tp.Iterator[tuple[_Worker, dict]]:
        """The next complete lines from the workers (blocks until there is one); `TrackFailed` for a worker that
        exited."""
        for key, _ in self.selector.select():
            worker: _Worker = key.data
            chunk = os.read(key.fileobj.fileno(), 1 << 16)
            if not chunk:
                raise self._died(worker, rels)
            worker.buffer += chunk
            *lines, worker.buffer = worker.buffer.split(b"\n")
            for line in lines:
                yield worker, json.loads(line)

    def _died(self, worker: _Worker, rels: list[str] | None) -> TrackFailed:
        code = worker.proc.wait()
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        doing = f"while preparing {rels[worker.job]}" if rels is not None and worker.job is not None else "at start"
        hint = " (most often: the machine ran out of memory)" if code == -signal.SIGKILL else ""
        tail = worker.log_tail()
        return TrackFailed(
            f"the track process {worker.index} on {worker.device} {how}{hint} {doing}; the preparation stopped. "
            + (f"Its log ends with: {tail}" if tail else "It wrote nothing to its log.")
        )

    def _send(self, worker: _Worker, message: dict) -> None:
        assert worker.proc.stdin is not None
        try:
            worker.proc.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
            worker.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(worker, None) from None

    def close(self) -> None:
        """Stop every worker: input closed (a worker between tracks exits at once), then killed after
        `STOP_SECONDS` or at once when one is still busy (an error or an interrupt stopped the preparation)."""
        busy = any(w.job is not None for w in self.workers)
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.proc.stdin.close()
            if busy:
                worker.proc.kill()
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            with contextlib.suppress(OSError, ValueError):
                worker.proc.stdout.close()
        self.selector.close()


def _failure(message: dict, rel: str, worker: _Worker) -> Exception:
    """A worker's report of an exception while preparing `rel`, as the error the preparing process raises: a full
    disk stays a `DiskError` (one line at the CLI), anything else names the track and the process."""
    if message.get("error_type") == "DiskError":
        return DiskError(message["message"])
    logger.error("The track process %d failed on %s:\n%s", worker.index, rel, message.get("traceback", ""))
    return TrackFailed(
        f"preparing {rel} failed in the track process {worker.index} on {worker.device}: "
        f"{message.get('error_type')}: {message.get('message')}"
    )
