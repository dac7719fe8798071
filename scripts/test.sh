#!/usr/bin/env bash
# Run the test suite inside the project's virtual environment (made by scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "error: no .venv here; run ./scripts/setup.sh first" >&2; exit 1; }
# The Cog server starts its worker as a bare `python` from PATH: the venv's bin must come first.
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
