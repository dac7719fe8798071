"""Benchmark: real-time factor of dataset preparation (unpack + decode + resample + cut + write + key/bpm),
without vocal removal and without tags, on a synthesized upload that looks like a real one (mostly mp3 and wav,
44.1/48 kHz stereo, a few minutes per track, zipped).

    .venv/bin/python bench/prepare.py [--minutes 20] [--tracks 8] [--repeat 1]

Prints the real-time factor measured in this run (seconds of audio prepared per second of wall time; goal >= 50)
and appends one JSON line to bench/results/prepare.jsonl.

    .venv/bin/python bench/prepare.py --demucs [--processes 1 2] [--minutes 1] [--tracks 4]

The vocal removal run: the same upload prepared with drop_vocals by a random-weight htdemucs at its real size
(HTDemucs' defaults, ~42 M parameters: the speed of the real weights), once per process count (`prepare(...,
processes=n)`: one process per GPU, or the CPU's cores shared among n processes), printing the real-time factor of
each and its ratio to the first, all from this run; one JSON line `prepare_demucs` in the same results file.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import append_result, machine_name  # noqa: E402
from core.params import from_kwargs  # noqa: E402
from preprocessing import PrepareParams, prepare  # noqa: E402

GOAL = 50.0
# (extension, sample rate, share of the tracks): a typical upload is mostly mp3 and wav.
MIX = [(".mp3", 44100), (".wav", 44100), (".mp3", 44100), (".flac", 48000), (".wav", 48000), (".m4a", 44100)]


def music_like(seconds: float, sr: int, seed: int) -> np.ndarray:
    """`[T, 2]` float32: chords changing every beat, a noise-burst beat and some hiss (so encoders and the
    analysis have real work, unlike a pure tone)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    bpm = 90 + 10 * (seed % 5)
    beat = 60.0 / bpm
    root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
    step = (t // beat).astype(int) % 4
    chord = root * np.array([1.0, 1.26, 1.5, 1.68])[step]
    sig = 0.2 * np.sin(2 * np.pi * chord * t) + 0.1 * np.sin(2 * np.pi * 1.5 * chord * t)
    env = np.exp(-(t % beat) / 0.02)
    sig += 0.3 * env * rng.standard_normal(n) + 0.01 * rng.standard_normal(n)
    stereo = np.stack([sig, np.roll(sig, 200)], axis=1)
    return (0.5 * stereo).astype(np.float32)


def build_upload(folder: Path, minutes: float, n_tracks: int) -> tuple[Path, float]:
    from tests.preprocessing.audio_files import write_audio

    seconds_each = minutes * 60 / n_tracks
    files = []
    for i in range(n_tracks):
        ext, sr = MIX[i % len(MIX)]
        path = folder / "src" / f"artist {i % 3}" / f"track {i:02d}{ext}"
        write_audio(path, music_like(seconds_each, sr, seed=i), sr)
        files.append(path)
    upload = folder / "upload.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f.relative_to(folder / "src").as_posix())
    return upload, seconds_each * n_tracks


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished children (the essentia worker)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def demucs_run(args: argparse.Namespace) -> int:
    """Vocal removal with a real-size random htdemucs, once per process count in `args.processes`."""
    import torch
    from demucs.htdemucs import HTDemucs  # noqa: F401 - fails here, before the upload is built, without demucs

    from core.tiny import save_htdemucs_repo
    from preprocessing.workers import plan

    sources = ["drums", "bass", "other", "vocals"]
    with tempfile.TemporaryDirectory(prefix="bench-prepare-demucs-") as tmp:
        tmp = Path(tmp)
        repo = save_htdemucs_repo(tmp / "htdemucs", kwargs={"sources": sources, "samplerate": 44100})
        upload, audio_seconds = build_upload(tmp, args.minutes, args.tracks)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"upload: {args.tracks} tracks, {audio_seconds / 60:.1f} min; random htdemucs at its real size on "
              f"{device}, torch threads in this process: {torch.get_num_threads()}")  # fmt: skip
        params = from_kwargs(
            PrepareParams, dataset_path=str(upload), drop_vocals=True, auto_labeling=False, demucs_repo=str(repo)
        )
        rows = []
        for n in args.processes:
            chosen = plan(True, device, args.tracks, processes=n)
            start = time.perf_counter()
            dataset = prepare(params, tmp / f"work{n}", processes=n)
            wall = time.perf_counter() - start
            rows.append({"processes": n, "threads_each": chosen.threads, "wall_seconds": round(wall, 2),
                         "real_time_factor": round(audio_seconds / wall, 3), "clips": len(dataset.clips),
                         "stage_seconds": dataset.report["timings"]})  # fmt: skip
            print(f"{n} process(es): {wall:.1f} s = {audio_seconds / wall:.3f}x real time "
                  f"({chosen.why})")  # fmt: skip
    base = rows[0]["real_time_factor"]
    print(f"\nvocal removal (random htdemucs, real size), {audio_seconds / 60:.1f} min of audio on {machine_name()}:")
    for row in rows:
        row["ratio"] = round(row["real_time_factor"] / base, 2)
        print(f"  {row['processes']} process(es): {row['real_time_factor']:.3f}x real time, "
              f"{row['ratio']:.2f}x the {rows[0]['processes']}-process run")  # fmt: skip
    append_result(
        args.results,
        {
            "bench": "prepare_demucs",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit(),
            "machine": machine_name(),
            "device": device,
            "audio_seconds": round(audio_seconds, 1),
            "tracks": args.tracks,
            "load_average_before": round(os.getloadavg()[0], 2),
            "runs": rows,
            "settings": "drop_vocals=true auto_labeling=false, random-weight htdemucs (HTDemucs defaults)",
        },
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="total minutes of audio (20; 1 with --demucs)")
    parser.add_argument("--tracks", type=int, default=None, help="tracks in the upload (8; 4 with --demucs)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported (and the best)")
    parser.add_argument("--demucs", action="store_true", help="the vocal removal run, per process count")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (with --demucs)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "prepare.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.demucs:
        args.minutes = args.minutes if args.minutes is not None else 1.0
        args.tracks = args.tracks if args.tracks is not None else 4
        return demucs_run(args)
    args.minutes = args.minutes if args.minutes is not None else 20.0
    args.tracks = args.tracks if args.tracks is not None else 8
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        upload, audio_seconds = build_upload(tmp, args.minutes, args.tracks)
        print(f"upload: {args.tracks} tracks, {audio_seconds / 60:.1f} min, {upload.stat().st_size / 2**20:.1f} MiB "
              f"zip (built in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
        params = from_kwargs(PrepareParams, dataset_path=str(upload), drop_vocals=False, auto_labeling=False)
        runs = []
        load_before = os.getloadavg()[0]
        for r in range(args.repeat):
            cpu_main, cpu_worker = _cpu()
            start = time.perf_counter()
            dataset = prepare(params, tmp / f"work{r}")
            wall = time.perf_counter() - start
            cpu_main, cpu_worker = (a - b for a, b in zip(_cpu(), (cpu_main, cpu_worker), strict=True))
            runs.append((wall, cpu_main, cpu_worker, dataset.report))
            print(f"run {r + 1}: {wall:.2f} s wall = {audio_seconds / wall:.1f}x real time; CPU: preparing process "
                  f"{cpu_main:.2f} s, essentia worker {cpu_worker:.2f} s; {len(dataset.clips)} clips; "
                  f"stages {dataset.report['timings']}")  # fmt: skip
    runs.sort(key=lambda x: x[0])
    wall, cpu_main, cpu_worker, report = runs[len(runs) // 2]
    best = runs[0][0]
    rtf = audio_seconds / wall
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "bench": "prepare",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine_name(),
        "audio_seconds": round(audio_seconds, 1),
        "tracks": args.tracks,
        "clips": report["clips"],
        "wall_seconds": round(wall, 3),
        "real_time_factor": round(rtf, 1),
        "best_real_time_factor": round(audio_seconds / best, 1),
        # CPU seconds each process spent: on an idle machine the two run side by side (one core each), so
        # audio / max(cpu) bounds the real-time factor there; a loaded machine (see load_average) reads lower.
        "cpu_seconds_main": round(cpu_main, 2),
        "cpu_seconds_worker": round(cpu_worker, 2),
        "cpu_bound_real_time_factor": round(audio_seconds / max(cpu_main, cpu_worker, 1e-9), 1),
        "load_average_before": round(load_before, 2),
        "goal_real_time_factor": GOAL,
        "meets_goal": rtf >= GOAL,
        "stage_seconds": report["timings"],
        "runs": len(runs),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "settings": "drop_vocals=false auto_labeling=false (decode+resample+cut+write+key/bpm)",
    }
    print(
        f"\nprepare: {audio_seconds / 60:.1f} min of audio in {wall:.2f} s (median of {len(runs)}) = {rtf:.1f}x real "
        f"time, best {result['best_real_time_factor']}x (goal >= {GOAL:.0f}x: {'met' if rtf >= GOAL else 'NOT met'}) "
        f"on {result['machine']}, load average {load_before:.1f} before the runs\n"
        f"CPU: {cpu_main:.2f} s preparing + {cpu_worker:.2f} s essentia worker (in parallel) -> "
        f"{result['cpu_bound_real_time_factor']}x real time when each has a free core"
    )
    append_result(args.results, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
