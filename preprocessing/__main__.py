"""`python -m preprocessing DATASET OUT_DIR [--flags]`: prepare a dataset alone, outside training.

Flags are the fields of `PrepareParams` (the same names as the Cog train inputs); booleans take a value
(`--drop_vocals false`) or the `--no-<name>` form (`--no-drop_vocals`). The dataset lands in `OUT_DIR/dataset/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from core.errors import USER_ERRORS
from core.params import build_parser, from_kwargs
from preprocessing.params import PrepareParams
from preprocessing.prepare import prepare, summary


def parser() -> argparse.ArgumentParser:
    p = build_parser(PrepareParams, prog="python -m preprocessing", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", nargs="?", help="same as --dataset_path")
    p.add_argument("out_dir", nargs="?", help="same as --output_dir")
    p.add_argument("--output_dir", default=None, help="folder to write into (the dataset goes to OUT_DIR/dataset)")
    for f in dataclasses.fields(PrepareParams):
        if f.type in (bool, "bool"):
            p.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", help=f"same as --{f.name} false")
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a container stop), turned into the same orderly exit as Ctrl-C: prepare()'s cleanup runs."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = vars(parser().parse_args(argv))
    dataset, out_dir, output_dir = args.pop("dataset"), args.pop("out_dir"), args.pop("output_dir")
    if dataset and args.get("dataset_path") and dataset != args["dataset_path"]:
        print("error: give the dataset once (positional or --dataset_path)", file=sys.stderr)
        return 2
    args["dataset_path"] = args.get("dataset_path") or dataset
    output_dir = output_dir or out_dir
    if not output_dir:
        print("error: say where to write: OUT_DIR or --output_dir", file=sys.stderr)
        return 2
    # Signal handlers can only be set from the main thread (main() may be called from another one).
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    try:
        params = from_kwargs(PrepareParams, **args)
        dataset_out = prepare(params, output_dir)
    except USER_ERRORS as e:  # bad input, a missing model, a full disk (DiskError names the file)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Like a shell command stopped by Ctrl-C: one line and 128 + the signal, not a traceback. prepare() has
        # already removed its work folders; there is nothing to resume (preparation restarts from the upload).
        how = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        print(
            f"\n{how}: preparing {args['dataset_path']} into {output_dir} was stopped before it finished; "
            "nothing usable was written (the unfinished dataset/ folder is replaced on the next run). Run the same "
            "command again to start over.",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    except OSError as e:  # a disk that fills up or a folder that turns read-only mid-run: say so in one line
        print(f"error: preparation stopped: {e}", file=sys.stderr)
        return 1
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    print(summary(dataset_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
