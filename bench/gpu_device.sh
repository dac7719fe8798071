#!/usr/bin/env bash
# The device command for scripts/gpu_check.sh on a lent GPU machine (bench/README.md, "GPU self-check"): that
# machine has python3 with torch but not our other dependencies, and no network. They come as the `.whl/` folder
# that bench/gpu_env.sh writes on the build machine, carried with the working tree (the run tool's `carry`).
#
#   bench/gpu_device.sh [--wheels DIR] [--target DIR] [--python PY] [--out DIR] [gpu_check arguments ...]
#
# --wheels: the carried wheels (default .whl); --target: where they are installed (default /tmp/site);
# --python: the machine's interpreter (default python3); --out: where gpu_check.txt, each section's log and the
# JSON line go (default $OUT, the folder the run tool brings back). Other arguments go to scripts/gpu_check.sh.
#
# Exit status: gpu_check's own (0 no row failed, 1 some row failed, 77 no CUDA device), 2 when the wheels are
# missing or do not install (said in one line, before anything runs).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
TARGET=/tmp/site
PY=python3
OUTDIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --target) TARGET="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --out) OUTDIR="$2"; shift 2 ;;
        *) break ;;
    esac
done
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_device: no wheels in $WHEELS/ (was it carried?): run bench/gpu_env.sh on the build machine, then carry" \
        "'.whl' with the device command" >&2
    exit 2
fi
# scripts/gpu_check.sh reads $HOME (the tiny models' cache) under `set -u`; a lent machine's shell may not set it.
if [ -z "${HOME:-}" ]; then
    HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
    [ -n "$HOME" ] && [ -w "$HOME" ] || HOME=/tmp
fi
export HOME
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" \
    "${wheels[@]}"; then
    echo "gpu_device: installing the wheels of $WHEELS/ into $TARGET with $PY failed (see pip's message above)" >&2
    exit 2
fi
# flashy's wheel installs its own top-level `tests` package; first on PYTHONPATH it would hide ours (tests.helpers).
# Removed only where a wheel's RECORD lists it: what we installed, nothing else.
if [ -d "$TARGET/tests" ] && grep -qs '^tests/' "$TARGET"/*.dist-info/RECORD; then
    rm -rf "$TARGET/tests"
fi
# The wheels first, then the stand-ins for xformers / spacy / av (bench/gpu_stubs/README.md): both come before the
# interpreter's own site-packages, so the stand-ins hide a real install of those three (the device has none).
export PYTHONPATH="$TARGET:$PWD/bench/gpu_stubs${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_PYTHON="$PY"
out_args=()
if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR"
    export GPU_CHECK_LOGS="$OUTDIR"
    out_args=(--out "$OUTDIR/gpu_check.jsonl")  # the new JSON line alone; a later --out in "$@" wins
fi
scripts/gpu_check.sh "${out_args[@]}" "$@" 2>&1 | tee "${OUTDIR:-${TMPDIR:-/tmp}}/gpu_check.txt"
exit "${PIPESTATUS[0]}"
