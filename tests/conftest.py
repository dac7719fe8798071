"""Test-wide setup: the repo root on sys.path, offline hubs, a private cache for tiny models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# No test may reach a model hub: offline here, and a test must not depend on the network anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models are cached per machine (deterministic builds); tests share that cache across runs.
os.environ.setdefault("MGFT_CACHE", str(Path.home() / ".cache" / "musicgen-ft"))
