#!/usr/bin/env bash
# Build (or reuse) the project's virtual environment and link it as ./.venv.
#
# The venv lives outside the clone, keyed by a hash of the pinned requirement files and the Python version,
# so a second clone (or CI run) on the same machine reuses it; a fresh machine builds it from nothing
# (~8 GB, ~5 minutes: torch's CUDA wheels, which also run on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

key=$(cat requirements.txt requirements-nodeps.txt requirements-dev.txt | "$PYTHON" -c \
  'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read() + sys.version.encode()).hexdigest()[:16])')
root="${MGFT_VENV_ROOT:-$HOME/.cache/musicgen-ft}"
venv="$root/venv-$key"

mkdir -p "$root"
# Two clones (or a CI run beside a developer's) setting up at once would both build into the same folder, the
# second deleting what the first installs: the build is serialized by a lock beside the venvs, and the one that
# waited reuses what the first built.
exec 9>"$root/.setup.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9 || { echo "error: could not lock $root/.setup.lock" >&2; exit 1; }
fi
if [ ! -f "$venv/.complete" ]; then
  echo "Building the virtual environment in $venv (first time on this machine: several minutes)"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade "pip==25.3"
  "$venv/bin/python" -m pip install --quiet -r requirements.txt -r requirements-dev.txt
  # audiocraft's own pins do not resolve on Python 3.11; everything its import needs is pinned above.
  "$venv/bin/python" -m pip install --quiet --no-deps -r requirements-nodeps.txt
  "$venv/bin/python" -c 'import audiocraft.models, demucs.api, essentia, cog' 
  touch "$venv/.complete"
else
  echo "Reusing the virtual environment $venv"
fi
exec 9>&-
ln -sfn "$venv" .venv

# Debian packages some tests use, installed where this is Debian and we are root: headless Chromium (a test
# renders the training report in a real browser) and singularity-music, real music (a game's soundtrack, 51 MB)
# on which the sample-health flags and the tempo's octave decision are checked (those tests skip without it).
missing_packages() {
  command -v chromium >/dev/null 2>&1 || echo chromium
  [ -d /usr/share/games/singularity/music ] || echo singularity-music
}
missing=($(missing_packages))
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq || echo "warning: apt-get update failed; trying the package lists there are" >&2
  for package in "${missing[@]}"; do  # one at a time: one that cannot be had does not keep the other out
    echo "Installing $package (Debian) for the tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null || true
  done
fi
for package in $(missing_packages); do
  case $package in
    chromium) echo "warning: no chromium: the report's browser test will fail (apt-get install chromium)" >&2 ;;
    *) echo "warning: no $package: the tests on real music will skip (apt-get install $package)" >&2 ;;
  esac
done
echo "Ready: .venv -> $venv"
