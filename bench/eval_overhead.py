"""Benchmark: what validation adds to a training run's time at the default `eval_every` (issue 14: at most 10 %).

    .venv/bin/python bench/eval_overhead.py [--arch tiny] [--tracks 20] [--epochs 3] [--updates_per_epoch 100]
                                            [--batch_size 16] [--segment 30]

The dataset is the demo style (`preprocessing.demo`, `--tracks` tracks of 30 s); the default validation_split (0.1)
holds out 10 % of the tracks. The training clips train once, with the evaluator at the default `eval_every` 0 (the
base model, then each epoch's end). What validation adds is measured inside that one run: the evaluations' time
(forwards, best-weights copies) against the rest of `train_loop`, so both parts see the same machine load; loading
and encoding are the same with and without it. The defaults are a default run's inputs (3 epochs x 100 steps,
batch 16, 30 s crops); on a CPU use `--arch tiny` (random tiny model) and fewer steps for a quick look: a run
evaluates `epochs + 1` times whatever its steps, so the share grows as `updates_per_epoch` shrinks, and the
printed estimate at 100 steps per epoch scales the measured training time to them.

Why it stays small: an evaluation is 2 forwards (conditional, unconditional) per validation crop, a step is a
forward and a backward (about 3 forwards) of `batch_size` crops. A default run (300 steps x 16 crops, 4
evaluations) spends about 4 x 2 x V / (300 x 16 x 3) = V / 1800 of its time evaluating V crops: under 10 % up to
180 validation crops, i.e. 10 % of a dataset of up to ~1800 clips of 30 s (15 hours of audio).

Samples during training (issue 22): at each evaluation a few held-out prompts are generated
(training/evaluate.py `TrainingSamples`, `--sample_seconds` each; 0 turns them off), within their bound of
`TIMELINE_SHARE` (5 %) of the training time so far. Their time is measured apart from the loss's and printed as its
own ratio, and the two together against the goal of 10 %.

Prints the times and the overhead, and appends one JSON line to bench/results/eval_overhead.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny", help="model_version to train (tiny: offline, random weights)")
    parser.add_argument("--tracks", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--updates_per_epoch", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--segment", type=float, default=30.0)
    parser.add_argument(
        "--sample_seconds", type=float, default=4.0, help="length of the samples during training (0: none)"
    )
    parser.add_argument("--no_save", action="store_true", help="do not append to bench/results/eval_overhead.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from common import git_commit, machine_name  # bench/common.py

    from core.params import from_kwargs
    from preprocessing import demo
    from training.dist import DistInfo
    from training.evaluate import TIMELINE_SHARE
    from training.loop import train_loop
    from training.params import TrainParams
    from training.run import prepare_dataset, setup_training

    with tempfile.TemporaryDirectory(prefix="eval-overhead-") as tmp:
        root = Path(tmp)
        archive = demo.write_demo(root / "demo.zip", tracks=args.tracks, seconds=30.0)
        params = from_kwargs(
            TrainParams,
            dataset_path=str(archive),
            model_version=args.arch,
            auto_labeling=False,
            drop_vocals=False,
            epochs=args.epochs,
            updates_per_epoch=args.updates_per_epoch,
            batch_size=args.batch_size,
            segment_duration=args.segment,
            sample_duration=args.sample_seconds,  # also the audio check's base samples, made before train_loop
        )
        dataset = prepare_dataset(params, root / "work")
        setup = setup_training(params, dataset, root / "out", DistInfo())
        evaluator = setup.evaluator
        if evaluator is None:
            raise SystemExit(f"--tracks {args.tracks}: too few tracks for a validation split")
        started = time.perf_counter()
        train_loop(setup.model.lm, setup.tokens, params, setup.plan, DistInfo(), root / "ck", evaluator=evaluator)
        total = time.perf_counter() - started
    samples = evaluator.samples
    sample_s = samples.spent if samples is not None else 0.0
    sampled = [e for e in samples.entries if "seconds" in e] if samples is not None else []
    # What validation adds, measured inside the one run (the machine's load is the same for both parts): the
    # evaluations (forwards, the all-reduce, copying the best weights) against the rest of train_loop.
    plan = setup.plan
    n_evals = len(evaluator.history)
    training = total - evaluator.seconds - sample_s
    overhead = evaluator.seconds / training
    sample_overhead = sample_s / training
    # The same evaluations over a default run's 100 steps per epoch: training time scales with the steps; the samples
    # at every evaluation, up to their bound.
    training_at_default = training / plan.total_steps * args.epochs * 100
    at_default = evaluator.seconds / training_at_default
    per_sampling = sample_s / len(sampled) if sampled else 0.0
    samples_at_default = min(per_sampling * n_evals, TIMELINE_SHARE * training_at_default) / training_at_default
    result = {
        "benchmark": "eval_overhead",
        "date": datetime.date.today().isoformat(),
        "machine": machine_name(),
        "commit": git_commit(),
        "arch": args.arch,
        "tracks": args.tracks,
        "validation_clips": len(evaluator.tokens),
        "validation_crops": len(evaluator.crops),
        "training_clips": len(setup.clips),
        "steps": plan.total_steps,
        "batch": plan.global_batch,
        "segment_s": args.segment,
        "evaluations": n_evals,
        "train_s": round(training, 2),
        "eval_s": round(evaluator.seconds, 2),
        "overhead": round(overhead, 4),
        "overhead_at_100_steps_per_epoch": round(at_default, 4),
        "sample_seconds": args.sample_seconds,
        "samples_made": len(sampled),
        "samples_s": round(sample_s, 2),
        "samples_overhead": round(sample_overhead, 4),
        "samples_overhead_at_100_steps_per_epoch": round(samples_at_default, 4),
        "total_overhead": round(overhead + sample_overhead, 4),
        "goal": 0.10,
    }
    print(
        f"{args.arch}: {plan.total_steps} steps x batch {plan.global_batch} x {args.segment:g} s on "
        f"{len(setup.clips)} clips; {n_evals} evaluations of {len(evaluator.crops)} crops "
        f"({len(evaluator.tokens)} held-out clips)\n"
        f"training {training:.1f} s, evaluations {evaluator.seconds:.1f} s: validation adds {100 * overhead:.1f} %; "
        f"at 100 steps per epoch: {100 * at_default:.1f} % (goal <= 10 %)\n"
        f"samples during training: {len(sampled)} of {n_evals} evaluations, {sample_s:.1f} s "
        f"({per_sampling:.1f} s each): they add {100 * sample_overhead:.1f} % (bound {100 * TIMELINE_SHARE:.0f} %); "
        f"at 100 steps per epoch: {100 * samples_at_default:.1f} %\n"
        f"evaluation cost in all: {100 * (overhead + sample_overhead):.1f} % of the training "
        f"(at 100 steps per epoch: {100 * (at_default + samples_at_default):.1f} %; goal <= 10 %)"
    )
    if not args.no_save:
        out = ROOT / "bench" / "results" / "eval_overhead.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
