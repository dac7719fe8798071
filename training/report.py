"""The training report that goes into the weights: `loss.png` (loss and learning-rate curves, matplotlib, with the
validation loss when there is validation) and `metrics.json` (every step's and every evaluation's numbers)."""

from __future__ import annotations

import io
import json
import math
import typing as tp

__all__ = ["plot_history", "metrics_json", "finite_json"]


def plot_history(history: tp.Sequence[dict[str, float]], validation: dict | None = None) -> bytes:
    """PNG bytes of loss (top) and lr (bottom) against the step; `validation` (training/evaluate.py's summary)
    adds the validation loss, conditional and unconditional, and marks the exported step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib import pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, [h["loss"] for h in history], color="tab:blue", label="training loss")
    evaluations = (validation or {}).get("evaluations") or []
    if evaluations:
        at = [e["step"] for e in evaluations]
        ax1.plot(at, [e["val_loss"] for e in evaluations], "o-", color="tab:green", label="validation loss")
        ax1.plot(
            at, [e["val_loss_uncond"] for e in evaluations], "x--", color="tab:gray", label="validation, unconditional"
        )
        exported = validation.get("exported_step")
        if exported is not None:
            ax1.axvline(exported, color="tab:red", alpha=0.5, linestyle=":", label=f"exported (step {exported})")
        ax1.legend(loc="upper right", fontsize=8)
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


def finite_json(value: tp.Any) -> tp.Any:
    """JSON has no NaN/inf: a diverged value is written as null (strict parsers reject `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def metrics_json(history: tp.Sequence[dict[str, float]], validation: dict | None, exported_step: int) -> bytes:
    """`metrics.json`: the training curve (every step), the validation summary with every evaluation, and the step
    whose weights were exported."""
    data = {
        "exported_step": exported_step,
        "training": list(history),
        "validation": validation,
    }
    return json.dumps(finite_json(data), indent=1).encode()
