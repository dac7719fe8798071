"""The default torch device: the one place that decides between CUDA and the CPU (imports only torch)."""

from __future__ import annotations

import torch


def default_device() -> str:
    """`cuda` where a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"
