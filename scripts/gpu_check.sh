#!/usr/bin/env bash
# GPU self-check (issue 15, bench/README.md "GPU self-check"): training in bf16/fp16, torchrun DDP/FSDP on NCCL,
# the fp16 fast sampler vs audiocraft, CUDA peak memory, training throughput (MFU) and the real Cog server, on tiny
# and random-weight models of the real architectures. No network. Prints one table; appends a JSON line to bench/results/gpu_check.jsonl.
#
#   scripts/gpu_check.sh [--sections train,dist,sampler,memory,throughput,cog] [--budget-scale 1.5] [--out FILE]
#
# Exit status: 0 no row failed, 1 some row failed, 77 no CUDA device (nothing checked; the message says so).
# Python: $GPU_CHECK_PYTHON, else the project's .venv, else python3 (a GPU machine's own torch, with the project's
# other dependencies installed or on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY="$(command -v "$GPU_CHECK_PYTHON")" || { echo "gpu_check: GPU_CHECK_PYTHON=$GPU_CHECK_PYTHON not found" >&2; exit 2; }
elif [ -x .venv/bin/python ]; then
    PY="$PWD/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
# The Cog server starts its worker as a bare `python` from PATH: that interpreter's folder must come first.
export PATH="$(dirname "$PY"):$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# The tiny models' cache. A lent machine's shell may not set HOME (bench/gpu_device.sh exports it): say so.
export MGFT_CACHE="${MGFT_CACHE:-${HOME:?gpu_check: HOME is not set: export HOME or MGFT_CACHE}/.cache/musicgen-ft}"
exec "$PY" bench/gpu_check.py "$@"
