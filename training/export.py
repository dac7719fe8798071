"""Write `trained_model.tar`: the LM through `core.weights.write_trained_model`, plus the training report.

Besides the weights and `finetune.json` (every training input, the label vocabulary, the trigger, a summary of the
run), the tar carries `loss.png` and `samples/sample_<i>.wav`: short pieces generated with the fine-tuned model
from training descriptions, loudness-normalized as predict's outputs are (`generation.generate.normalize`), so that
they sound as predict will. The same files lie beside the tar in the output folder, with the audio check's held-out
prompts as `samples/heldout_<i>_base.wav` and `samples/heldout_<i>_finetuned.wav` (the base model and the
fine-tune side by side, as report.html compares them), so nothing needs unpacking to be listened to.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

import torch

from core import adapters, weights
from core.audio import save_audio
from core.catalogue import SPEC
from core.errors import InputError
from core.params import secret_fields
from core.weights import peft_format, transformers_format
from generation.generate import generate_audio, normalize, resolved_precision
from training import checkpoint as ckpt
from training.data import ClipTokens
from training.evaluate import TIMELINE_FOLDER, audio_check, sample_flags
from training.loop import NonFiniteError, TrainingInterrupted, TrainResult, finished_state, resume_hint
from training.melody import restore_for_generation
from training.methods import Prepared, get_method
from training.params import TrainParams
from training.report import finite_json, metrics_json, plot_history, reference_clip, render_html

logger = logging.getLogger(__name__)

__all__ = [
    "export_trained_model",
    "label_vocabulary",
    "generate_samples",
    "wav_bytes",
    "write_beside",
    "N_SAMPLES",
    "TAR_NAME",
    "ExportFailed",
    "check_output_dir",
    "check_exported_finite",
    "keep_trained_state",
]

TAR_NAME = "trained_model.tar"
N_SAMPLES = 2
# predict's default `normalization_strategy`: the report's samples are heard as a prediction would sound
SAMPLE_NORMALIZATION = "loudness"
VOCAB_FIELDS = ("genre", "moods", "instrument", "key", "keywords")


def label_vocabulary(clips: tp.Sequence[ClipTokens], report: dict | None = None) -> dict[str, list[str]]:
    """The labels the training descriptions used, per field (genre, moods, ...), from the clips' info."""
    vocab: dict[str, set[str]] = {name: set() for name in VOCAB_FIELDS}
    for clip in clips:
        for name in VOCAB_FIELDS:
            value = clip.info.get(name)
            values = value if isinstance(value, list | tuple) else [value]
            vocab[name].update(str(v).strip() for v in values if v not in (None, "") and str(v).strip())
    out = {name: sorted(values) for name, values in vocab.items() if values}
    if report and isinstance(report.get("labels"), dict):
        for name, values in report["labels"].items():
            if isinstance(values, list | tuple):
                out[name] = sorted(set(out.get(name, [])) | {str(v) for v in values})
    return out


def sample_descriptions(clips: tp.Sequence[ClipTokens], n: int = N_SAMPLES) -> list[str]:
    """`n` training descriptions for the samples: distinct ones first, repeated if there are fewer."""
    distinct: list[str] = []
    for clip in clips:
        if clip.description and clip.description not in distinct:
            distinct.append(clip.description)
    distinct = distinct or [""]
    return [distinct[i % len(distinct)] for i in range(n)]


@torch.no_grad()
def generate_samples(model: tp.Any, descriptions: list[str], duration: float, sampler_precision: str) -> list[bytes]:
    """WAV bytes of one sample per description, generated with `model` (its LM already holds the trained weights,
    LoRA adapters included), in one batch through predict's sampler (`generation.generate.generate_audio`)."""
    restore_for_generation(model.lm)
    # The samples preview what predict will make of these weights, so they take predict's sampler and precision
    # (`sampler_precision`, default `auto`: int8 on CPU, 5.79x audiocraft's generate in bench/generate.py, at a
    # next-token KL of ~0.0007 nats vs fp32, far below the sampling's own randomness; fp16 on CUDA). The int8/fp16
    # copy is built from the trained weights for this call only; the training model is not modified.
    wav = generate_audio(model, descriptions, duration, sampler_precision=sampler_precision)  # [B, C, T]
    return [wav_bytes(one, int(model.sample_rate)) for one in wav]


def normalized(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """`[C, T]` audio normalized as predict normalizes its outputs by default."""
    return normalize(wav.float().cpu(), SAMPLE_NORMALIZATION, sample_rate)


def wav_bytes(wav: torch.Tensor, sample_rate: int, *, normalize_first: bool = True) -> bytes:
    """16-bit WAV bytes of `[C, T]` audio (`normalized` first unless it already is)."""
    wav = normalized(wav, sample_rate) if normalize_first else wav.float().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        return save_audio(Path(tmp) / "sample.wav", wav, sample_rate, "wav").read_bytes()


def write_beside(folder: Path, files: tp.Mapping[str, bytes]) -> list[Path]:
    """Each `name -> bytes` written under `folder` (temp name, then rename: never a half-written file under the
    name), returning the paths."""
    written = []
    for name, data in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    return written


def export_trained_model(
    out_tar: Path,
    *,
    model: tp.Any,
    prepared: Prepared,
    result: TrainResult,
    params: TrainParams,
    clips: tp.Sequence[ClipTokens],
    dataset_report: dict | None = None,
    run_info: dict | None = None,
    audio_reference: dict | None = None,
    checkpoint_dir: Path | None = None,
    timeline: tp.Mapping[str, bytes] | None = None,
) -> Path:
    """Write `out_tar` atomically: weights (fp16 LM + compression reference), finetune.json, loss.png, samples.

    Every tensor that would go into the tar is checked finite first (`NonFiniteError` naming the step and the
    tensor, and the last finite checkpoint in `checkpoint_dir`). If writing fails (full disk, permissions, Ctrl-C),
    the training is not lost: the finished state is kept as a resume checkpoint (`checkpoint_dir`, else a temporary
    folder) and the error says where and how to export it without training again.
    """
    cfg = model.lm.cfg  # the base's config as audiocraft's loader read it (device/dtype dropped on export)
    prior_examples = [
        {"kind": c.info["prior"], "prompt": c.description, "file": Path(c.path).name, "track": c.info["prior_source"]}
        for c in clips
        if c.info.get("prior")
    ]
    clips = [c for c in clips if not c.info.get("prior")]  # the report and samples describe the user's clips
    # Never a credential in a file we hand out (wandb_api_key, hf_token: core.params.secret_fields).
    secrets = secret_fields(TrainParams)
    inputs = {k: v for k, v in dataclasses.asdict(params).items() if k not in secrets}
    inputs["dataset_path"] = Path(str(params.dataset_path)).name if params.dataset_path else None
    if params.resume_from:
        inputs["resume_from"] = Path(str(params.resume_from)).name
    history = result.history
    finetune = {
        "model_version": params.model_version,
        "method": params.method,
        "trigger": params.trigger,
        "training_inputs": inputs,
        "labels": label_vocabulary(clips, dataset_report),
        "descriptions": sorted({c.description for c in clips if c.description})[:200],
        "ema": params.ema,
        # What the samples and the prior-preservation examples were drawn at (`auto` resolved for the device).
        "sampler_precision": resolved_precision(model, params.sampler_precision),
        "training": {
            "steps": result.steps,
            "clips": len(clips),
            "precision": result.precision,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            "seconds": round(result.seconds, 1),
            **(run_info or {}),
        },
    }
    # Which weights are in the tar: with validation and keep_best, the best evaluation's (training/evaluate.py).
    validation = result.evaluation
    exported_step = result.steps
    if validation is not None:
        finetune["validation"] = validation
        if validation.get("exported_step") is not None:
            exported_step = validation["exported_step"]
    finetune["training"]["exported_step"] = exported_step
    if prior_examples:
        finetune["prior_examples"] = prior_examples
    method_export = get_method(params.method).export(result.state_dict, prepared, params)  # training/methods/
    finetune.update(method_export.info)
    check_exported_finite(method_export, result.steps, checkpoint_dir)
    try:
        return _write(
            out_tar, model, result, params, clips, cfg, finetune, method_export, audio_reference, timeline or {}
        )
    except BaseException as e:
        kept = keep_trained_state(result, params, checkpoint_dir)
        replacement = _export_failure(e, Path(out_tar), result.steps, kept)
        if replacement is None:
            raise
        raise replacement from (None if isinstance(e, KeyboardInterrupt) else e)


def _write(
    out_tar: Path,
    model: tp.Any,
    result: TrainResult,
    params: TrainParams,
    clips: tp.Sequence[ClipTokens],
    cfg: tp.Any,
    finetune: dict[str, tp.Any],
    method_export: tp.Any,
    audio_reference: dict | None = None,
    timeline: tp.Mapping[str, bytes] | None = None,
) -> Path:
    """The part of the export that can fail on the disk: the report, the samples, the tar."""
    history = result.history
    extra: dict[str, bytes] = {"loss.png": plot_history(history, result.evaluation)}
    extra.update(sorted((timeline or {}).items()))  # samples during training (samples/during/step_<n>_<i>.mp3)
    if params.sample_duration > 0:
        model.lm.load_state_dict(result.state_dict)
        descriptions = sample_descriptions(clips)
        logger.info("Generating %d samples of %.1f s: %s", len(descriptions), params.sample_duration, descriptions)
        samples = generate_samples(model, descriptions, params.sample_duration, params.sampler_precision)
        for i, data in enumerate(samples):
            extra[f"samples/sample_{i}.wav"] = data
        finetune["samples"] = [
            {"file": f"samples/sample_{i}.wav", "description": d} for i, d in enumerate(descriptions)
        ]
    comparison = None  # base vs fine-tuned samples of held-out prompts (training/evaluate.py: audio_check)
    heldout: dict[str, bytes] = {}  # the same samples as files beside the tar, side by side
    if audio_reference is not None and finetune.get("validation") is not None and params.sample_duration > 0:
        check = audio_check(model, audio_reference, clips)  # the LM holds the exported weights (loaded above)
        comparison = check.pop("audio")  # raw decodes: the metrics above were measured on these
        rate = int(comparison["rate"])
        for side in ("base", "finetuned"):  # what the page and the files play: normalized as predict's outputs
            comparison[side] = [normalized(w, rate) for w in comparison[side]]
            for i, wav in enumerate(comparison[side]):
                heldout[f"samples/heldout_{i}_{side}.wav"] = wav_bytes(wav, rate, normalize_first=False)
        heldout = dict(sorted(heldout.items()))
        finetune["validation"]["audio"] = finite_json(check)
        # the samples' health: the report's verdict, the log's result line, wandb's summary, metrics.json
        finetune["validation"]["sample_flags"] = sample_flags(check.get("health"))
    # after the audio check: metrics.json carries the whole base-vs-fine-tuned table (Fréchet, copy check) too
    extra["metrics.json"] = metrics_json(history, finetune.get("validation"), finetune["training"]["exported_step"])
    # report.html: all of the above on one self-contained page, the samples next to a training clip
    timeline = dict(timeline or {})
    samples = [(name, data) for name, data in extra.items() if name.startswith("samples/") and name not in timeline]
    reference = reference_clip(clips, params.sample_duration) if samples else None
    extra["report.html"] = render_html(finetune, history, samples, reference, comparison, timeline)
    # The same fine-tune in transformers' format, in output_dir/transformers/ and under transformers/ in the tar
    portable = transformers_export(out_tar.parent / weights.TRANSFORMERS_FOLDER, cfg, finetune, method_export, params)
    out_tar = weights.write_trained_model(
        out_tar,
        state_dict=method_export.state_dict,
        cfg=cfg,
        base_model=params.model_version,
        finetune=finetune,
        extra_files=method_export.extra_files,
        report_files=extra,
        portable_files=portable,
    )
    # Beside the tar too, to read, open and listen to without unpacking it: the report, the curves, the samples.
    beside = {name: extra[name] for name in ("metrics.json", "report.html", "loss.png")}
    beside.update((name, data) for name, data in samples)
    beside.update(heldout)
    beside.update(timeline)
    try:
        write_beside(out_tar.parent, beside)
    except OSError as e:  # the tar is written and holds all but the held-out files (report.html plays those too)
        logger.warning(
            "Could not write the report's files beside %s (%s); they are inside it (report.html, loss.png, "
            "metrics.json, samples/)",
            out_tar.name,
            e.strerror or e,
        )
        return out_tar
    # Announced once each: the tar by core.weights ("Wrote ..."), the report by the entry point's summary.
    side_by_side = " (heldout_<i>_base/_finetuned.wav: base and fine-tune side by side)" if heldout else ""
    listed = [name for name in beside if name not in timeline]
    listed += [f"{TIMELINE_FOLDER}/ ({len(timeline)} samples during training)"] if timeline else []
    logger.info("Beside it in %s: %s%s", out_tar.parent, ", ".join(listed), side_by_side)
    return out_tar


# ------------------------------------------------------------------------------------------- transformers form


def transformers_export(
    folder: Path, cfg: tp.Any, finetune: dict[str, tp.Any], method_export: tp.Any, params: TrainParams
) -> dict[str, Path]:
    """Write the fine-tune in transformers' format into `folder` (replaced whole, through a temp folder) and
    record what it is in `finetune['transformers']`; returns its files (name -> path) for the tar.

    - A LoRA adapter (not `lora_merge`): a PEFT adapter on the transformers form of the base
      (`core.weights.peft_format`), written from the adapter's tensors.
    - Every other export: the whole model, converted from the model the tar's weights make (loaded from them as
      predict loads them, on the CPU: a LoRA merged, learned embeddings put in, in the tar's fp16 values), so the
      two forms hold the same weights. A textual inversion's T5 trigger becomes new tokenizer tokens whose rows of
      T5's input embeddings are the learned ones (`transformers_format`).

    A model transformers cannot represent (`transformers_format.unsupported_reason`: MusicGen-Style, LUT or no text
    encoder) gets no folder: finetune.json says why, and the log says it once. A conversion that fails does not
    fail the export (the tar is the fine-tune): it is logged as an error and recorded the same way.
    """
    spec = SPEC.get(params.model_version)
    reason = transformers_format.unsupported_reason(spec if spec is not None else cfg)
    if reason:
        logger.warning("No transformers form of this fine-tune (%s); trained_model.tar holds it for predict", reason)
        finetune["transformers"] = {"unsupported": reason}
        return {}
    lora = method_export.info.get("adapter") or {}
    try:
        with tempfile.TemporaryDirectory(prefix=".transformers-", dir=folder.parent) as tmp:
            staged = Path(tmp) / "out"
            if lora and not lora.get("merged"):
                base = spec.hub_id if spec is not None and spec.hub_id else params.model_version
                from safetensors.torch import load as load_safetensors

                tensors = load_safetensors(method_export.extra_files[adapters.ADAPTER_FILE])  # the tar's fp16 values
                write_beside(staged, peft_format.peft_adapter_files(tensors, lora, base))
                record = {"kind": "peft_adapter", "base_model": base}
            else:
                model = _as_predict_loads(Path(tmp), cfg, finetune, method_export, params)
                converted = transformers_format.to_transformers(model.lm, model.musicgen.compression_model)
                text = model.lm.condition_provider.conditioners["description"]
                if isinstance(text, adapters.T5TriggerMixin):
                    put_trigger_rows(converted, text)
                tokenizer = transformers_format.text_tokenizer(model.lm)  # a trigger's tokens included
                del model
                transformers_format.save_transformers(converted, staged, tokenizer=tokenizer)
                record = {"kind": "model", "class": type(converted).__name__}
                del converted
            ours = transformers_format.is_transformers_folder(folder) or peft_format.is_peft_folder(folder)
            if folder.exists() and not ours and any(folder.iterdir()):
                raise FileExistsError(f"{folder} exists and is not a transformers export: not replacing it")
            if folder.exists():  # an earlier training's in this output_dir, replaced as its tar is
                shutil.rmtree(folder)
            os.replace(staged, folder)
    except Exception as e:  # noqa: BLE001 - the tar is the fine-tune; this form is extra
        logger.error("Could not write the transformers form of this fine-tune (%s: %s)", type(e).__name__, e)
        finetune["transformers"] = {"unsupported": f"the conversion failed: {type(e).__name__}: {e}"[:500]}
        return {}
    finetune["transformers"] = {"folder": weights.TRANSFORMERS_FOLDER, **record}
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    size = sum(p.stat().st_size for p in files.values())
    logger.info("Wrote the transformers form (%s, %.1f MB) to %s", record["kind"], size / 1e6, folder)
    return files


def put_trigger_rows(model: tp.Any, conditioner: tp.Any) -> None:
    """A textual inversion's learned T5 rows (`trigger_embedding` `[n, d_model]`, the placeholder tokens' input
    embeddings, see `core.adapters.add_t5_trigger`) into the transformers model's text encoder table, at the ids the
    tokenizer gives those tokens (the table grows when they lie past its end)."""
    first, n = int(conditioner.trigger_first_id), int(conditioner.trigger_embedding.shape[0])
    encoder = model.text_encoder
    if first + n > encoder.get_input_embeddings().num_embeddings:
        encoder.resize_token_embeddings(first + n)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[first : first + n] = conditioner.trigger_embedding.detach().to(table.device, table.dtype)


def _as_predict_loads(tmp: Path, cfg: tp.Any, finetune: dict, method_export: tp.Any, params: TrainParams) -> tp.Any:
    """The fine-tune as predict would load it from the tar's weights members (written into `tmp/weights`)."""
    members = weights.weights_members(
        state_dict=method_export.state_dict,
        cfg=cfg,
        base_model=params.model_version,
        finetune=finetune,
        extra_files=method_export.extra_files,
    )
    write_beside(tmp / "weights", members)
    del members
    return weights.load_trained_model(tmp / "weights", device="cpu")


# ------------------------------------------------------------------------------------------------ nothing lost

FP16_MAX = float(torch.finfo(torch.float16).max)  # the tar stores the LM and adapters in fp16


class ExportFailed(InputError):
    """Writing `trained_model.tar` into `output_dir` failed after the training finished; the message says where the
    trained state was kept and how to export it without training again."""

    def __init__(self, message: str):
        super().__init__("output_dir", message)


def check_output_dir(output_dir: str | Path) -> Path:
    """`output_dir` and every folder the trainer writes in it (checkpoints/, work/, cache/) are folders we can
    write to, before any work: creates `output_dir`; a file in the way or a read-only folder is an InputError
    naming `output_dir` and the fix (not a traceback after the dataset was prepared, or after the training)."""
    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError("output_dir", f"{folder} is a file, not a folder; give a folder (created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            "output_dir", f"cannot create {folder} ({e.strerror or e}); give a folder you can write to"
        ) from None
    # The subfolders are not created here (preparation marks its own work folder as ours); writing in the output
    # folder covers creating them, and an existing one must be a writable folder itself.
    for target in (folder, folder / "checkpoints", folder / "work", folder / "cache"):
        if not target.exists():
            continue
        if not target.is_dir():
            raise InputError(
                "output_dir",
                f"{target} is a file where the trainer writes its {target.name}/ folder; move it away or give "
                "another output_dir",
            )
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=target)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InputError(
                "output_dir",
                f"{target} is not writable ({e.strerror or e}); make it writable (e.g. chmod u+w) or give another "
                "output_dir",
            ) from None
    tar = folder / TAR_NAME
    if tar.is_dir():
        raise InputError("output_dir", f"{tar} is a folder, where the trained model goes; move it away")
    return folder


def _exported_tensors(method_export: tp.Any) -> tp.Iterator[tuple[str, torch.Tensor, str]]:
    """`(name, tensor as the tar stores it, member)` for every tensor that goes into the tar."""
    from safetensors.torch import load as load_safetensors

    for name, t in method_export.state_dict.items():
        # state_dict.bin holds fp16 (core.weights.lm_package): a finite fp32 value past 65504 becomes inf there
        yield name, t.detach().to(torch.float16) if t.is_floating_point() else t, "state_dict.bin"
    for member, data in method_export.extra_files.items():
        if member.endswith(".safetensors"):
            for name, t in load_safetensors(data).items():
                yield name, t, member


def check_exported_finite(method_export: tp.Any, step: int, checkpoint_dir: Path | None) -> None:
    """No tar with NaN/inf weights: such a model loads and then fails (or plays noise) in predict."""
    for name, stored, member in _exported_tensors(method_export):
        bad = ckpt.first_non_finite([(name, stored)])
        if bad is None:
            continue
        what = bad[1]
        original = method_export.state_dict.get(name) if member == "state_dict.bin" else None
        if original is not None and ckpt.first_non_finite([(name, original)]) is None:
            what += f" once stored in fp16 (|value| > {FP16_MAX:.0f})"
        last = ckpt.newest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        raise NonFiniteError(
            f"The trained weights are not finite after step {step} (the last): '{name}' ({member}) holds {what}; "
            f"no trained_model.tar was written. Last finite state: {resume_hint(last)}. Lower lr (adamw: e.g. "
            "1e-5) or weight_decay, keep max_grad_norm on, or use precision bf16/fp32."
        )


def keep_trained_state(result: TrainResult, params: TrainParams, checkpoint_dir: Path | None) -> Path | None:
    """A resume checkpoint of the finished run, for when its export failed: the one save_every already wrote at
    the last step, else a new one in `checkpoint_dir`, else in a new temporary folder. None if nothing could be
    written anywhere (every attempt is logged)."""
    newest = ckpt.newest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if newest is not None and ckpt.checkpoint_step(newest) == result.steps:
        return newest
    state = finished_state(result, params)
    folders: list[tp.Callable[[], Path]] = [lambda: Path(tempfile.mkdtemp(prefix="musicgen-ft-checkpoints-"))]
    if checkpoint_dir is not None:
        folders.insert(0, lambda: Path(checkpoint_dir))
    for folder in folders:
        try:
            path = ckpt.save_checkpoint(folder(), result.steps, state)
        except Exception as e:  # noqa: BLE001 - any failure: try the next place
            logger.warning("Could not keep the trained state as a checkpoint (%s: %s)", type(e).__name__, e)
            continue
        logger.warning("The trained state of all %d steps is kept as a resume checkpoint: %s", result.steps, path)
        return path
    return None


def _export_failure(error: BaseException, out_tar: Path, steps: int, kept: Path | None) -> BaseException | None:
    """The error to raise for a failed export (None: re-raise `error` itself, with a note where the state is)."""
    finished = f"after the training finished ({steps} steps)"
    if kept is not None:
        how = (
            f"the trained state is kept in {kept}; export it without training again: the same inputs and "
            f"--resume_from {kept.parent} (Cog: resume_from=<that file>)"
        )
    else:
        how = "the trained state could not be saved anywhere either (see the log)"
    if isinstance(error, KeyboardInterrupt):
        return TrainingInterrupted(f"Ctrl-C stopped the export {finished}; {how}", 130)
    cause = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError):
        return ExportFailed(
            f"writing {out_tar} failed {finished} ({cause}): free space or make {out_tar.parent} writable; {how}"
        )
    if isinstance(error, Exception):
        error.add_note(f"The export failed {finished}; {how}")
    else:  # Cog's cancel: it ends as a cancel; the log says where the state is
        logger.warning("Export cancelled %s; %s", finished, how)
    return None
