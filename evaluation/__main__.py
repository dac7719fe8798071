"""`python -m evaluation --dataset HELD_OUT --weights W [W ...] [--training TRAIN] [--json out.json]`

Compare weights (base versions such as `small`, `tiny`, `trained_model.tar` files, LoRA ones included, or fine-tunes
in transformers' format: a MusicGen or PEFT adapter folder, or its Hugging Face repo id) on
held-out tracks (an archive, an audio file or a prepared folder) with the trainer's validation loss, the Fréchet
distance of generated samples to the held-out clips (EnCodec latents; and in CLAP's space with the KAD, beside
CLAP prompt adherence, when `laion/larger_clap_music` is cached), each sample's health flags (silence, clipping,
DC, noise, loop, static; "indistinguishable" from the first weights) and, with `--training`, the copy checks: one
table on stdout, everything as JSON with `--json`, the samples as WAV files with `--samples_dir`.

`--segment` and `--duration` default to what the first trained tar's training report used (the table says what
was used and where from). Where `--json` and `--samples_dir` go is checked (and created) before any work; the JSON
is written to a temporary name and renamed, and if that fails it is kept in the temporary folder, never lost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from core.catalogue import SAMPLER_PRECISIONS
from core.errors import cli_errors
from core.logs import configure_logging
from evaluation.clap import CLAP_REPO
from evaluation.compare import MAX_SAMPLES, check_destination, compare, format_table
from generation.params import MAX_DURATION
from training.export import write_beside
from training.report import finite_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="held-out tracks: archive, audio file or prepared folder")
    parser.add_argument(
        "--weights",
        nargs="+",
        required=True,
        help="base versions, trained_model.tar files, transformers MusicGen or PEFT adapter folders or repo ids",
    )
    parser.add_argument("--training", default=None, help="the training tracks, for the copy check (optional)")
    parser.add_argument(
        "--samples", type=int, default=4, help=f"samples generated per weights, 0..{MAX_SAMPLES} (0: no Fréchet)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds per generated sample, at most {MAX_DURATION} (default: the trained tar's sample_duration, "
        "else 8)",
    )
    parser.add_argument(
        "--segment",
        type=float,
        default=None,
        help="crop length of the validation loss, 1..30 s (default: the trained tar's segment_duration, as its "
        "report; else 30)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--sampler_precision",
        default="auto",
        choices=SAMPLER_PRECISIONS,
        help="the samples' sampler precision, as predict's input of that name (auto: int8 on CPU, fp16 on CUDA)",
    )
    parser.add_argument(
        "--clap",
        default=CLAP_REPO,
        help="the CLAP model of the prompt adherence and CLAP distances: a Hugging Face repo read from the local "
        "cache or a local folder (default %(default)s; 'none': skip them)",
    )
    parser.add_argument("--json", default=None, help="write the whole report as JSON here")
    parser.add_argument(
        "--samples_dir", default=None, help="write the samples here as WAV, normalized as predict's outputs"
    )
    args = parser.parse_args(argv)
    configure_logging()
    # written as `not low <= x <= high`: a NaN fails every comparison, so `x <= 0` would let it through
    bad = []
    if not 0 <= args.samples <= MAX_SAMPLES:
        bad.append(f"--samples must be within 0..{MAX_SAMPLES}")
    if args.duration is not None and not 0 < args.duration <= MAX_DURATION:
        bad.append(f"--duration must be a number of seconds > 0, at most {MAX_DURATION}")
    if args.segment is not None and not 1.0 <= args.segment <= 30.0:
        bad.append("--segment must be within 1..30 s")
    if bad:
        print(f"error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    with cli_errors("evaluation") as outcome:
        destination = check_destination(args.json, "json", folder=False) if args.json else None
        report = compare(
            args.weights,
            args.dataset,
            training=args.training,
            samples=args.samples,
            duration=args.duration,
            segment=args.segment,
            device=args.device,
            sampler_precision=args.sampler_precision,
            samples_dir=args.samples_dir,
            clap=None if args.clap.lower() == "none" else args.clap,
        )
        print(format_table(report))
        if destination is not None:
            outcome.code = write_report(destination, report)
    return outcome.code


def write_report(destination: Path, report: dict) -> int:
    """The JSON report at `destination` (temp name, then rename); if that fails after all the work, in the
    temporary folder instead, saying where: 0 when it is at `destination`, 1 otherwise."""
    data = json.dumps(finite_json(report), indent=1).encode()
    try:
        write_beside(destination.parent, {destination.name: data})
    except OSError as e:
        fd, kept = tempfile.mkstemp(prefix="evaluation-", suffix=".json")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        print(
            f"error: could not write {destination} ({e.strerror or e}); the report is kept in {kept}", file=sys.stderr
        )
        return 1
    print(f"Wrote {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
