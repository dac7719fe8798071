"""The inputs of a training run: one frozen dataclass, the Cog `train()` inputs and the `python train.py` flags.

Field names and defaults follow sakemin's MusicGen fine-tuner where he has them (dataset_path ... cfg_p); the rest
(grad_accumulation ... method) are ours. `train.py`'s Cog signature is written from this dataclass by
`scripts/cog_signatures.py` (Cog reads it statically). The dataset-preparation inputs are `PrepareParams`' own
and `sampler_precision` is predict's, reused here (`same_as`, `sampler_precision_param`).
"""

from __future__ import annotations

import dataclasses
import typing as tp
from dataclasses import dataclass

from core.catalogue import (
    FINE_TUNED,
    METHODS,
    MODEL_VERSION_CHOICES,
    SPEC,
    TRAINABLE_VERSIONS,
)
from core.params import InputError, names_where, param, same_as
from generation.params import sampler_precision_param
from preprocessing.params import PrepareParams

__all__ = [
    "TrainParams",
    "OPTIMIZERS",
    "LR_SCHEDULERS",
    "PRECISIONS",
    "METHODS",
    "PARALLEL_MODES",
    "FORGETTING_CHECKS",
    "EMA_DECAY",
    "validate",
    "prepare_kwargs",
    "dropped_settings",
    "used_only_by",
    "RESUME_MUST_MATCH",
    "PREPARE_FIELDS",
]

OPTIMIZERS = ("dadam", "adamw")
LR_SCHEDULERS = ("cosine", "exponential", "polynomial_decay", "inverse_sqrt", "linear_warmup")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PARALLEL_MODES = ("auto", "ddp", "fsdp")  # training/fsdp.py
FORGETTING_CHECKS = ("auto", "on", "off")  # training/evaluate.py: forgetting_wanted
EMA_DECAY = 0.99
# AdamW diverges far below this; an lr this large only makes sense for D-Adaptation (where it is a multiplier).
ADAMW_MAX_LR = 0.1


@dataclass(frozen=True)
class TrainParams:
    dataset_path: str | None = same_as(
        PrepareParams, "dataset_path", also="Locally, a folder already prepared by `python -m preprocessing` works too."
    )
    auto_labeling: bool = same_as(PrepareParams, "auto_labeling")
    drop_vocals: bool = same_as(PrepareParams, "drop_vocals")
    one_same_description: str | None = same_as(PrepareParams, "one_same_description")
    trigger: str | None = same_as(PrepareParams, "trigger")
    model_version: str = param(
        "stereo-melody",
        "The MusicGen model to fine-tune. `micro`, `tiny-micro`: a new small model trained from scratch (lm_dim, "
        "lm_layers, lm_heads). The `tiny*` models are small random models for offline tests. (`fine-tuned` is "
        "predict's choice and is refused here.)",
        choices=MODEL_VERSION_CHOICES,
        must_match_on_resume=True,
    )
    epochs: int = param(3, "Number of epochs to train for.", ge=1, le=100000, must_match_on_resume=True)
    updates_per_epoch: int = param(
        100,
        "Optimizer steps per epoch. 0: one pass over the clips per epoch.",
        ge=0,
        le=1000000,
        must_match_on_resume=True,
    )
    batch_size: int = param(
        16,
        "Clips per optimizer step over all GPUs. Rounded up to a multiple of (GPUs x grad_accumulation) when "
        "needed; the adjustment is logged.",
        ge=1,
        le=4096,
        must_match_on_resume=True,
    )
    optimizer: str = param(
        "dadam",
        "`dadam`: D-Adaptation Adam, which finds the step size itself (keep lr=1). `adamw`: AdamW (try lr 1e-5).",
        choices=OPTIMIZERS,
        must_match_on_resume=True,
    )
    lr: float = param(
        1.0,
        "Learning rate. For dadam a multiplier of the adapted step size (1 = as adapted); for adamw the step "
        "size itself (1e-5 is a good start; 0.1 and more is refused).",
        ge=0.0,
        le=100.0,
        must_match_on_resume=True,
    )
    lr_scheduler: str = param(
        "cosine",
        "Learning rate schedule after the warmup: cosine (to 0), exponential (to lr/100), polynomial_decay "
        "(linear to 0), inverse_sqrt, linear_warmup (constant after the warmup).",
        choices=LR_SCHEDULERS,
        must_match_on_resume=True,
    )
    warmup: int = param(
        8, "Optimizer steps of linear learning-rate warmup.", ge=0, le=1000000, must_match_on_resume=True
    )
    cfg_p: float = param(
        0.3,
        "Condition dropout for classifier-free guidance: the share of batches trained without conditions.",
        ge=0.0,
        le=1.0,
        must_match_on_resume=True,
    )
    grad_accumulation: int = param(
        1,
        "Split each GPU's share of the batch into this many micro-batches (less memory, same result).",
        ge=1,
        le=1024,
        must_match_on_resume=True,
    )
    seed: int = param(
        42, "Random seed: data order, crops, condition dropout.", ge=0, le=2**31 - 1, must_match_on_resume=True
    )
    precision: str = param(
        "auto",
        "Training precision. auto: bf16 where the GPU supports it, fp16 with loss scaling on older GPUs, fp32 "
        "on CPU. Weights and optimizer state stay fp32 (mixed precision).",
        choices=PRECISIONS,
    )
    segment_duration: float = param(
        30.0,
        "Seconds of audio per training example (random crops; shorter clips are padded and masked). "
        "MusicGen was trained on 30 s.",
        ge=1.0,
        le=30.0,
        must_match_on_resume=True,
    )
    max_grad_norm: float = param(
        1.0, "Clip the gradient norm to this value (0: no clipping).", ge=0.0, le=1e6, must_match_on_resume=True
    )
    weight_decay: float = param(
        0.01, "Decoupled weight decay (AdamW style) for both optimizers.", ge=0.0, le=1.0, must_match_on_resume=True
    )
    ema: bool = param(
        False,
        f"Keep an exponential moving average of the weights (decay {EMA_DECAY}) and export it.",
        must_match_on_resume=True,
    )
    save_every: int = param(
        0,
        "Write a resume checkpoint every this many optimizer steps and at the end (the last 2 are kept). "
        "0: no checkpoints (one is still written if the run is cancelled or interrupted).",
        ge=0,
        le=1000000,
    )
    resume_from: str | None = param(
        None,
        "A resume checkpoint (checkpoint-*.pt) or a folder of them (the newest is used) to continue from, "
        "with the same training inputs.",
        file=True,
    )
    use_wandb: bool = param(
        False,
        "Log loss, learning rate and samples to Weights & Biases (with wandb_api_key, or WANDB_API_KEY set where "
        "the training runs). Giving wandb_api_key turns it on.",
    )
    wandb_api_key: str | None = param(
        None, "Weights & Biases API key (a secret: never logged or saved). Turns on use_wandb.", secret=True
    )
    wandb_project: str = param("musicgen-fine-tune", "Weights & Biases project to log the training to.")
    wandb_entity: str | None = param(None, "Weights & Biases entity (user or team). Empty: your default entity.")
    hf_repo_id: str | None = param(
        None,
        "Hugging Face model repo (user/name) to push the trained weights to, with a model card (inputs, labels, "
        "loss plot, samples). Created if missing (private). Needs hf_token. The weights are returned even if the push "
        "fails.",
    )
    hf_token: str | None = param(
        None, "Hugging Face token with write access, for hf_repo_id (a secret: never logged or saved).", secret=True
    )
    sample_duration: float = param(
        8.0,
        "Seconds of each of the 2 samples generated after training from training descriptions and put in the "
        "weights (samples/*.wav). 0: none.",
        ge=0.0,
        le=30.0,
    )
    sampler_precision: str = sampler_precision_param(
        " for the samples put in the weights, the prior-preservation examples and the evaluation's samples (as "
        "predict's sampler_precision)"
    )
    method: str = param(
        "full",
        "What to train. full: every weight of the language model. lora: low-rank adapters on the attention and "
        "feed-forward projections (the tar holds only the adapter, MBs, and references the base model). "
        "textual_inversion: only the trigger word's embedding (new T5 tokens). text_projection: only the "
        "text conditioner's output projection.",
        choices=METHODS,
        must_match_on_resume=True,
    )
    lora_rank: int = param(
        16,
        "method=lora: rank of each adapter (its size grows linearly with it).",
        ge=1,
        le=1024,
        used_by=("lora",),
        must_match_on_resume=True,
    )
    lora_alpha: float = param(
        16.0,
        "method=lora: adapter scale numerator (the update is alpha/rank x B A).",
        ge=0.0,
        used_by=("lora",),
        must_match_on_resume=True,
    )
    lora_targets: str = param(
        "q,k,v,out_proj,linear1,linear2",
        "method=lora: modules to adapt, comma-separated globs on module names: q, k, v (attention projections), "
        "out_proj, linear1, linear2 (feed-forward), linears.* (output heads), self_attn.*, layers.0.*, ...",
        used_by=("lora",),
        must_match_on_resume=True,
    )
    lora_merge: bool = param(
        False,
        "method=lora: export the full model with the adapter merged in, instead of the adapter alone.",
        used_by=("lora",),
    )
    gradient_checkpointing: bool = param(
        False, "Recompute each transformer layer's activations in the backward pass: far less memory, ~30% slower."
    )
    prior_preservation: bool = param(
        False,
        "DreamBooth prior preservation (any method): the base model first generates examples of the class "
        "(class_prompt) and of other genres, and training keeps fitting them, so other styles are not forgotten.",
        must_match_on_resume=True,
    )
    class_prompt: str | None = param(
        None,
        "prior_preservation: the prompt of the class examples. Empty: each track's labels without the trigger.",
        used_by=("prior_preservation",),
        must_match_on_resume=True,
    )
    class_samples: int = param(
        2,
        "prior_preservation: class examples generated per training track.",
        ge=0,
        le=16,
        used_by=("prior_preservation",),
        must_match_on_resume=True,
    )
    dissimilar_samples: int = param(
        1,
        "prior_preservation: examples of other genres generated per training track.",
        ge=0,
        le=16,
        used_by=("prior_preservation",),
        must_match_on_resume=True,
    )
    prior_loss_weight: float = param(
        1.0,
        "prior_preservation: weight of the generated examples' loss (instance loss + weight x prior loss).",
        ge=0.0,
        used_by=("prior_preservation",),
        must_match_on_resume=True,
    )
    lm_dim: int = param(
        2048,
        "model_version=micro / tiny-micro: width of the new LM trained from scratch.",
        ge=8,
        le=8192,
        used_by=("scratch",),
        must_match_on_resume=True,
    )
    lm_layers: int = param(
        2,
        "model_version=micro / tiny-micro: transformer layers of the new LM.",
        ge=1,
        le=96,
        used_by=("scratch",),
        must_match_on_resume=True,
    )
    lm_heads: int = param(
        2,
        "model_version=micro / tiny-micro: attention heads of the new LM.",
        ge=1,
        le=64,
        used_by=("scratch",),
        must_match_on_resume=True,
    )
    parallel: str = param(
        "auto",
        "With several GPUs: ddp (a whole model per GPU) or fsdp (weights, gradients and optimizer state sharded "
        "over the GPUs: for medium and large models). auto: fsdp for medium/large/melody/style models, ddp for "
        "small ones. Ignored on one GPU.",
        choices=PARALLEL_MODES,
    )
    validation_split: float = param(
        0.1,
        "Share of the tracks held out to measure the validation loss (every clip of a track on one side, chosen "
        "from seed). Used from 5 tracks on (at least 1 held out); with fewer, all train and the log says so. "
        "0: no validation. Ignored when validation_path is given.",
        ge=0.0,
        le=0.5,
        used_by=("split_validation",),
        must_match_on_resume=True,
    )
    validation_path: str | None = param(
        None,
        "Held-out audio to validate on instead of a share of dataset_path: an archive or audio file like "
        "dataset_path (prepared the same way), or locally a prepared folder.",
        file=True,
    )
    eval_every: int = param(
        0,
        "Validation loss every this many optimizer steps, plus before the first step and at the end. 0: once per "
        "epoch.",
        ge=0,
        le=1000000,
        used_by=("validation",),
        must_match_on_resume=True,
    )
    keep_best: bool = param(
        True,
        "With validation: export the weights of the evaluation with the lowest validation loss (the base model "
        "included) instead of the last step's.",
        used_by=("validation",),
        must_match_on_resume=True,
    )
    early_stop_patience: int = param(
        0,
        "With validation: stop when this many evaluations in a row did not lower the best validation loss. "
        "0: never stop early.",
        ge=0,
        le=100000,
        used_by=("validation",),
    )
    forgetting_check: str = param(
        "auto",
        "With validation: also measure the loss on general music the base model generates for fixed genre "
        "prompts (prior_preservation's examples of other genres when there are), base vs fine-tuned, and flag it "
        "when it rises. auto: on with a GPU or with prior_preservation, off on CPU (generating is slow there).",
        choices=FORGETTING_CHECKS,
        used_by=("validation",),
    )


# Views of the `param(...)` facts, for the code that reads them.
RESUME_MUST_MATCH = names_where(TrainParams, "must_match_on_resume")
PREPARE_FIELDS = names_where(TrainParams, "prepare")


def validate(params: TrainParams) -> None:
    """Checks that need more than one field; raised before any long work, naming the input and the fix.

    The checks of one method's or feature's inputs live with it (`training.methods.check_inputs`,
    `training.evaluate.check`); `training.run.check_inputs` runs them all, this first."""
    if params.dataset_path is None or not str(params.dataset_path).strip():
        raise InputError("dataset_path", "no training data given; pass a zip/tar/gz archive or an audio file")
    if params.lr <= 0:
        raise InputError("lr", f"{params.lr} must be above 0 (dadam: 1; adamw: e.g. 1e-5)")
    if params.optimizer == "adamw" and params.lr >= ADAMW_MAX_LR:
        raise InputError(
            "lr",
            f"{params.lr} is far too large for adamw (it would diverge): use a small value such as 1e-5, "
            "or optimizer=dadam with lr=1",
        )
    if params.model_version == FINE_TUNED:
        raise InputError(
            "model_version",
            f"{FINE_TUNED} is predict's choice (the weights a trained version runs); training starts from a base "
            f"model: choose one of {', '.join(TRAINABLE_VERSIONS)} (to continue a stopped training, use resume_from)",
        )
    if params.model_version not in TRAINABLE_VERSIONS:
        raise InputError("model_version", f"{params.model_version!r} is not one of: {', '.join(TRAINABLE_VERSIONS)}")


def _validation_path_given(p: TrainParams) -> bool:
    return p.validation_path is not None and bool(str(p.validation_path).strip())


# When each feature that inputs are `used_by` is off, and why (the methods, e.g. `lora`, say it themselves:
# `training.methods.base.Method.check`). A non-default value of an input while every feature reading it is off is
# warned (`dropped_settings`), never ignored without a word.
FEATURE_OFF: dict[str, tuple[tp.Callable[[TrainParams], bool], str]] = {
    "prior_preservation": (lambda p: not p.prior_preservation, "prior_preservation is off"),
    "scratch": (
        lambda p: not (p.model_version in SPEC and SPEC[p.model_version].scratch),
        "only micro and tiny-micro train a new LM of that shape",
    ),
    "split_validation": (_validation_path_given, "validation_path is given (every track of dataset_path trains)"),
    "validation": (
        lambda p: p.validation_split == 0 and not _validation_path_given(p),
        "validation is off (validation_split=0 and no validation_path)",
    ),
}


def used_only_by(feature: str) -> tuple[str, ...]:
    """The inputs that only `feature` reads (their `param(..., used_by=...)`)."""
    return tuple(f.name for f in dataclasses.fields(TrainParams) if f.metadata["used_by"] == (feature,))


def dropped_settings(params: TrainParams) -> list[str]:
    """`"name=value is ignored: why"` for each input given a non-default value that this run cannot use."""
    defaults = TrainParams()
    found = []
    for f in dataclasses.fields(TrainParams):
        off = [FEATURE_OFF[feature] for feature in f.metadata["used_by"] if feature in FEATURE_OFF]
        if off and len(off) == len(f.metadata["used_by"]) and all(is_off(params) for is_off, _ in off):
            value = getattr(params, f.name)
            if value != getattr(defaults, f.name):
                found.append(f"{f.name}={value!r} is ignored: {'; '.join(why for _, why in off)}")
    return found


def prepare_kwargs(params: TrainParams) -> dict[str, tp.Any]:
    """The dataset-preparation inputs this run passes on to `preprocessing.PrepareParams`."""
    return {name: getattr(params, name) for name in PREPARE_FIELDS}


def to_dict(params: TrainParams) -> dict[str, tp.Any]:
    return dataclasses.asdict(params)
