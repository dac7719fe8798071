"""The torchrun entry of one training worker: `python -m training.worker --params_json ...`, started by
`run_training` (one per GPU), or by hand on each node of a multi-node run (docs/training.md).

Its first act is to take the secrets `run_training` hands over in the environment (training/worker_env.py) out of
it, before anything else is imported: importing the training code starts processes (audiocraft imports
torchmetrics, which imports matplotlib, which runs `fc-list` to build its font cache), and a started process
inherits the environment as it is at that moment.
"""

from __future__ import annotations

import sys

from training.worker_env import pop_secret_env


def main(argv: list[str] | None = None) -> int:
    secrets = pop_secret_env()
    # defers torch, audiocraft and the processes their imports start, until the secrets are out of the environment
    from training.run import worker_main

    return worker_main(argv, secrets)


if __name__ == "__main__":
    sys.exit(main())
