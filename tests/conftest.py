"""Test-wide setup: the repo root on sys.path, offline hubs, a private cache for tiny models."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# No test may reach a model hub: offline here, and a test must not depend on the network anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models are cached per machine (deterministic builds); tests share that cache across runs.
os.environ.setdefault("MGFT_CACHE", str(Path.home() / ".cache" / "musicgen-ft"))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The real Cog server in predict mode with the schema `cog build` writes, the tiny model preloaded; shared
    by every test module that sends predictions (one start, ~7 s, instead of one per module)."""
    from tests.helpers import CogServer

    srv = CogServer(tmp_path_factory.mktemp("cog"), env={"MGFT_PRELOAD": "tiny"})
    try:
        assert srv.wait_ready()["status"] == "READY", srv.log()[-3000:]
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A CLI's `main()` called in a test configures logging as it would for a user (core/logs.py): what it adds to
    the root logger is removed after the test, so one test's handlers and level do not reach the next test's
    captured output."""
    from core.logs import _MARK

    root = logging.getLogger()
    ours, level = [h for h in root.handlers if getattr(h, _MARK, False)], root.level
    yield
    for handler in [h for h in root.handlers if getattr(h, _MARK, False) and h not in ours]:
        root.removeHandler(handler)
    root.setLevel(level)
