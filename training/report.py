"""The training report that goes into the weights: `loss.png` (loss and learning-rate curves, matplotlib, with the
validation loss when there is validation), `metrics.json` (every step's and every evaluation's numbers) and
`report.html` (all of it on one self-contained page, the samples as audio players next to a training clip)."""

from __future__ import annotations

import io
import json
import math
import typing as tp
from pathlib import Path

__all__ = ["plot_history", "metrics_json", "finite_json", "render_html", "reference_clip"]


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


def reference_clip(clips: tp.Sequence[tp.Any], seconds: float) -> tuple[str, str, bytes] | None:
    """`(file name, description, WAV bytes)` of the first `seconds` of the first training clip, to listen to next to
    the samples; None without clips."""
    import soundfile as sf

    for clip in clips:
        try:
            info = sf.info(str(clip.path))
            data, sr = sf.read(str(clip.path), frames=int(max(1.0, seconds) * info.samplerate), always_2d=True)
        except (OSError, RuntimeError):  # an unreadable clip only costs the report its reference
            continue
        buffer = io.BytesIO()
        sf.write(buffer, data, sr, format="WAV", subtype="PCM_16")
        return Path(str(clip.path)).name, clip.description or "", buffer.getvalue()
    return None


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.2em 0.7em; border: 1px solid #ddd; }
th { background: #f4f4f4; text-align: left; } tr.exported td { background: #e8f5e9; font-weight: bold; }
.verdict { font-size: 1.1em; padding: 0.6em 1em; background: #f4f8ff; border-left: 4px solid #4a7bd0; }
.warn { background: #fff4e5; border-left-color: #e08a00; } img { max-width: 100%; } audio { width: 22em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _rows(pairs: tp.Iterable[tuple[str, tp.Any]]) -> str:
    from html import escape

    return "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in pairs)


def _verdict(validation: dict | None) -> tuple[str, str]:
    """One sentence a musician reads first: did the fine-tune get better on tracks it never heard?"""
    if not validation:
        return "warn", "No validation: nothing measured on held-out tracks (fewer than 5 tracks, or turned off)."
    base, best, step = validation.get("base_loss"), validation.get("best_loss"), validation.get("exported_step")
    final = validation.get("final_loss")
    tracks = len(validation.get("split", {}).get("validation_tracks") or [])
    if base is None or best is None:
        return "warn", "The validation loss could not be measured (see the log)."
    if step == 0:
        return "warn", (
            f"The fine-tune never beat the base model on the {tracks} held-out track(s) (validation loss {base:.3f}): "
            "the exported weights are the base model's. Try a lower lr or fewer steps."
        )
    text = (
        f"On {tracks} held-out track(s) never trained on, the validation loss went from {base:.3f} (base model) to "
        f"{best:.3f} at step {step}, {100 * (base - best) / base:.1f} % lower; those weights were exported."
    )
    if final is not None and final > best * 1.05:
        text += f" It rose to {final:.3f} by the end (over-fitting or a too high lr): later weights were worse."
        return "warn", text
    return "", text


def render_html(
    finetune: dict[str, tp.Any],
    png: bytes,
    samples: tp.Sequence[tuple[str, bytes]],
    reference: tuple[str, str, bytes] | None = None,
) -> bytes:
    """`report.html`: one self-contained page (the plot and the audio inline as data: URIs, no script, no external
    resource): the verdict, the data and the split, the curves, every evaluation, the samples next to a training
    clip, the run and its inputs."""
    import base64
    from html import escape

    def uri(kind: str, data: bytes) -> str:
        return f"data:{kind};base64,{base64.b64encode(data).decode()}"

    validation = finetune.get("validation")
    training = finetune.get("training", {})
    kind, verdict = _verdict(validation)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Fine-tune report: {escape(str(finetune.get('model_version')))}</title><style>{_STYLE}</style></head>",
        "<body>",
        f"<h1>Fine-tune of {escape(str(finetune.get('model_version')))} ({escape(str(finetune.get('method')))})</h1>",
        f"<p class='verdict {kind}'>{escape(verdict)}</p>",
        "<h2>Data</h2><table>",
        _rows(
            [
                ("training clips", training.get("clips")),
                ("trigger", finetune.get("trigger") or "-"),
                *((f"labels: {k}", ", ".join(v)) for k, v in (finetune.get("labels") or {}).items()),
            ]
        ),
    ]
    if validation:
        split = validation.get("split", {})
        parts.append(
            _rows(
                [
                    ("validation", split.get("mode")),
                    ("held-out tracks", ", ".join(split.get("validation_tracks") or []) or "-"),
                    ("held-out clips", split.get("validation_clips")),
                    ("held-out seconds", split.get("validation_seconds")),
                ]
            )
        )
    parts.append("</table><h2>Curves</h2>")
    parts.append(f"<img alt='training and validation loss, learning rate' src='{uri('image/png', png)}'>")
    if validation and validation.get("evaluations"):
        evaluations = validation["evaluations"]
        codebooks = sorted(k for k in evaluations[0] if k.startswith("val_loss_q"))
        header = ["step", "validation loss", "unconditional", *codebooks]
        parts.append("<h2>Evaluations</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        for e in evaluations:
            cls = " class='exported'" if e.get("step") == validation.get("exported_step") else ""
            cells = [e.get("step"), e.get("val_loss"), e.get("val_loss_uncond"), *(e.get(k) for k in codebooks)]
            text = ["-" if c is None else (f"{c:.4f}" if isinstance(c, float) else str(c)) for c in cells]
            parts.append(f"<tr{cls}>" + "".join(f"<td class='num'>{escape(t)}</td>" for t in text) + "</tr>")
        parts.append("</table><p>Highlighted: the exported weights.</p>")
    if samples or reference:
        parts.append("<h2>Listen</h2><table><tr><th>what</th><th>prompt</th><th>audio</th></tr>")
        for name, data in samples:
            prompt = next((s["description"] for s in finetune.get("samples", []) if s["file"] == name), "")
            parts.append(
                f"<tr><td>generated ({escape(Path(name).name)})</td><td>{escape(prompt)}</td>"
                f"<td><audio controls preload='none' src='{uri('audio/wav', data)}'></audio></td></tr>"
            )
        if reference is not None:
            name, description, data = reference
            parts.append(
                f"<tr><td>training clip ({escape(name)})</td><td>{escape(description)}</td>"
                f"<td><audio controls preload='none' src='{uri('audio/wav', data)}'></audio></td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Run</h2><table>")
    parts.append(_rows((k, v) for k, v in training.items()))
    parts.append("</table><h2>Inputs</h2><table>")
    parts.append(_rows(sorted((finetune.get("training_inputs") or {}).items())))
    parts.append("</table></body></html>\n")
    return "".join(parts).encode()
