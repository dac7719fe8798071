"""Track analysis from the preparing process: starts `essentia_worker.py` in a subprocess, feeds it each
track's clips as they are written (so it works on the second core while this process decodes the next track) and
collects key, bpm and tags.

Model files for the tags (genre_discogs400, mtg_jamendo_moodtheme, mtg_jamendo_instrument on discogs-effnet
embeddings) are looked for in `essentia_models` / `$MGFT_ESSENTIA_MODELS` / `$MGFT_CACHE/essentia`; when they are
missing, one warning says how to get them and only key and bpm are computed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.progress import progress_bar

logger = logging.getLogger(__name__)

ENV_MODELS = "MGFT_ESSENTIA_MODELS"
WORKER = Path(__file__).with_name("essentia_worker.py")
MODELS_URL = "https://essentia.upf.edu/models"

EMBEDDINGS = {
    "pb": "discogs-effnet-bs64-1.pb",
    "input": "serving_default_melspectrogram",
    "output": "PartitionedCall:1",
    "url": f"{MODELS_URL}/feature-extractors/discogs-effnet/discogs-effnet-bs64-1.pb",
}
# family -> model files, graph node names, and the score a label needs (thresholds as in sakemin's trainer).
HEADS = {
    "genre": {
        "name": "genre_discogs400-discogs-effnet-1",
        "folder": "genre_discogs400",
        "input": "serving_default_model_Placeholder",
        "output": "PartitionedCall:0",
        "threshold": 0.1,
        "top": 2,
        "n_classes": 400,
    },
    "moods": {
        "name": "mtg_jamendo_moodtheme-discogs-effnet-1",
        "folder": "mtg_jamendo_moodtheme",
        "input": "model/Placeholder",
        "output": "model/Sigmoid",
        "threshold": 0.05,
        "top": 3,
        "n_classes": 56,
    },
    "instruments": {
        "name": "mtg_jamendo_instrument-discogs-effnet-1",
        "folder": "mtg_jamendo_instrument",
        "input": "model/Placeholder",
        "output": "model/Sigmoid",
        "threshold": 0.1,
        "top": 3,
        "n_classes": 40,
    },
}


def head_urls() -> list[str]:
    """Every file the tagger needs, as public URLs (for the Cog build step and the docs)."""
    urls = [EMBEDDINGS["url"]]
    for head in HEADS.values():
        base = f"{MODELS_URL}/classification-heads/{head['folder']}/{head['name']}"
        urls += [f"{base}.pb", f"{base}.json"]
    return urls


def default_models_dir() -> Path:
    cache = Path(os.environ.get("MGFT_CACHE", Path.home() / ".cache" / "musicgen-ft"))
    return cache / "essentia"


@dataclass(frozen=True)
class EssentiaModels:
    folder: Path
    missing: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.missing

    def worker_config(self) -> dict:
        heads = {}
        for family, head in HEADS.items():
            heads[family] = {
                "pb": str(self.folder / f"{head['name']}.pb"),
                "json": str(self.folder / f"{head['name']}.json"),
                "input": head["input"],
                "output": head["output"],
                "threshold": head["threshold"],
                "top": head["top"],
            }
        emb = {k: EMBEDDINGS[k] for k in ("input", "output")}
        return {"embeddings": {**emb, "pb": str(self.folder / EMBEDDINGS["pb"])}, "heads": heads}


def resolve_models(essentia_models: str | None) -> EssentiaModels:
    folder = Path(essentia_models or os.environ.get(ENV_MODELS) or default_models_dir()).expanduser()
    needed = [EMBEDDINGS["pb"]] + [f"{h['name']}{ext}" for h in HEADS.values() for ext in (".pb", ".json")]
    missing = tuple(n for n in needed if not (folder / n).is_file())
    return EssentiaModels(folder=folder, missing=missing)


def missing_models_message(models: EssentiaModels) -> str:
    return (
        f"Auto-labeling: essentia model files missing in {models.folder} ({', '.join(models.missing)}); genre, "
        f"mood and instrument tags are skipped, key and bpm are still computed. To enable tags, download them from "
        f"{MODELS_URL} (see docs/preprocessing.md) into that folder or point ${ENV_MODELS} at a folder holding them."
    )


class _Process:
    """One essentia worker: its process, the requests it was given, its results and log files."""

    def __init__(self, scratch: Path, tagger: dict | None, name: str):
        self.results_path = scratch / f"{name}.jsonl"
        self.log_path = scratch / f"{name}.log"
        config_path = scratch / f"{name}-config.json"
        config_path.write_text(json.dumps({"results": str(self.results_path), "tagger": tagger}), encoding="utf-8")
        self.results_path.write_text("")
        env = dict(os.environ)
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        # One core for each worker, the others for decoding (and separating) in the track processes.
        env.setdefault("OMP_NUM_THREADS", "1")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(config_path)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.submitted = 0
        self.load = 0  # clips given: what the next track goes by
        self.broken: str | None = None
        self.done = 0
        self.last_progress = time.monotonic()

    def submit(self, line: str, clips: int) -> None:
        if self.broken:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line.encode("utf-8"))
            self.proc.stdin.flush()
            self.submitted += 1
            self.load += max(1, clips)
        except (BrokenPipeError, OSError) as e:
            self.broken = f"the essentia worker stopped ({e}): {self.log_tail()}"

    def read(self) -> list[dict]:
        out = []
        for line in self.results_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a line being written
        return out

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def close_input(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


class Analyzer:
    """The essentia workers of a whole preparation (`processes` of them, each track to the one with the fewest
    clips so far). `submit()` per track, then `collect()` once. Each track is analysed alone, so the results do
    not depend on the number of workers."""

    def __init__(self, scratch: Path, tagger: dict | None, processes: int = 1):
        scratch.mkdir(parents=True, exist_ok=True)
        names = ["analysis"] if processes <= 1 else [f"analysis-{i}" for i in range(processes)]
        self.workers: list[_Process] = []
        try:
            for name in names:
                self.workers.append(_Process(scratch, tagger, name))
        except BaseException:
            self.close()
            raise

    @property
    def submitted(self) -> int:
        return sum(w.submitted for w in self.workers)

    def submit(self, track_id: str, clips: list[Path], tags: bool, embed: Path | None = None) -> None:
        """Analyse a track (key, bpm, and `tags`), or with `embed` save its discogs-effnet embeddings there."""
        request = {"id": track_id, "clips": [str(p) for p in clips], "tags": tags}
        line = json.dumps({**request, "embed": str(embed)} if embed is not None else request) + "\n"
        worker = min((w for w in self.workers if not w.broken), key=lambda w: w.load, default=self.workers[0])
        worker.submit(line, len(clips))

    def collect(self, timeout_per_track: float = 600.0) -> tuple[dict[str, dict], dict, list[str]]:
        """Wait for the workers: `(results by track id, status, warnings)`. Never raises for a worker failure:
        labels are an extra, and their absence is reported as a warning."""
        warnings: list[str] = []
        try:
            for worker in self.workers:
                worker.close_input()
                worker.last_progress = time.monotonic()
            with progress_bar(
                total=self.submitted, desc="Analyzing (key/bpm/tags)", unit="track", mininterval=1
            ) as bar:
                running, stalled = list(self.workers), []
                while running:
                    for worker in list(running):
                        exited = worker.proc.poll() is not None
                        n = sum(1 for r in worker.read() if r.get("type") == "track")
                        if n > worker.done:
                            bar.update(n - worker.done)
                            worker.done = n
                            worker.last_progress = time.monotonic()
                        if exited:
                            running.remove(worker)
                        elif time.monotonic() - worker.last_progress > timeout_per_track:
                            worker.proc.kill()
                            warnings.append(f"the essentia worker made no progress for {timeout_per_track:.0f} s")
                            running.remove(worker)
                            stalled.append(worker)
                    time.sleep(0.05)
            for worker in self.workers:
                if worker.proc.wait() != 0 and worker not in stalled:
                    warnings.append(f"the essentia worker failed (exit {worker.proc.returncode}): {worker.log_tail()}")
        finally:
            self.close()
        warnings += [w.broken for w in self.workers if w.broken]
        records = [r for w in self.workers for r in w.read()]
        statuses = [r for r in records if r.get("type") == "status"]
        status = dict(statuses[0]) if statuses else {}
        for other in statuses[1:]:  # the same models in every worker: the same status, unless one failed to load
            status["errors"] = {**(other.get("errors") or {}), **(status.get("errors") or {})}
        results: dict[str, dict] = {}
        for r in records:
            if r.get("type") != "track":
                continue
            if r.get("error"):
                warnings.append(f"analysis of {r.get('id')} failed: {r['error']}")
                continue
            results[r["id"]] = r
        return results, status, warnings

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
