"""The training report that goes into the weights: `loss.png` (loss and learning-rate curves, matplotlib)."""

from __future__ import annotations

import io
import typing as tp

__all__ = ["plot_history"]


def plot_history(history: tp.Sequence[dict[str, float]]) -> bytes:
    """PNG bytes of loss (top) and lr (bottom) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib import pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, [h["loss"] for h in history], color="tab:blue")
    ax1.set_ylabel("loss (cross-entropy)")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [h["lr"] for h in history], color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
