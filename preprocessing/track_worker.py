"""One track process of a preparation (started by `preprocessing.workers.TrackPool`, never by hand):

    python -m preprocessing.track_worker LOG_PATH   < a config line, then one track per line

The first line configures it (`device`, `threads`, `repo`: the demucs repo folder or null, `params`: the
PrepareParams); it loads demucs there and answers `{"type": "ready"}` (or `{"type": "error", "message"}`). Then per
line `{"job", "rel", "path", "out"}` it prepares that track with `preprocessing.prepare.prepare_track` (decode,
separate, resample, cut, clips written into `out`) and answers `{"type": "done", "outcome"}` or `{"type": "failed",
"error_type", "message", "traceback"}`. It exits when its input closes, and with the preparing process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from core.errors import ModelUnavailableError
from preprocessing.params import PrepareParams
from preprocessing.prepare import prepare_track
from preprocessing.vocals import VocalRemover


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the preparing process dies (even by SIGKILL): no orphan keeps a GPU or
    the cores busy. Elsewhere a closed input ends it after the current track."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)


def main() -> int:
    _die_with_parent()
    # Ctrl-C belongs to the preparing process, which stops the workers itself (they run in their own session too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The replies keep stdout to themselves: anything a library prints goes to the log (stderr) instead.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    config = json.loads(sys.stdin.readline())
    torch.set_num_threads(int(config["threads"]))
    params = PrepareParams(**config["params"])
    remover = None
    if config.get("repo"):
        try:
            remover = VocalRemover(Path(config["repo"]), config["device"])
        except ModelUnavailableError as e:
            reply({"type": "error", "message": str(e)})
            return 1
    reply({"type": "ready"})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        print(f"preparing {job['rel']}", file=sys.stderr, flush=True)
        try:
            outcome = prepare_track(job["rel"], Path(job["path"]), Path(job["out"]), params, remover)
        except Exception as e:  # noqa: BLE001 - reported to the preparing process, which stops with it
            traceback.print_exc()
            reply(
                {
                    "type": "failed",
                    "job": job["job"],
                    "error_type": type(e).__name__,
                    "message": str(e),
                    "traceback": traceback.format_exc(),
                }
            )
            continue
        reply({"type": "done", "job": job["job"], "outcome": outcome.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
