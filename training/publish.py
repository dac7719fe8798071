"""Training on Replicate: Weights & Biases logging, the push of the result to a Hugging Face model repo, and the
secrets both need.

On Replicate nothing outlives the container but what the training returns, so:

- `wandb_api_key` (a Cog Secret) turns on Weights & Biases. The key goes to wandb in memory only
  (`wandb.Settings(api_key=...)`): not into our environment, not into `~/.netrc`, not into a file of ours.
- `hf_repo_id` + `hf_token` push `trained_model.tar`, a model card (README.md) and, beside it, the loss plot and
  the samples the card links, and the transformers form of the fine-tune (the tar's `transformers/` folder) at the
  repo's root, so that transformers and peft load the repo by its id. A cancelled or SIGTERM-ed training pushes
  its resume checkpoint to `checkpoints/` and logs the `resume_from` URL, since its temp folder is gone once the
  container stops.
- Neither a failed wandb start nor a failed push stops a training or loses its weights: an ERROR line (secrets
  masked) and the run goes on / the tar is still returned.

Secret inputs (`core.params.secret_fields(TrainParams)`) never reach a file or a log line: the training loop, the
checkpoints and finetune.json get the inputs with the secrets blanked (`without_secrets`); torchrun workers get
them through their environment (`worker_env`; `training.worker` takes them out of it first thing), not through
the params file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import string
import tarfile
import tempfile
import typing as tp
from pathlib import Path, PurePosixPath

from core.catalogue import PRETRAINED, PRETRAINED_COMPRESSION, SPEC, STYLE_PRETRAINED
from core.params import InputError, secret_fields
from core.weights.format import TRANSFORMERS_FOLDER
from training.checkpoint import list_checkpoints
from training.params import TrainParams
from training.report import headline
from training.worker_env import secret_env

logger = logging.getLogger(__name__)

__all__ = [
    "SECRET_FIELDS",
    "public_inputs",
    "without_secrets",
    "redact",
    "check_inputs",
    "wandb_enabled",
    "start_wandb",
    "model_card",
    "push_trained_model",
    "push_checkpoint",
    "report_interrupted",
    "worker_env",
    "worker_secrets",
]

SECRET_FIELDS: tuple[str, ...] = secret_fields(TrainParams)
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
# Hub repo ids: "namespace/name", letters, digits, '-', '_', '.'; no '--' or '..', no leading/trailing '-'/'.'
# (the rules huggingface_hub's validate_repo_id applies, plus the namespace we need for the resume URL).
_REPO_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?$")
NON_COMMERCIAL = "cc-by-nc-4.0"
# The model card's text (README.md of the pushed repo); model_card fills in its `${...}` fields.
MODEL_CARD_TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"


# ---------------------------------------------------------------------------------------------------- secrets


def _secret_values(params: TrainParams) -> list[str]:
    return [v for name in SECRET_FIELDS if isinstance(v := getattr(params, name), str) and v]


def public_inputs(params: TrainParams) -> dict[str, tp.Any]:
    """The training inputs as a plain dict, without the secret ones (wandb config, model card)."""
    return {k: v for k, v in dataclasses.asdict(params).items() if k not in SECRET_FIELDS}


def without_secrets(params: TrainParams) -> TrainParams:
    """`params` with every secret input blanked: what the loop, the checkpoints and the export are given, so that
    no file they write can hold a credential."""
    return dataclasses.replace(params, **{name: None for name in SECRET_FIELDS})


def redact(text: str, params: TrainParams) -> str:
    """`text` with every secret value of `params` masked (error messages of third-party libraries we log)."""
    for value in _secret_values(params):
        text = text.replace(value, "***")
    return text


def worker_env(params: TrainParams) -> dict[str, str]:
    """Environment of the torchrun workers `run_training` starts: the secrets (the params file they read has none)."""
    return secret_env({name: getattr(params, name) for name in SECRET_FIELDS if getattr(params, name)})


def worker_secrets(popped: dict[str, str]) -> dict[str, str]:
    """The secret inputs among what `training.worker_env.pop_secret_env` took out of a worker's environment (a name
    that is not a secret input of this version is dropped with a warning: it cannot be passed on as an input)."""
    unknown = sorted(set(popped) - set(SECRET_FIELDS))
    if unknown:
        logger.warning("Ignoring environment entries that name no secret input: %s", ", ".join(unknown))
    return {name: value for name, value in popped.items() if name in SECRET_FIELDS}


# ---------------------------------------------------------------------------------------------------- checks


def wandb_enabled(params: TrainParams) -> bool:
    """use_wandb, or a wandb_api_key given (which turns it on)."""
    return bool(params.use_wandb or params.wandb_api_key)


def check_inputs(params: TrainParams) -> None:
    """The wandb and Hugging Face inputs, checked before any long work."""
    if wandb_enabled(params):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise InputError(
                "use_wandb", "Weights & Biases is not installed (pip install wandb); or set use_wandb to false"
            ) from None
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        if not params.wandb_api_key and not os.environ.get("WANDB_API_KEY") and not offline:
            raise InputError(
                "use_wandb",
                "no Weights & Biases API key: give wandb_api_key (https://wandb.ai/authorize), or set the "
                "WANDB_API_KEY environment variable where the training runs, or set use_wandb to false",
            )
    if params.hf_repo_id and not params.hf_token:
        raise InputError(
            "hf_token",
            f"hf_repo_id={params.hf_repo_id!r} needs a Hugging Face token with write access "
            "(https://huggingface.co/settings/tokens) as hf_token; or leave hf_repo_id empty",
        )
    if params.hf_token and not params.hf_repo_id:
        raise InputError(
            "hf_repo_id",
            "hf_token is set but hf_repo_id is empty: give the model repo to push to, as user/name (or org/name); "
            "or leave hf_token empty",
        )
    if params.hf_repo_id:
        repo_id = params.hf_repo_id
        if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
            raise InputError(
                "hf_repo_id",
                f"{repo_id!r} is not a Hugging Face repo id: write user/name or org/name (letters, digits, '-', "
                "'_', '.'; at most 96 characters per part; no '--' or '..'), e.g. alice/my-musicgen",
            )


# ---------------------------------------------------------------------------------------------------- wandb


class WandbRun:
    """A wandb run whose failures never reach the training: the first error is logged, later calls do nothing."""

    def __init__(self, run: tp.Any, params: TrainParams) -> None:
        self.run = run
        self._params = params
        self._broken = False

    def _guard(self, what: str, fn: tp.Callable[[], tp.Any]) -> None:
        if self._broken:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - logging must never end a training
            self._broken = True
            logger.error(
                "Weights & Biases %s failed (%s: %s); training continues without wandb logging",
                what,
                type(e).__name__,
                redact(str(e), self._params),
            )

    def log(self, metrics: dict[str, tp.Any]) -> None:
        self._guard("log", lambda: self.run.log(metrics))

    def log_audio(self, step: int, samples: list[tuple[str, tp.Any]], rate: int, flags: list[str]) -> None:
        """The samples of one evaluation (`(prompt, [C, T] audio)`), under `samples_during/<i>` at `step`, and their
        health flags (`samples_during/flags`, "none" when healthy)."""
        self._guard("sample upload", lambda: _log_audio(self.run, step, samples, rate, flags))

    def log_samples(self, tar: Path) -> None:
        self._guard("sample upload", lambda: _log_samples(self.run, tar))
        self._guard("summary", lambda: self.run.summary.update(run_summary(tar)))

    def finish(self, exit_code: int | None = None) -> None:
        if not self._broken:
            self._guard("finish", lambda: self.run.finish(exit_code=exit_code))


def start_wandb(params: TrainParams, output_dir: Path) -> WandbRun | None:
    """Start a wandb run (rank 0), or None when wandb is off or cannot start (logged as an ERROR: the training
    goes on without it). The run folder is `output_dir/wandb/` unless WANDB_DIR says otherwise."""
    if not wandb_enabled(params):
        return None
    if params.wandb_api_key and not params.use_wandb:
        logger.info("use_wandb turned on: wandb_api_key was given")
    try:
        import wandb

        # The key goes to wandb in memory only: not into os.environ (every child process would inherit it) and not
        # through wandb.login, which writes it to ~/.netrc.
        key = (params.wandb_api_key or "").strip()  # a pasted key often ends with a newline
        settings = wandb.Settings(api_key=key) if key else None
        run_dir = Path(os.environ.get("WANDB_DIR") or output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=params.wandb_project or None,
            entity=params.wandb_entity or None,
            config=public_inputs(params),
            dir=str(run_dir),
            settings=settings,
        )
    except Exception as e:  # noqa: BLE001 - a bad key, no network, a wandb outage: never a reason to stop
        logger.error(
            "Weights & Biases could not start (%s: %s); training continues without wandb logging. Check "
            "wandb_api_key, wandb_project and wandb_entity",
            type(e).__name__,
            redact(str(e), params),
        )
        return None
    logger.info("Weights & Biases run: %s", getattr(run, "url", None) or getattr(run, "dir", ""))
    return WandbRun(run, params)


def run_summary(tar: Path) -> dict[str, tp.Any]:
    """The run's summary on wandb, from the tar's metrics.json: the exported step, the validation loss base / best /
    last, forgetting base / exported, and the flags ("none" when nothing was flagged) — the headline of the
    report, so a run list shows which fine-tunes worked."""
    metrics = json.loads(_report_files(tar).get("metrics.json", b"{}"))
    summary: dict[str, tp.Any] = {"exported_step": metrics.get("exported_step")}
    validation = metrics.get("validation") or {}
    if validation.get("base_loss") is not None:
        summary.update(
            val_loss_base=validation.get("base_loss"),
            val_loss_best=validation.get("best_loss"),
            val_loss_last=validation.get("final_loss"),
            flags=", ".join(validation.get("flags") or []) or "none",
        )
        if "sample_flags" in validation:  # the samples' health (training/evaluate.py: sample_flags)
            summary["sample_flags"] = ", ".join(validation["sample_flags"]) or "none"
        forgetting = validation.get("forgetting") or {}
        if forgetting.get("base_loss") is not None:
            summary["forget_loss_base"] = forgetting["base_loss"]
            summary["forget_loss_exported"] = forgetting.get("exported_loss")
    return summary


def _log_audio(run: tp.Any, step: int, samples: list[tuple[str, tp.Any]], rate: int, flags: list[str]) -> None:
    import wandb

    logged = {
        f"samples_during/{i}": wandb.Audio(wav.numpy().T, sample_rate=rate, caption=f"step {step}: {prompt}")
        for i, (prompt, wav) in enumerate(samples)
    }
    run.log({"step": step, **logged, "samples_during/flags": ", ".join(flags) or "none"})


def _log_samples(run: tp.Any, tar: Path) -> None:
    import wandb

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in _report_files(tar).items():
            if name.startswith("samples/") and not name.startswith("samples/during/"):  # logged as they came
                target = Path(tmp) / PurePosixPath(name).name
                target.write_bytes(data)
                run.log({f"samples/{target.stem}": wandb.Audio(str(target))})


# ---------------------------------------------------------------------------------------------------- model card


def _base_repo(model_version: str) -> str | None:
    return {**PRETRAINED, **STYLE_PRETRAINED}.get(model_version)


_METHODS = {
    "full": "full fine-tuning (every weight of the language model)",
    "lora": "LoRA (low-rank adapters on the attention and feed-forward projections)",
    "text_projection": "text projection (only the projection of the text conditioning)",
    "textual_inversion": "textual inversion (only the trigger word's new T5 token embeddings)",
}


def model_card(finetune: dict[str, tp.Any], repo_id: str, files: tp.Sequence[str] = ()) -> str:
    """README.md of the pushed repo, from the tar's finetune.json: base model, method, trigger, training inputs
    (secrets dropped even if present), label vocabulary, descriptions, training summary, loss plot and samples
    (`files`: the repo paths uploaded beside it, e.g. loss.png, samples/sample_0.wav), license. The card's text is
    `templates/model_card.md`; the sections that list the run's own values are built here."""
    version = str(finetune.get("model_version", ""))
    method = str(finetune.get("method", "full"))
    inputs = {k: v for k, v in dict(finetune.get("training_inputs") or {}).items() if k not in SECRET_FIELDS}
    base = _base_repo(version)
    known = SPEC.get(version)
    scratch = known is not None and known.scratch
    # a new LM on facebook/encodec_32khz (micro) carries Meta's non-commercial EnCodec weights too
    meta_weights = base is not None or (scratch and known.compression == PRETRAINED_COMPRESSION)
    tags = ["musicgen", "audiocraft", "text-to-audio", "music", "fine-tuned", method.replace("_", "-")]
    if base:
        origin = f"[{base}](https://huggingface.co/{base})"
    elif scratch:
        origin = f"a new `{version}` language model trained from scratch"
    else:
        origin = f"the `{version}` model (a small random test model built offline)"
    trigger = finetune.get("trigger")
    portable = dict(finetune.get("transformers") or {})
    library = {"model": "transformers", "peft_adapter": "peft"}.get(str(portable.get("kind")), "audiocraft")
    prompt = f"{trigger + ', ' if trigger else ''}rainy night lofi"
    return string.Template(MODEL_CARD_TEMPLATE.read_text(encoding="utf-8")).substitute(
        license=NON_COMMERCIAL if meta_weights else "other",
        library=library,
        audiocraft=_audiocraft_use(finetune, repo_id, prompt),
        transformers=_transformers_use(finetune, repo_id, prompt, base),
        base_model_line=f"base_model: {json.dumps(base)}\n" if base else "",
        tags=json.dumps(tags),
        name=repo_id.split("/")[-1],
        origin=origin,
        method=_METHODS.get(method, method),
        prior="\n" + _PRIOR if inputs.get("prior_preservation") else "",
        trigger_line=f"\n\nTrigger word: `{trigger}`: start your prompts with it to call the trained style."
        if trigger
        else "",
        repo_id=repo_id,
        prompt_prefix=trigger + ", " if trigger else "",
        sections="".join(_card_sections(finetune, inputs, files)),
        license_text=_META_LICENSE if meta_weights else _NO_LICENSE,
    )


def _audiocraft_use(finetune: dict[str, tp.Any], repo_id: str, prompt: str) -> str:
    """The card's "With audiocraft" paragraph: audiocraft's own loader reads the extracted tar when it holds the
    whole LM; a tar that references its base (an adapter, learned embeddings) needs our loader."""
    adapter = dict(finetune.get("adapter") or {})
    if finetune.get("embeddings") is not None or (adapter and not adapter.get("merged")):
        return (
            "This tar holds only what was learned and references its base model, which audiocraft's loader alone "
            "cannot apply: use `predict.py` above (or `core.weights.load_trained_model` of the MusicGen fine-tuner, "
            "which returns audiocraft's `MusicGen`), or the transformers form below."
        )
    name = repo_id.split("/")[-1]
    return "\n".join(
        [
            "The extracted tar is a model folder for audiocraft's `MusicGen.get_pretrained` (after the `hf download`",
            "above):",
            "",
            "```python",
            "import tarfile",
            "",
            "from audiocraft.models import MusicGen",
            "",
            'with tarfile.open("trained_model.tar") as archive:',
            f'    archive.extractall("{name}", filter="data")',
            f'model = MusicGen.get_pretrained("{name}")',
            "model.set_generation_params(duration=8)",
            f'wav = model.generate(["{prompt}"])  # [B, C, T] at model.sample_rate',
            "```",
        ]
    )


def _transformers_use(finetune: dict[str, tp.Any], repo_id: str, prompt: str, base: str | None) -> str:
    """The card's "With transformers" paragraph, from finetune.json's `transformers` record: the whole model with
    `from_pretrained` + `generate`, a PEFT adapter on its base, or why there is no transformers form."""
    portable = dict(finetune.get("transformers") or {})
    kind = portable.get("kind")
    if kind not in ("model", "peft_adapter"):
        reason = portable.get("unsupported") or "it was trained before this form was written"
        return f"This fine-tune has no transformers form: {reason}."
    tokens = dict(finetune.get("embeddings") or {}).get("tokens")
    text = prompt
    note = ""
    if tokens:  # transformers' tokenizer has no trigger-word substitution: the placeholder tokens are written out
        text = prompt.replace(str(finetune.get("trigger")), "".join(tokens), 1)
        note = f"In transformers, write the trigger as its learned tokens `{''.join(tokens)}`.\n\n"
    cls = str(portable.get("class") or "MusicgenForConditionalGeneration")  # the melody class for melody models
    lines = ["```python", f"from transformers import AutoProcessor, {cls}"]
    if kind == "peft_adapter":
        base_id = str(portable.get("base_model") or base)
        lines[1:1] = ["from peft import PeftModel"]
        lines += [
            "",
            f'base = {cls}.from_pretrained("{base_id}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}").merge_and_unload()',
            f'processor = AutoProcessor.from_pretrained("{base_id}")',
        ]
        intro = f"The repo's root holds a PEFT LoRA adapter on `{base_id}`:"
    else:
        lines += [
            "",
            f'model = {cls}.from_pretrained("{repo_id}")',
            f'processor = AutoProcessor.from_pretrained("{repo_id}")',
        ]
        intro = f"The repo's root holds the whole model for transformers' `{cls}`:"
    lines += [
        f'inputs = processor(text=["{text}"], padding=True, return_tensors="pt")',
        "audio = model.generate(**inputs, do_sample=True, max_new_tokens=256)  # [B, C, T]",
        "rate = model.config.audio_encoder.sampling_rate",
        "```",
    ]
    return f"{intro}\n\n{note}" + "\n".join(lines)


_PRIOR = "Trained with DreamBooth-style prior preservation (class examples generated by the base model)."
_META_LICENSE = (
    "Derived from Meta's MusicGen weights (facebook/musicgen-*, facebook/encodec_32khz), released under "
    "[CC-BY-NC 4.0](https://creativecommons.org/licenses/by-nc/4.0/): these weights are for non-commercial "
    "use under the same license. Make sure you hold the rights to the training audio."
)
_NO_LICENSE = "Built from a small random test model, with no Meta weights; no license is set here."
_TRAINING_LABELS = (
    ("steps", "optimizer steps"),
    ("clips", "training clips"),
    ("first_loss", "first loss"),
    ("final_loss", "final loss"),
    ("precision", "precision"),
    ("seconds", "seconds"),
    ("world_size", "processes"),
    ("global_batch", "batch"),
    ("parallel", "parallelism"),
)


def _card_sections(finetune: dict[str, tp.Any], inputs: dict[str, tp.Any], files: tp.Sequence[str]) -> list[str]:
    """The card's sections between "Use" and "License", each starting with its blank line: the run's numbers, the
    validation headline, the loss plot, the samples, the labels, the descriptions, the inputs (where present)."""
    lines: list[str] = []
    training = dict(finetune.get("training") or {})
    if training:
        lines += ["", "## Training", ""]
        for key, label in _TRAINING_LABELS:
            if training.get(key) is not None:
                value = training[key]
                lines.append(f"- {label}: {round(value, 4) if isinstance(value, float) else value}")
    validation = finetune.get("validation")
    if validation:  # whether it worked, measured on held-out tracks: what a visitor wants to know first
        result = headline(validation, training.get("exported_step")).removeprefix("Result: ")
        lines += ["", "## Validation", "", f"On held-out tracks: {result}."]
        if "report.html" in files:
            lines.append("The whole report (curves, samples, base vs fine-tuned): [report.html](report.html).")
    if "loss.png" in files:
        lines += ["", "![training loss](loss.png)"]
    samples = [f for f in files if f.startswith("samples/")]
    if samples:
        described_samples = {s.get("file"): s.get("description", "") for s in finetune.get("samples") or []}
        lines += ["", "## Samples", "", "Generated with these weights after training, from training descriptions:", ""]
        for path in samples:
            text = described_samples.get(path) or ""
            lines.append(f"- [{path}]({path}){': ' + text if text else ''}")
            lines.append(f'  <audio controls src="{path}"></audio>')
    labels = dict(finetune.get("labels") or {})
    if labels:
        lines += ["", "## Labels", "", "The vocabulary of the training descriptions, per field:", ""]
        for field, values in labels.items():
            lines.append(f"- {field}: {', '.join(str(v) for v in values)}")
    descriptions = list(finetune.get("descriptions") or [])
    if descriptions:
        lines += ["", "## Training descriptions", ""]
        lines += [f"- {d}" for d in descriptions[:50]]
        if len(descriptions) > 50:
            lines.append(f"- ... ({len(descriptions) - 50} more in finetune.json inside the tar)")
    if inputs:
        lines += ["", "## Training inputs", "", "```json", json.dumps(inputs, indent=1, sort_keys=True), "```"]
    return ["\n" + line for line in lines]


# ---------------------------------------------------------------------------------------------------- push


def _report_files(tar: Path) -> dict[str, bytes]:
    """finetune.json and the report (loss.png, metrics.json, report.html, samples/*.wav) of a trained_model.tar
    (regular files only)."""
    out: dict[str, bytes] = {}
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            wanted = member.name in ("finetune.json", "loss.png", "metrics.json", "report.html") or (
                member.name.startswith("samples/") and member.name.endswith(".wav") and ".." not in member.name
            )
            if wanted and member.isfile():
                source = archive.extractfile(member)
                if source is not None:
                    out[member.name] = source.read()
    return out


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


@contextlib.contextmanager
def _hub_online() -> tp.Iterator[None]:
    """The user asked for a push: a deployment's HF_HUB_OFFLINE (meant for model loads) must not block it."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _commit(params: TrainParams, files: dict[str, bytes | Path], message: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=_endpoint(), token=(params.hf_token or "").strip())
    with _hub_online():
        api.create_repo(params.hf_repo_id, repo_type="model", private=True, exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(data) if isinstance(data, Path) else data)
            for path, data in files.items()
        ]
        api.create_commit(params.hf_repo_id, operations=operations, commit_message=message, repo_type="model")


def push_trained_model(params: TrainParams, tar: Path) -> str | None:
    """Push `tar`, its model card, loss plot and samples to `hf_repo_id`. Returns the repo URL, or None when there
    is no repo to push to or the push failed (the error is logged; the tar stays where it is)."""
    if not params.hf_repo_id or not params.hf_token:
        return None
    url = f"{_endpoint()}/{params.hf_repo_id}"
    logger.info("Pushing %s (%.1f MB) to Hugging Face: %s", tar.name, tar.stat().st_size / 1e6, url)
    try:
        with tempfile.TemporaryDirectory(prefix=".push-", dir=tar.parent) as tmp:
            report = _report_files(tar)
            finetune = json.loads(report.pop("finetune.json", b"{}"))
            # the transformers form at the repo's root: `from_pretrained(repo_id)` / `PeftModel.from_pretrained`
            portable = _transformers_files(tar, Path(tmp))
            files: dict[str, bytes | Path] = {"trained_model.tar": tar, **report, **portable}
            files["README.md"] = model_card(finetune, params.hf_repo_id, sorted(report)).encode()
            message = f"Trained model ({finetune.get('method', '')} on {finetune.get('model_version', '')})"
            _commit(params, files, message)
    except Exception as e:  # noqa: BLE001 - a failed push must never lose the trained weights
        logger.error(
            "Push to Hugging Face %s failed (%s: %s). The trained weights are still returned as %s",
            params.hf_repo_id,
            type(e).__name__,
            redact(str(e), params),
            tar.name,
        )
        return None
    extra = f", the transformers form ({', '.join(sorted(portable))})" if portable else ""
    logger.info("Pushed to %s (trained_model.tar, README.md, %d report files%s)", url, len(report), extra)
    return url


def _transformers_files(tar: Path, tmp: Path) -> dict[str, Path]:
    """The transformers form inside `tar` (`transformers/<name>`), extracted into `tmp`: name -> file."""
    prefix = TRANSFORMERS_FOLDER + "/"
    out: dict[str, Path] = {}
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix(prefix)
            if not (member.isfile() and member.name.startswith(prefix)) or ".." in name or name.startswith("/"):
                continue
            if name in ("README.md", "trained_model.tar") or name.startswith(("samples/", "checkpoints/")):
                continue  # never in that folder; and never over what the push writes itself
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            with open(target, "wb") as f:
                shutil.copyfileobj(source, f, length=1 << 20)
            out[name] = target
    return out


def push_checkpoint(params: TrainParams, checkpoint: Path) -> str | None:
    """Push a resume checkpoint to `hf_repo_id`/checkpoints/. Returns its download URL, or None (error logged)."""
    path_in_repo = f"checkpoints/{checkpoint.name}"
    logger.info(
        "Pushing the resume checkpoint %s (%.1f MB) to %s/%s",
        checkpoint.name,
        checkpoint.stat().st_size / 1e6,
        params.hf_repo_id,
        path_in_repo,
    )
    try:
        _commit(params, {path_in_repo: checkpoint}, f"Resume checkpoint {checkpoint.name} (training interrupted)")
    except Exception as e:  # noqa: BLE001 - reported; the interruption itself is what the caller re-raises
        logger.error(
            "Push of the resume checkpoint to Hugging Face %s failed (%s: %s)",
            params.hf_repo_id,
            type(e).__name__,
            redact(str(e), params),
        )
        return None
    return f"{_endpoint()}/{params.hf_repo_id}/resolve/main/{path_in_repo}"


def report_interrupted(params: TrainParams, checkpoint_dir: Path) -> str | None:
    """After a cancel or SIGTERM (rank 0): push the newest resume checkpoint when hf_repo_id+hf_token are given and
    log how to resume; otherwise say where it is and whether it outlives the container. Returns the URL pushed."""
    found = list_checkpoints(Path(checkpoint_dir))
    if not found:
        logger.warning("Training interrupted before a resume checkpoint could be saved: nothing to resume from")
        return None
    checkpoint = found[-1]
    if params.hf_repo_id and params.hf_token:
        url = push_checkpoint(params, checkpoint)
        if url:
            logger.warning(
                "Training interrupted; resume checkpoint pushed. To continue, start a training with the same inputs "
                "and resume_from=%s (the repo is private: make it public first, or download the file with your "
                "token and pass that file as resume_from)",
                url,
            )
            return url
    in_temp = _inside(checkpoint, Path(tempfile.gettempdir()))
    if in_temp:
        logger.warning(
            "Training interrupted; its resume checkpoint %s is in a temporary folder of this machine: on Replicate "
            "(or any container) it cannot be reached after the container stops. Give hf_repo_id and hf_token to "
            "have it pushed to your Hugging Face repo (checkpoints/) with the exact resume_from to continue",
            checkpoint,
        )
    else:
        logger.warning("Training interrupted; continue with the same inputs and resume_from=%s", checkpoint)
    return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
