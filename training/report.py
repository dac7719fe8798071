"""The training report that goes into the weights: `loss.png` (loss and learning-rate curves, matplotlib, with the
validation loss when there is validation), `metrics.json` (every step's and every evaluation's numbers) and
`report.html` (all of it on one self-contained page, the samples as audio players next to a training clip).

The page opens with `verdicts`: one sentence per question a musician asks (closer to your music? still follows
prompts? forgot other music? copies? healthy audio?), each from its metric with the threshold it was judged by, a
measure that was not taken said as skipped with why and how to add it, and a first line on a test model (`tiny*`)
whose numbers mean nothing. The samples made during training (training/evaluate.py `TrainingSamples`) are its
timeline: the same prompts and seeds at each evaluation, next to that evaluation's validation loss."""

from __future__ import annotations

import base64
import io
import json
import math
import string
import typing as tp
from html import escape
from pathlib import Path

from core.catalogue import SPEC
from evaluation.frechet import fmt_distance
from evaluation.health import BELOW_FLAGS, FLAG_MEASURES

__all__ = [
    "plot_history",
    "svg_chart",
    "metrics_json",
    "finite_json",
    "render_html",
    "reference_clip",
    "comparison_rows",
    "headline",
    "summary_lines",
    "verdicts",
    "CLOSER_MIN",
    "PROMPT_GAIN_KEPT",
]

# The page's text and layout (its stylesheet included); render_html fills in its `${...}` fields.
REPORT_TEMPLATE = Path(__file__).with_name("templates") / "report.html"


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


def svg_chart(history: tp.Sequence[dict[str, float]], validation: dict | None = None) -> str:
    """The loss curves as a small inline SVG for report.html (a few KB: the page stays small inside a LoRA tar of
    a few MB, where matplotlib's SVG alone is ~20 KB): training loss (line), validation loss (dots, conditional;
    crosses, unconditional), the exported step (dashed)."""
    width, height, left, right, top, bottom = 720, 300, 56, 12, 14, 36
    evaluations = [e for e in (validation or {}).get("evaluations") or [] if e.get("val_loss") is not None]
    points = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None and math.isfinite(h["loss"])]
    points += [(e["step"], e["val_loss"]) for e in evaluations]
    points += [(e["step"], e["val_loss_uncond"]) for e in evaluations if e.get("val_loss_uncond") is not None]
    if not points:
        return ""
    x_max = max(1, max(p[0] for p in points))
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    y_min, y_max = (y_min - 0.5, y_max + 0.5) if y_max - y_min < 1e-9 else (y_min, y_max)

    def x(v: float) -> float:
        return left + (width - left - right) * v / x_max

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - y_min) / (y_max - y_min))

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' height='{height}'"]
    out.append(" font-family='sans-serif' font-size='11'>")
    out.append(f"<rect x='{left}' y='{top}' width='{width - left - right}' height='{height - top - bottom}'")
    out.append(" fill='none' stroke='#bbb'/>")
    for i in range(5):  # value ticks and step ticks
        v = y_min + (y_max - y_min) * i / 4
        out.append(f"<text x='{left - 4}' y='{y(v) + 4:.1f}' text-anchor='end'>{v:.2f}</text>")
        s = x_max * i / 4
        out.append(f"<text x='{x(s):.1f}' y='{height - bottom + 14}' text-anchor='middle'>{s:g}</text>")
    out.append(f"<text x='{(left + width) / 2}' y='{height - 4}' text-anchor='middle'>step</text>")
    train = " ".join(f"{x(h['step']):.1f},{y(h['loss']):.1f}" for h in history if h.get("loss") is not None)
    if train:
        out.append(f"<polyline points='{train}' fill='none' stroke='#1f77b4' stroke-width='1.5'/>")
    for e in evaluations:
        out.append(f"<circle cx='{x(e['step']):.1f}' cy='{y(e['val_loss']):.1f}' r='3.5' fill='#2ca02c'/>")
        if e.get("val_loss_uncond") is not None:
            cx, cy = x(e["step"]), y(e["val_loss_uncond"])
            out.append(f"<path d='M{cx - 3:.1f},{cy - 3:.1f}l6,6m0,-6l-6,6' stroke='#777' stroke-width='1.5'/>")
    exported = (validation or {}).get("exported_step")
    if exported is not None and evaluations:
        out.append(f"<line x1='{x(exported):.1f}' x2='{x(exported):.1f}' y1='{top}' y2='{height - bottom}'")
        out.append(" stroke='#d62728' stroke-dasharray='4 3'/>")
    legend = [("#1f77b4", "training loss"), ("#2ca02c", "validation loss"), ("#777", "validation, unconditional")]
    legend = legend[: 3 if evaluations else 1] + ([("#d62728", f"exported (step {exported})")] if evaluations else [])
    for i, (color, label) in enumerate(legend):
        out.append(f"<rect x='{width - right - 190}' y='{top + 8 + 16 * i}' width='10' height='10' fill='{color}'/>")
        out.append(f"<text x='{width - right - 175}' y='{top + 17 + 16 * i}'>{escape(label)}</text>")
    out.append("</svg>")
    return "".join(out)


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


def _wav_bytes(wav: tp.Any, rate: int) -> bytes:
    """16-bit WAV of a `[C, T]` float tensor (peak-normalised when it clips, as predict's default does)."""
    import numpy as np
    import soundfile as sf

    data = np.asarray(wav, dtype=np.float32).T
    peak = float(np.abs(data).max()) if data.size else 0.0
    buffer = io.BytesIO()
    sf.write(buffer, data / peak if peak > 1.0 else data, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _rows(pairs: tp.Iterable[tuple[str, tp.Any]]) -> str:
    return "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in pairs)


def _verdict(validation: dict | None, threshold: str = "") -> tuple[str, str]:
    """One sentence a musician reads first: did the fine-tune get better on tracks it never heard? `threshold`
    (what counts as better) follows the percentage it judges."""
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
        f"{best:.3f} at step {step}, {100 * (base - best) / base:.1f} % lower{threshold}; those weights were exported."
    )
    flags = validation.get("flags") or []
    if "validation up" in flags:
        rose = "diverged" if final is None else f"rose to {final:.3f}"
        text += f" It {rose} by the end (over-fitting or a too high lr): later weights were worse."
    if "forgetting up" in flags:
        text += " " + _forgetting_sentence(validation["forgetting"])
    return ("warn" if flags else ""), text


# "closer to your music": the exported weights' validation loss at least this share under the base model's
CLOSER_MIN = 0.01
# "still follows prompts" without CLAP: the text's gain in the held-out loss (unconditional minus conditional) may
# fall to this share of the base model's gain before it is flagged (the prompts matter less and less)
PROMPT_GAIN_KEPT = 0.5
CLAP_HOW = (
    "add laion/larger_clap_music to the Hugging Face cache (the image bakes it with the other weights; elsewhere "
    "`hf download laion/larger_clap_music`)"
)


def verdicts(finetune: dict[str, tp.Any]) -> list[tuple[str, str, str]]:
    """The report's opening: `(question, kind, sentence)` for each question a musician asks, each from its metric
    with the threshold it was judged by. `kind`: "" (fine), "warn" (flagged), "skip" (not measured: why and how).
    A test model's line comes first: its numbers say nothing about music."""
    validation = finetune.get("validation")
    out = []
    known = SPEC.get(str(finetune.get("model_version")))
    if known is not None and known.tiny:
        out.append(
            (
                "Test model",
                "warn",
                f"{finetune.get('model_version')} is a tiny test model with random weights: it checks the pipeline, "
                "its numbers and samples mean nothing about music.",
            )
        )
    if not validation:
        kind, text = _verdict(validation)
        return [*out, ("Closer to your music?", "skip", text)]
    audio = validation.get("audio") or {}
    clap = audio.get("clap") or {}
    out.append(("Closer to your music?", *_closer(validation, audio, clap)))
    out.append(("Still follows prompts?", *_prompts(validation, clap)))
    out.append(("Forgot other music?", *_forgot(validation, clap)))
    out.append(("Copies your clips?", *_copies(audio, clap)))
    out.append(("Healthy audio?", *_healthy(validation, audio)))
    return out


def _closer(validation: dict, audio: dict, clap: dict) -> tuple[str, str]:
    """Yes / No / Not clearly, from the validation loss (at least `CLOSER_MIN` lower) and the samples' distances to
    the held-out clips; samples the base model's cannot be told from turn a yes into "Not clearly" (the loss fell,
    the music did not change)."""
    base, best = validation.get("base_loss"), validation.get("best_loss")
    kind, text = _verdict(validation, f" (counted closer from {100 * CLOSER_MIN:.0f} % lower)")
    if base is None or best is None:
        answer = "Not measured"
    elif validation.get("exported_step") == 0:
        answer = "No"
    elif base and (base - best) / base < CLOSER_MIN:
        kind, answer = "warn", "Not clearly"
        text += f" That is under the {100 * CLOSER_MIN:.0f} % a fine-tune should gain."
    else:
        answer = "Yes"
    if audio.get("frechet_base") is not None:
        fb, ft = audio["frechet_base"], audio.get("frechet_finetuned")
        text += (
            f" Fréchet distance of generated samples to the held-out clips (EnCodec latents, lower is closer): "
            f"{fmt_distance(fb)} (base) -> {fmt_distance(ft)} (fine-tuned), {_change(fb, ft)}."
        )
        if ft is not None and fb and (ft - fb) / fb > CLOSER_MIN:
            kind = "warn"
    if clap.get("frechet_base") is not None:
        text += (
            f" In CLAP's audio space: Fréchet {fmt_distance(clap['frechet_base'])} -> "
            f"{fmt_distance(clap.get('frechet_finetuned'))}"
            f", KAD {_num(clap.get('kad_base'), 4)} -> {_num(clap.get('kad_finetuned'), 4)}."
        )
        if (clap.get("frechet_finetuned") or 0) > clap["frechet_base"]:
            kind = "warn"
    elif clap.get("skipped"):  # the model is absent: "Still follows prompts?" says why and how to add it, once
        text += " CLAP distance skipped: the CLAP model is not installed (how to add it: Still follows prompts?)."
    elif audio:
        text += f" CLAP distance skipped: {clap.get('distance_skipped') or 'not computed'}."
    if answer == "Yes" and (audio.get("health") or {}).get("indistinguishable"):
        kind, answer = "warn", "Not clearly"
        text += (
            " But the fine-tune's samples cannot be told from the base model's (Healthy audio?): the lower loss is "
            "not audible yet."
        )
    return kind, _answer(answer, text)


def _fixed(value: float, digits: int) -> str:
    """`value` to `digits` decimals, without the `-0.000` of a value that rounds to zero from below."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _answer(answer: str, text: str) -> str:
    """`Yes: the ...`: the answer first, the sentence it comes from after it (its capital lowered, not an acronym's)."""
    if text[:2].istitle():
        text = text[0].lower() + text[1:]
    return f"{answer}: {text}"


def _change(base: float | None, value: float | None) -> str:
    """How far `value` moved from `base`, in % of it: the scale a distance with no natural unit is read on."""
    if base is None or value is None or not base:
        return "no change measured"
    share = (value - base) / base
    if abs(share) < CLOSER_MIN:
        return f"unchanged (under {100 * CLOSER_MIN:.0f} % apart)"
    return f"{100 * abs(share):.0f} % {'lower' if share < 0 else 'higher'}"


def _gain(evaluation: dict | None) -> float | None:
    if not evaluation or evaluation.get("val_loss") is None or evaluation.get("val_loss_uncond") is None:
        return None
    return evaluation["val_loss_uncond"] - evaluation["val_loss"]


def _prompts(validation: dict, clap: dict) -> tuple[str, str]:
    """Yes / No from CLAP prompt adherence when measured, and from the text's gain in the held-out loss, base vs
    fine-tuned; Not measured when neither was."""
    evaluations = validation.get("evaluations") or []
    base = next((e for e in evaluations if e.get("step") == 0), None)
    exported = next((e for e in evaluations if e.get("step") == validation.get("exported_step")), None)
    g0, g1 = _gain(base), _gain(exported)
    kind, parts = "", []
    if g0 is not None and g1 is not None:
        kept = f", {_fixed(100 * g1 / g0, 0)} % of the base's gain" if g0 > 0 else ""  # no share of a gain not there
        parts.append(
            f"The prompts lower the held-out loss by {_fixed(g0, 3)} with the base model and {_fixed(g1, 3)} with the "
            "fine-tune"
            f"{kept} (flagged under {100 * PROMPT_GAIN_KEPT:.0f} % of the base's)."
        )
        if g0 > 0 and g1 < PROMPT_GAIN_KEPT * g0:
            kind = "warn"
            parts.append("The fine-tune listens to its prompts much less than the base model did.")
    if clap.get("adherence_base") is not None:
        a0, a1 = clap["adherence_base"], clap.get("adherence_finetuned")
        drop = clap.get("adherence_drop")
        parts.append(
            f"CLAP text-audio similarity to the held-out prompts: {_num(a0, 3)} (base) -> {_num(a1, 3)} (fine-tuned)"
            + (f", flagged when it falls by more than {drop:g}." if drop is not None else ".")
        )
        if a1 is None or (drop is not None and a0 - a1 > drop):
            kind = "warn"
    else:  # evaluation/clap.py's reason says how to add it; without one, CLAP_HOW does
        why = clap.get("skipped")
        parts.append(f"CLAP prompt adherence skipped: {why}." if why else f"CLAP not measured; to add it, {CLAP_HOW}.")
        if g0 is None:
            return kind or "skip", _answer("Not measured", " ".join(parts))
    return kind, _answer("No" if kind == "warn" else "Yes", " ".join(parts))


def _forgot(validation: dict, clap: dict) -> tuple[str, str]:
    """The loss on general music of other genres (forgetting_check), and CLAP's adherence to their prompts."""
    forgetting = validation.get("forgetting")
    kind, parts = "", []
    if forgetting and "forgetting up" in (validation.get("flags") or []):
        kind = "warn"
        parts.append(_forgetting_sentence(forgetting))
    elif forgetting:
        parts.append(
            "No: on general music of other genres the base model generated, the loss went "
            f"{_num(forgetting.get('base_loss'), 3)} (base) -> {_num(forgetting.get('exported_loss'), 3)} "
            f"(exported), under the +{100 * forgetting.get('threshold', 0):.0f} % that is flagged."
        )
    if clap.get("forget_adherence_base") is not None:
        a0, a1, drop = clap["forget_adherence_base"], clap.get("forget_adherence_finetuned"), clap.get("adherence_drop")
        parts.append(
            f"CLAP similarity of samples to prompts of other genres ({'; '.join(clap.get('forget_prompts') or [])}): "
            f"{_num(a0, 3)} (base) -> {_num(a1, 3)} (fine-tuned)"
            + (f", flagged when it falls by more than {drop:g}." if drop is not None else ".")
        )
        if a1 is None or (drop is not None and a0 - a1 > drop):
            kind = "warn"
    if not parts:
        return "skip", (
            "Not measured: forgetting_check was off (auto is off on CPU, where generating the base model's general "
            "music is slow) and the CLAP model is not installed (how to add it: Still follows prompts?); set "
            "forgetting_check=on to measure it."
        )
    return kind, " ".join(parts)


def _copies(audio: dict, clap: dict) -> tuple[str, str]:
    copies = audio.get("copy_check")
    if not copies:
        return "skip", "Not measured: sample_duration is 0 (no samples to compare with the training clips)."
    n, total = copies.get("copies", 0), len(copies.get("samples") or [])
    text = (
        f"{'Yes' if n else 'No'}: {n} of {total} fine-tuned samples are near copies of a training clip (EnCodec "
        f"latents: closer than {copies.get('ratio', 0):g} x the distance between two halves of one training clip)."
    )
    clap_copies = clap.get("copy_check") or {}
    if clap_copies.get("samples") is not None:
        m = clap_copies.get("copies", 0)
        text += f" In CLAP's space: {m} of {len(clap_copies['samples'])}."
        n += m
    return ("warn" if n else ""), text


# Each health flag (evaluation/health.py) as a musician reads it: its name, and its measure against its threshold
# with the scale that number is read on.
HEALTH_NAMES = {
    "silence": "silence",
    "clipping": "clipping",
    "dc": "a DC offset",
    "noise": "noise",
    "loop": "a loop",
    "static": "a held drone",
}


def _health_measure(flag: str, values: list[float], threshold: float | None) -> str:
    """`values` (one per flagged sample) of `flag`'s measure, in words, and the threshold it was judged by."""
    if threshold is None:
        return ""

    def numbers(scale: float, digits: int) -> str:
        return ", ".join(f"{v * scale:.{digits}f}" for v in values)

    return {
        "silence": f"silent for {numbers(100, 0)} % of it; flagged over {100 * threshold:g} %",
        "clipping": f"{numbers(100, 2)} % of its samples cut flat at full scale; flagged over {100 * threshold:g} %",
        "dc": f"the waveform sits {numbers(100, 1)} % of full scale off centre, music under 0.1 %; flagged over "
        f"{100 * threshold:g} %",
        "noise": f"spectral flatness {numbers(1, 2)}, where white noise measures 0.56 and music under 0.2; flagged "
        f"over {threshold:g}",
        "loop": f"it repeats itself with a correlation of {numbers(1, 2)}, 1 for an exact replay; flagged over "
        f"{threshold:g}",
        "static": f"its sound changes by {numbers(1, 3)} dB over time, music by 3 dB and more; flagged under "
        f"{threshold:g} dB",
    }.get(flag, f"flagged over {threshold:g}")


def _healthy(validation: dict, audio: dict) -> tuple[str, str]:
    """Yes / No from the fine-tuned samples' health flags, each said in words with its measure and threshold, and
    whether base and fine-tuned samples can be told apart."""
    health = audio.get("health")
    if not health:
        why = "sample_duration is 0" if not audio else (audio.get("health_skipped") or "not computed")
        return "skip", f"Not measured: {why}."
    tuned = health.get("finetuned") or []
    thresholds = health.get("thresholds") or {}
    flagged = []
    for flag in dict.fromkeys(f for h in tuned for f in h["flags"]):  # in the order the samples raise them
        which = [i for i, h in enumerate(tuned) if flag in h["flags"]]
        values = [tuned[i].get("measures", {}).get(FLAG_MEASURES.get(flag, "")) for i in which]
        measure = _health_measure(flag, values, thresholds.get(flag)) if None not in values else ""
        samples = "sample" + ("s " if len(which) > 1 else " ") + " and ".join(str(i + 1) for i in which)
        flagged.append(
            f"{HEALTH_NAMES.get(flag, flag)} in {samples} of {len(tuned)}" + (f" ({measure})" if measure else "")
        )
    if flagged:
        text = "No: " + "; ".join(flagged) + "."
    else:
        *others, last = (HEALTH_NAMES.get(f, f) for f in FLAG_MEASURES)
        text = f"Yes: none of the {len(tuned)} fine-tuned samples has {', '.join(others)} or {last}."
    if health.get("indistinguishable"):
        pairs = ", ".join(f"{c:.2f}" for c in health.get("correlations") or [])
        limit = thresholds.get("indistinguishable_correlation")
        scale = f" (base/fine-tuned pairs correlate {pairs}, 1 for the same audio" if pairs else ""
        scale += (f"; flagged over {limit:g})" if limit is not None else ")") if scale else ""
        text += f" Base and fine-tuned samples are indistinguishable{scale}: the fine-tune changed nothing audible."
    during = [
        f"step {e['step']}{' (the base model)' if e['step'] == 0 else ''}: {_plain_flags(e['flags'])}"
        for e in (validation.get("samples_during_training") or {}).get("entries") or []
        if e.get("flags")
    ]
    if during:
        text += f" Samples during training flagged at {'; '.join(during)}."
    if not flagged and thresholds:
        text += f" (Flagged over: {_threshold_words(thresholds)}; docs/metrics.md says why there.)"
    return ("warn" if flagged or health.get("indistinguishable") else ""), text


def _threshold_words(thresholds: dict[str, float]) -> str:
    """Each threshold with its unit: `silence 25 % of the sample, ...`."""
    units = {
        "silence": (100, " % of the sample"),
        "clipping": (100, " % of its samples"),
        "dc": (100, " % of full scale"),
        "noise": (1, " spectral flatness"),
        "loop": (1, " self-correlation"),
        "static": (1, " dB of change"),
    }
    # `static` is raised under its threshold (the sample does not change), the others over theirs
    words = [
        f"{HEALTH_NAMES.get(k, k)} {'under ' if k in BELOW_FLAGS else ''}{thresholds[k] * units[k][0]:g}{units[k][1]}"
        for k in units
        if k in thresholds
    ]
    if "indistinguishable_correlation" in thresholds:
        words.append(f"base/fine-tuned correlation {thresholds['indistinguishable_correlation']:g}")
    return ", ".join(words)


def _plain_flags(flags: tp.Iterable[str]) -> str:
    """Flags as the timeline lists them (`dc (prompt 1)`) with each flag's name in words (`a DC offset (prompt 1)`)."""
    out = []
    for flag in flags:
        name, _, rest = flag.partition(" ")
        out.append(f"{HEALTH_NAMES.get(name, name)} {rest}".strip())
    return ", ".join(out)


def _pct(base: float | None, value: float | None) -> str:
    return "diverged" if value is None else ("" if not base else f"{100 * (value / base - 1):+.1f} %")


def _forgetting_sentence(forgetting: dict) -> str:
    base, exported, final = forgetting.get("base_loss"), forgetting.get("exported_loss"), forgetting.get("final_loss")
    where = "the exported weights" if forgetting.get("exported_up") else "the last weights (not exported)"
    worst = exported if forgetting.get("exported_up") else final
    value = "diverged" if worst is None else f"{worst:.3f} ({_pct(base, worst)})"
    return (
        f"Forgetting up: on general music of other genres the base model generated, the loss of {where} is {value} "
        f"against the base model's {base:.3f} (flagged above +{100 * forgetting.get('threshold', 0):.0f} %)."
    )


def _num(value: tp.Any, digits: int = 4) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def comparison_rows(validation: dict) -> list[tuple[str, str, str, str, str]]:
    """The base-vs-fine-tuned table: `(measure, base model, fine-tuned (exported), last evaluation, flag)`."""
    evaluations = validation.get("evaluations") or []
    base = next((e for e in evaluations if e.get("step") == 0), {})
    exported = next((e for e in evaluations if e.get("step") == validation.get("exported_step")), {})
    last = evaluations[-1] if evaluations else {}
    flags = validation.get("flags") or []
    rows = [
        ("validation loss", _num(base.get("val_loss")), _num(exported.get("val_loss")), _num(last.get("val_loss")),
         "validation up" if "validation up" in flags else ""),
        ("validation loss, unconditional", _num(base.get("val_loss_uncond")), _num(exported.get("val_loss_uncond")),
         _num(last.get("val_loss_uncond")), ""),
    ]  # fmt: skip
    forgetting = validation.get("forgetting")
    if forgetting:
        rows.append(
            (
                f"forgetting: loss on general music ({forgetting.get('clips')} clips, {forgetting.get('source')})",
                _num(forgetting.get("base_loss")),
                _num(forgetting.get("exported_loss")),
                _num(forgetting.get("final_loss")),
                "forgetting up" if "forgetting up" in flags else "",
            )
        )
    else:
        rows.append(("forgetting", "-", "-", "-", "not measured (forgetting_check; on CPU auto is off)"))
    audio = validation.get("audio")
    if audio:
        effnet = audio.get("effnet") or {}
        spaces = [("EnCodec latents", audio)]
        if effnet.get("frechet_base") is not None:
            spaces.append(("discogs-effnet (essentia)", effnet))
        for space, scores in spaces:
            rows.append(
                (
                    f"Fréchet distance to the held-out clips, {space}",
                    fmt_distance(scores.get("frechet_base")),
                    fmt_distance(scores.get("frechet_finetuned")),
                    "-",
                    f"fine-tuned vs base: {_change(scores.get('frechet_base'), scores.get('frechet_finetuned'))}",
                )
            )
        if effnet.get("frechet_base") is None:
            reason = effnet.get("skipped") or "not computed"
            rows.append(("Fréchet distance, discogs-effnet (essentia)", "-", "-", "-", f"skipped: {reason}"))
        copies = audio.get("copy_check") or {}
        flagged = copies.get("copies", 0)
        rows.append(
            (
                "copy check: fine-tuned samples near a training clip",
                "-",
                f"{flagged} of {len(copies.get('samples') or [])}",
                "-",
                "near copies" if flagged else "",
            )
        )
    else:
        rows.append(("Fréchet distance, copy check", "-", "-", "-", "skipped: sample_duration is 0"))
    return rows


def headline(validation: dict | None, exported_step: int | None) -> str:
    """One line for the log: validation loss base -> fine-tuned, the exported step, the flags."""
    if not validation or validation.get("base_loss") is None:
        return f"Result: no validation (fewer than 5 tracks, or validation_split=0); exported step {exported_step}"
    best = validation.get("best_loss")
    line = (
        f"Result: validation loss {_num(validation['base_loss'])} (base) -> {_num(best)} (fine-tuned, exported "
        f"step {exported_step}), last {_num(validation.get('final_loss'))}"
    )
    forgetting = validation.get("forgetting")
    if forgetting:
        line += (
            f"; forgetting {_num(forgetting.get('base_loss'))} (base) -> {_num(forgetting.get('exported_loss'))} "
            f"(exported), last {_num(forgetting.get('final_loss'))}"
        )
    flags = validation.get("flags") or []
    line += f"; flags: {', '.join(flags)}" if flags else "; no loss flags"  # loss flags: the samples' own come next
    samples = validation.get("sample_flags")
    if samples is not None:  # the health of the fine-tuned samples (measured when sample_duration > 0)
        line += f"; sample flags: {', '.join(samples)}" if samples else "; samples healthy"
    return line


def summary_lines(tar: Path) -> list[str]:
    """Where the report is and its headline, from `metrics.json` beside `tar` (the end of `train.py`'s log)."""
    folder = Path(tar).parent
    lines = [f"Report: {folder / 'report.html'} (also report.html inside {Path(tar).name}); open it in a browser"]
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as e:  # the weights are written; a missing summary only costs this line
        return [*lines, f"Result: metrics.json unreadable ({e})"]
    return [*lines, headline(metrics.get("validation"), metrics.get("exported_step"))]


def render_html(
    finetune: dict[str, tp.Any],
    history: tp.Sequence[dict[str, float]],
    samples: tp.Sequence[tuple[str, bytes]],
    reference: tuple[str, str, bytes] | None = None,
    comparison: dict[str, tp.Any] | None = None,
    timeline: tp.Mapping[str, bytes] | None = None,
) -> bytes:
    """`report.html`: one self-contained page (the curves as inline SVG, the audio as data: URIs; no script, no
    external resource): the verdict, the data and the split, the curves (`svg_chart`), every evaluation, the
    samples next to a training clip, base vs fine-tuned on held-out prompts (`comparison`: the audio check's samples,
    `{"base": [[C, T] tensors], "finetuned": [...], "rate": Hz}`), the run and its inputs. The page's text, layout
    and stylesheet are `templates/report.html`; the sections below are tables built from the numbers."""
    validation = finetune.get("validation")
    training = finetune.get("training", {})
    during = (validation or {}).get("samples_during_training")
    page = string.Template(REPORT_TEMPLATE.read_text(encoding="utf-8")).substitute(
        model_version=escape(str(finetune.get("model_version"))),
        method=escape(str(finetune.get("method"))),
        verdicts=_verdicts_html(finetune),
        data_rows=_data_rows(finetune, training, validation),
        chart=svg_chart(history, validation),
        evaluations=_evaluations_html(validation) if validation and validation.get("evaluations") else "",
        listen=_listen_html(finetune, samples, reference) if samples or reference else "",
        timeline=_timeline_html(validation, during, timeline or {}) if during else "",
        audio_check=_audio_check_html(validation["audio"], comparison)
        if validation and validation.get("audio") and comparison
        else "",
        run_rows=_rows((k, v) for k, v in training.items()),
        input_rows=_rows(sorted((finetune.get("training_inputs") or {}).items())),
    )
    return page.encode()


def _verdicts_html(finetune: dict[str, tp.Any]) -> str:
    """One paragraph per question (`verdicts`), its answer coloured by its kind."""
    return "".join(
        f"<p class='verdict {kind}'><b>{escape(question)}</b> {escape(text)}</p>"
        for question, kind, text in verdicts(finetune)
    )


def _timeline_html(validation: dict, during: dict, audio: tp.Mapping[str, bytes]) -> str:
    """Samples during training: the same prompts and seeds at each evaluation, next to its validation loss."""
    losses = {e.get("step"): e.get("val_loss") for e in validation.get("evaluations") or []}
    prompts = during.get("prompts") or []
    conditions = during.get("conditions") or {}  # melody and style models: each prompt's held-out clip
    clips = conditions.get("clips") or [None] * len(prompts)
    named = [
        label + (f" ({conditions['kind']} of {c})" if c else "")
        for label, c in zip(_prompt_labels(prompts), clips, strict=True)
    ]
    header = ["step", "validation loss", *named, "flags"]
    parts = ["<h2>Samples during training</h2><table><tr>", *(f"<th>{escape(h)}</th>" for h in header), "</tr>"]
    for entry in during.get("entries") or []:
        step = entry.get("step")
        cls = " class='exported-step'" if step == validation.get("exported_step") else ""
        cells = [f"<td>{escape(str(step))}</td>", f"<td>{escape(_num(losses.get(step)))}</td>"]
        files = entry.get("files") or []
        if files and all(f in audio for f in files):
            cells += [f"<td>{_player(audio[f], 'audio/mpeg')}</td>" for f in files]
        else:  # one note across the prompts' columns, in the note's grey (not the exported row's bold)
            note = entry.get("skipped") or (
                "thinned: only some evaluations keep their audio" if entry.get("thinned") else "-"
            )
            cells.append(f"<td class='note' colspan='{max(1, len(prompts))}'>{escape(note)}</td>")
        flag = _plain_flags(entry.get("flags") or [])
        parts.append(f"<tr{cls}>" + "".join(cells) + f"<td class='flag'>{escape(flag)}</td></tr>")
    parts.append(
        f"</table><p>The same prompts and seeds at each evaluation ({_num(during.get('seconds'), 1)} s each): listen "
        "for where they stop improving or start to copy. Highlighted: the exported weights. The samples may cost at "
        f"most {100 * during.get('bound_share', 0):.0f} % of the training time (they took "
        f"{_num(during.get('spent_s'), 1)} s); "
        "later ones are skipped past it.</p>"
    )
    return "".join(parts)


def _prompt_labels(prompts: tp.Sequence[str]) -> list[str]:
    """The prompts as column or row labels; one held-out description used again (fewer descriptions than samples)
    says so, so that two equal labels do not read as a mistake."""
    labels = []
    for i, prompt in enumerate(prompts):
        label = prompt or "(unconditional)"
        before = list(prompts[:i]).count(prompt)
        labels.append(f"{label} (again, sample {before + 1} of this prompt)" if before else label)
    return labels


def _uri(kind: str, data: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _player(data: bytes, kind: str = "audio/wav") -> str:
    return f"<audio controls preload='none' src='{_uri(kind, data)}'></audio>"


def _data_rows(finetune: dict[str, tp.Any], training: dict[str, tp.Any], validation: dict | None) -> str:
    labels = ((f"labels: {k}", ", ".join(v)) for k, v in (finetune.get("labels") or {}).items())
    rows = _rows([("training clips", training.get("clips")), ("trigger", finetune.get("trigger") or "-"), *labels])
    if validation:
        split = validation.get("split", {})
        rows += _rows(
            [
                ("validation", split.get("mode")),
                ("held-out tracks", ", ".join(split.get("validation_tracks") or []) or "-"),
                ("held-out clips", split.get("validation_clips")),
                ("held-out seconds", split.get("validation_seconds")),
            ]
        )
    return rows


def _evaluations_html(validation: dict) -> str:
    """Base vs fine-tuned (`comparison_rows`, flags in red) and every evaluation, the exported one highlighted."""
    header = ["", "base model", f"fine-tuned (step {validation.get('exported_step')}, exported)", "last", "flag"]
    parts = ["<h2>Base vs fine-tuned</h2><table><tr>", "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for row in comparison_rows(validation):
        cells = [f"<th>{escape(row[0])}</th>", *(f"<td class='num'>{escape(c)}</td>" for c in row[1:4])]
        flagged = row[4] in ("validation up", "forgetting up", "near copies")  # else a note: red only for flags
        flag = f"<td class='{'flag' if flagged else 'note'}'>{escape(row[4])}</td>"
        parts.append("<tr>" + "".join(cells) + flag + "</tr>")
    rises = validation.get("thresholds") or {}
    parts.append(
        "</table><p>Lower is better everywhere. Flags: validation up (the last evaluation over the best by more "
        f"than {100 * rises.get('validation_up', 0):.0f} %), forgetting up (the loss on general music over the "
        f"base's by more than {100 * rises.get('forgetting_up', 0):.0f} %).</p>"
    )
    evaluations = validation["evaluations"]
    codebooks = sorted(k for k in evaluations[0] if k.startswith("val_loss_q"))
    forgetting = ["forget_loss"] if "forget_loss" in evaluations[0] else []  # prior preservation's other genres
    header = ["step", "validation loss", "unconditional", *codebooks, *(["forgetting"] if forgetting else [])]
    parts.append("<h2>Evaluations</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for e in evaluations:
        cls = " class='exported'" if e.get("step") == validation.get("exported_step") else ""
        keys = ["val_loss", "val_loss_uncond", *codebooks, *forgetting]
        cells = [e.get("step"), *(e.get(k) for k in keys)]
        text = ["-" if c is None else (f"{c:.4f}" if isinstance(c, float) else str(c)) for c in cells]
        parts.append(f"<tr{cls}>" + "".join(f"<td class='num'>{escape(t)}</td>" for t in text) + "</tr>")
    per_codebook = (
        f" {codebooks[0]}..{codebooks[-1]}: the loss on each of EnCodec's codebooks, {codebooks[0]} the coarsest "
        "(most of what is heard), the later ones finer detail."
        if codebooks
        else ""
    )  # a column name a musician cannot read says what it is
    parts.append(f"</table><p>Highlighted: the exported weights.{escape(per_codebook)}</p>")
    return "".join(parts)


def _listen_html(
    finetune: dict[str, tp.Any], samples: tp.Sequence[tuple[str, bytes]], reference: tuple[str, str, bytes] | None
) -> str:
    parts = ["<h2>Listen</h2><table><tr><th>what</th><th>prompt</th><th>audio</th></tr>"]
    for name, data in samples:
        prompt = next((s["description"] for s in finetune.get("samples", []) if s["file"] == name), "")
        parts.append(
            f"<tr><td>generated ({escape(Path(name).name)})</td><td>{escape(prompt)}</td><td>{_player(data)}</td></tr>"
        )
    if reference is not None:
        name, description, data = reference
        parts.append(
            f"<tr><td>training clip ({escape(name)})</td><td>{escape(description)}</td><td>{_player(data)}</td></tr>"
        )
    parts.append("</table>")
    return "".join(parts)


def _audio_check_html(check: dict, comparison: dict[str, tp.Any]) -> str:
    """The audio check on held-out prompts: Fréchet distances, the base and fine-tuned samples, near copies."""
    parts = ["<h2>Base vs fine-tuned, on held-out prompts</h2><table>"]
    parts.append(
        _rows(
            [
                ("Fréchet distance to the held-out clips, base model", fmt_distance(check["frechet_base"])),
                (
                    "Fréchet distance to the held-out clips, fine-tuned",
                    f"{fmt_distance(check['frechet_finetuned'])} "
                    f"({_change(check['frechet_base'], check['frechet_finetuned'])})",
                ),
                ("fine-tuned samples flagged as near copies of a training clip", check["copy_check"]["copies"]),
            ]
        )
    )
    parts.append("</table><p>Lower Fréchet distance: closer to the held-out music (EnCodec latents).</p>")
    copies = check["copy_check"]
    limit = copies.get("ratio", 0) * copies.get("reference", 0)
    nearest = "nearest training clip (distance" + (f"; a near copy under {fmt_distance(limit)})" if limit else ")")
    parts.append(f"<table><tr><th>prompt</th><th>base model</th><th>fine-tuned</th><th>{escape(nearest)}</th></tr>")
    rate = comparison["rate"]
    for i, prompt in enumerate(_prompt_labels(check["prompts"])):
        cells = [escape(prompt)]
        for wav in (comparison["base"][i], comparison["finetuned"][i]):
            cells.append(_player(_wav_bytes(wav, rate)))
        near = copies["samples"][i]
        copy = ", near copy" if near["copy"] else ""
        cells.append(escape(f"{near['nearest']} ({fmt_distance(near['distance'])}{copy})"))
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)
