#!/usr/bin/env bash
# Wheels for running scripts/gpu_check.sh on a GPU machine that has python3 with torch (numpy, scipy, transformers,
# huggingface_hub, torchaudio, torchmetrics, einops, matplotlib, safetensors, sentencepiece, ...) but not the
# project's other dependencies, and no network. Run it HERE, where PyPI is reachable; it writes `.whl/` (~11 MB,
# ignored by git through the repository's info/exclude) for bench/gpu_device.sh, the device command, to install.
#
#   bench/gpu_env.sh            # GPU_PYTHON_VERSION=3.12 by default (the device machine's python3)
#
# Versions are the project's pins (requirements*.txt). xformers, spacy and PyAV are not carried: audiocraft imports
# them at module level only, and bench/gpu_stubs/ stands in for them on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PYVER="${GPU_PYTHON_VERSION:-3.12}"
OUT=.whl
pin() {  # the `name==version` pinned in requirements*.txt
    local spec
    spec="$(grep -h -i -E "^$1==" requirements.txt requirements-nodeps.txt requirements-dev.txt | head -1)"
    [ -n "$spec" ] || { echo "gpu_env: no pin for $1 in requirements*.txt" >&2; exit 1; }
    echo "$spec"
}
# Pure Python (built here as py3 wheels where PyPI has only an sdist), and the compiled ones (downloaded for PYVER).
PURE=(audiocraft omegaconf antlr4-python3-runtime hydra-core flashy dora_search treetable submitit retrying colorlog
      julius num2words docopt dadaptation librosa audioread pooch decorator cog structlog platformdirs pycparser)
BINARY=(soundfile cffi soxr lameenc coglet)
# Through git: in a worktree `.git` is a file and the exclude list lives in the main repository's git folder.
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf "$OUT" && mkdir -p "$OUT"
specs=(); for name in "${PURE[@]}"; do specs+=("$(pin "$name")"); done
"$PY" -m pip wheel -q --no-deps -w "$OUT" "${specs[@]}"
specs=(); for name in "${BINARY[@]}"; do specs+=("$(pin "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${specs[@]}"
ls "$OUT"
du -sh "$OUT"
