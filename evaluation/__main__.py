"""`python -m evaluation --dataset HELD_OUT --weights W [W ...] [--training TRAIN] [--json out.json]`

Compare weights (base versions such as `small`, `tiny`, or `trained_model.tar` files, LoRA ones included) on
held-out tracks (an archive, an audio file or a prepared folder) with the trainer's validation loss, the Fréchet
distance of generated samples to the held-out clips (EnCodec latents) and, with `--training`, the copy check: one
table on stdout, everything as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from core.catalogue import SAMPLER_PRECISIONS
from core.errors import cli_errors
from core.logs import configure_logging
from evaluation.compare import compare, format_table
from training.report import finite_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="held-out tracks: archive, audio file or prepared folder")
    parser.add_argument("--weights", nargs="+", required=True, help="base versions and/or trained_model.tar files")
    parser.add_argument("--training", default=None, help="the training tracks, for the copy check (optional)")
    parser.add_argument("--samples", type=int, default=4, help="samples generated per weights (0: no Fréchet)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per generated sample")
    parser.add_argument("--segment", type=float, default=30.0, help="crop length of the validation loss, seconds")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--sampler_precision",
        default="auto",
        choices=SAMPLER_PRECISIONS,
        help="the samples' sampler precision, as predict's input of that name (auto: int8 on CPU, fp16 on CUDA)",
    )
    parser.add_argument("--json", default=None, help="write the whole report as JSON here")
    args = parser.parse_args(argv)
    configure_logging()
    # written as `not 0 < x < inf`: a NaN fails every comparison, so `x <= 0` would let it through
    if args.samples < 0 or not 0 < args.duration < math.inf or not 1.0 <= args.segment <= 30.0:
        print(
            "error: --samples must be >= 0, --duration a finite number > 0 and --segment within 1..30 s",
            file=sys.stderr,
        )
        return 2
    with cli_errors("evaluation") as outcome:
        report = compare(
            args.weights,
            args.dataset,
            training=args.training,
            samples=args.samples,
            duration=args.duration,
            segment=args.segment,
            device=args.device,
            sampler_precision=args.sampler_precision,
        )
        print(format_table(report))
        if args.json:
            Path(args.json).write_text(json.dumps(finite_json(report), indent=1))
            print(f"Wrote {args.json}")
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
