"""Cog trainer (`cog train`) and command line (`python train.py --help`): fine-tune MusicGen on your audio.

The inputs are defined once, in `training.params.TrainParams`; `train`'s signature below is written from it by
`scripts/cog_signatures.py` as literal `Input(...)`s, because `cog build` reads it statically (a test fails when it
is stale, and tests/test_cog_schema.py checks that the schema `cog build` writes from it means what it says:
`dataset_path` the only required input). The work is done by `training.run.run_training`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import typing as tp
from pathlib import Path as _Path

from cog import BaseModel, FieldInfo, Input, Path, Secret

from core.errors import cli_errors
from core.logs import configure_logging, warn_retired_env
from core.params import build_parser, from_kwargs
from training.params import TrainParams
from training.report import summary_lines
from training.run import run_training

logger = logging.getLogger("train")

_WORK_PREFIX = "musicgen-train-"
# The folder of the previous training in this process: Cog has sent its weights by the time the next one
# starts, so it is removed then (a server that trains many times does not fill its disk).
_last_work: list[_Path] = []


class TrainingOutput(BaseModel):
    weights: Path


# <cog-signature of training.params:TrainParams: edit the dataclass, then run .venv/bin/python scripts/cog_signatures.py>
def train(
    dataset_path: Path = Input(
        description="Your training audio: a zip, tar, tar.gz/tgz or gz archive (folders allowed) or a single audio file (wav, mp3, flac, ogg, opus, m4a, aac, aiff). A text file named like a track (song.mp3 + song.txt) gives that track's description. Locally, a folder already prepared by `python -m preprocessing` works too."
    ),
    auto_labeling: bool = Input(
        description="Describe tracks that have no description automatically: genre, mood and instruments (essentia), key and bpm.",
        default=True,
    ),
    drop_vocals: bool = Input(
        description="Remove vocals with demucs (htdemucs) before cutting clips; drums, bass and the rest are kept.",
        default=True,
    ),
    one_same_description: str | None = Input(
        description="One description for every clip; overrides the text files and the automatic labels.", default=None
    ),
    trigger: str | None = Input(
        description="A word put at the start of every description (e.g. a made-up artist token); use it in prompts later to call the style you trained.",
        default=None,
    ),
    model_version: str = Input(
        description="The MusicGen model to fine-tune. `micro`, `tiny-micro`: a new small model trained from scratch (lm_dim, lm_layers, lm_heads). The `tiny*` models are small random models for offline tests. (`fine-tuned` is predict's choice and is refused here.)",
        default="stereo-melody",
        choices=[
            "fine-tuned",
            "small",
            "medium",
            "large",
            "melody",
            "melody-large",
            "stereo-small",
            "stereo-medium",
            "stereo-large",
            "stereo-melody",
            "stereo-melody-large",
            "tiny",
            "tiny-stereo",
            "tiny-melody",
            "tiny-t5",
            "style",
            "tiny-style",
            "micro",
            "tiny-micro",
        ],
    ),
    epochs: int = Input(description="Number of epochs to train for.", default=3, ge=1, le=100000),
    updates_per_epoch: int = Input(
        description="Optimizer steps per epoch. 0: one pass over the clips per epoch.", default=100, ge=0, le=1000000
    ),
    batch_size: int = Input(
        description="Clips per optimizer step over all GPUs. Rounded up to a multiple of (GPUs x grad_accumulation) when needed; the adjustment is logged.",
        default=16,
        ge=1,
        le=4096,
    ),
    optimizer: str = Input(
        description="`dadam`: D-Adaptation Adam, which finds the step size itself (keep lr=1). `adamw`: AdamW (try lr 1e-5).",
        default="dadam",
        choices=["dadam", "adamw"],
    ),
    lr: float = Input(
        description="Learning rate. For dadam a multiplier of the adapted step size (1 = as adapted); for adamw the step size itself (1e-5 is a good start; 0.1 and more is refused).",
        default=1.0,
        ge=0.0,
        le=100.0,
    ),
    lr_scheduler: str = Input(
        description="Learning rate schedule after the warmup: cosine (to 0), exponential (to lr/100), polynomial_decay (linear to 0), inverse_sqrt, linear_warmup (constant after the warmup).",
        default="cosine",
        choices=["cosine", "exponential", "polynomial_decay", "inverse_sqrt", "linear_warmup"],
    ),
    warmup: int = Input(description="Optimizer steps of linear learning-rate warmup.", default=8, ge=0, le=1000000),
    cfg_p: float = Input(
        description="Condition dropout for classifier-free guidance: the share of batches trained without conditions.",
        default=0.3,
        ge=0.0,
        le=1.0,
    ),
    grad_accumulation: int = Input(
        description="Split each GPU's share of the batch into this many micro-batches (less memory, same result).",
        default=1,
        ge=1,
        le=1024,
    ),
    seed: int = Input(
        description="Random seed: data order, crops, condition dropout.", default=42, ge=0, le=2147483647
    ),
    precision: str = Input(
        description="Training precision. auto: bf16 where the GPU supports it, fp16 with loss scaling on older GPUs, fp32 on CPU. Weights and optimizer state stay fp32 (mixed precision).",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
    ),
    segment_duration: float = Input(
        description="Seconds of audio per training example (random crops; shorter clips are padded and masked). MusicGen was trained on 30 s.",
        default=30.0,
        ge=1.0,
        le=30.0,
    ),
    max_grad_norm: float = Input(
        description="Clip the gradient norm to this value (0: no clipping).", default=1.0, ge=0.0, le=1000000.0
    ),
    weight_decay: float = Input(
        description="Decoupled weight decay (AdamW style) for both optimizers.", default=0.01, ge=0.0, le=1.0
    ),
    ema: bool = Input(
        description="Keep an exponential moving average of the weights (decay 0.99) and export it.", default=False
    ),
    save_every: int = Input(
        description="Write a resume checkpoint every this many optimizer steps and at the end (the last 2 are kept). 0: no checkpoints (one is still written if the run is cancelled or interrupted).",
        default=0,
        ge=0,
        le=1000000,
    ),
    resume_from: Path | None = Input(
        description="A resume checkpoint (checkpoint-*.pt) or a folder of them (the newest is used) to continue from, with the same training inputs.",
        default=None,
    ),
    use_wandb: bool = Input(
        description="Log loss, learning rate and samples to Weights & Biases (with wandb_api_key, or WANDB_API_KEY set where the training runs). Giving wandb_api_key turns it on.",
        default=False,
    ),
    wandb_api_key: Secret | None = Input(
        description="Weights & Biases API key (a secret: never logged or saved). Turns on use_wandb.", default=None
    ),
    wandb_project: str = Input(
        description="Weights & Biases project to log the training to.", default="musicgen-fine-tune"
    ),
    wandb_entity: str | None = Input(
        description="Weights & Biases entity (user or team). Empty: your default entity.", default=None
    ),
    hf_repo_id: str | None = Input(
        description="Hugging Face model repo (user/name) to push the trained weights to, with a model card (inputs, labels, loss plot, samples). Created if missing (private). Needs hf_token. The weights are returned even if the push fails.",
        default=None,
    ),
    hf_token: Secret | None = Input(
        description="Hugging Face token with write access, for hf_repo_id (a secret: never logged or saved).",
        default=None,
    ),
    sample_duration: float = Input(
        description="Seconds of each of the 2 samples generated after training from training descriptions and put in the weights (samples/*.wav). 0: none.",
        default=8.0,
        ge=0.0,
        le=30.0,
    ),
    sampler_precision: str = Input(
        description="Precision of the token sampler for the samples put in the weights, the prior-preservation examples and the evaluation's samples (as predict's sampler_precision): auto (int8 on CPU, fp16 on GPU), int8 (CPU only), bf16, fp16, or none (the model's own precision: exactly audiocraft's tokens).",
        default="auto",
        choices=["auto", "int8", "bf16", "fp16", "none"],
    ),
    method: str = Input(
        description="What to train. full: every weight of the language model. lora: low-rank adapters on the attention and feed-forward projections (the tar holds only the adapter, MBs, and references the base model). textual_inversion: only the trigger word's embedding (new T5 tokens). text_projection: only the text conditioner's output projection.",
        default="full",
        choices=["full", "lora", "textual_inversion", "text_projection"],
    ),
    lora_rank: int = Input(
        description="method=lora: rank of each adapter (its size grows linearly with it).", default=16, ge=1, le=1024
    ),
    lora_alpha: float = Input(
        description="method=lora: adapter scale numerator (the update is alpha/rank x B A).", default=16.0, ge=0.0
    ),
    lora_targets: str = Input(
        description="method=lora: modules to adapt, comma-separated globs on module names: q, k, v (attention projections), out_proj, linear1, linear2 (feed-forward), linears.* (output heads), self_attn.*, layers.0.*, ...",
        default="q,k,v,out_proj,linear1,linear2",
    ),
    lora_merge: bool = Input(
        description="method=lora: export the full model with the adapter merged in, instead of the adapter alone.",
        default=False,
    ),
    gradient_checkpointing: bool = Input(
        description="Recompute each transformer layer's activations in the backward pass: far less memory, ~30% slower.",
        default=False,
    ),
    prior_preservation: bool = Input(
        description="DreamBooth prior preservation (any method): the base model first generates examples of the class (class_prompt) and of other genres, and training keeps fitting them, so other styles are not forgotten.",
        default=False,
    ),
    class_prompt: str | None = Input(
        description="prior_preservation: the prompt of the class examples. Empty: each track's labels without the trigger.",
        default=None,
    ),
    class_samples: int = Input(
        description="prior_preservation: class examples generated per training track.", default=2, ge=0, le=16
    ),
    dissimilar_samples: int = Input(
        description="prior_preservation: examples of other genres generated per training track.", default=1, ge=0, le=16
    ),
    prior_loss_weight: float = Input(
        description="prior_preservation: weight of the generated examples' loss (instance loss + weight x prior loss).",
        default=1.0,
        ge=0.0,
    ),
    lm_dim: int = Input(
        description="model_version=micro / tiny-micro: width of the new LM trained from scratch.",
        default=2048,
        ge=8,
        le=8192,
    ),
    lm_layers: int = Input(
        description="model_version=micro / tiny-micro: transformer layers of the new LM.", default=2, ge=1, le=96
    ),
    lm_heads: int = Input(
        description="model_version=micro / tiny-micro: attention heads of the new LM.", default=2, ge=1, le=64
    ),
    parallel: str = Input(
        description="With several GPUs: ddp (a whole model per GPU) or fsdp (weights, gradients and optimizer state sharded over the GPUs: for medium and large models). auto: fsdp for medium/large/melody/style models, ddp for small ones. Ignored on one GPU.",
        default="auto",
        choices=["auto", "ddp", "fsdp"],
    ),
    validation_split: float = Input(
        description="Share of the tracks held out to measure the validation loss (every clip of a track on one side, chosen from seed). Used from 5 tracks on (at least 1 held out); with fewer, all train and the log says so. 0: no validation. Ignored when validation_path is given.",
        default=0.1,
        ge=0.0,
        le=0.5,
    ),
    validation_path: Path | None = Input(
        description="Held-out audio to validate on instead of a share of dataset_path: an archive or audio file like dataset_path (prepared the same way), or locally a prepared folder.",
        default=None,
    ),
    eval_every: int = Input(
        description="Validation loss every this many optimizer steps, plus before the first step and at the end. 0: once per epoch.",
        default=0,
        ge=0,
        le=1000000,
    ),
    keep_best: bool = Input(
        description="With validation: export the weights of the evaluation with the lowest validation loss (the base model included) instead of the last step's.",
        default=True,
    ),
    early_stop_patience: int = Input(
        description="With validation: stop when this many evaluations in a row did not lower the best validation loss. 0: never stop early.",
        default=0,
        ge=0,
        le=100000,
    ),
    forgetting_check: str = Input(
        description="With validation: also measure the loss on general music the base model generates for fixed genre prompts (prior_preservation's examples of other genres when there are), base vs fine-tuned, and flag it when it rises. auto: on with a GPU or with prior_preservation, off on CPU (generating is slow there).",
        default="auto",
        choices=["auto", "on", "off"],
    ),
) -> TrainingOutput:
    return _train(locals())
    # </cog-signature>


def _train(cog_inputs: dict[str, tp.Any]) -> TrainingOutput:
    """Prepare the dataset, fine-tune, and return `trained_model.tar` (load it in predict.py as the weights)."""
    inputs = {name: _plain(value) for name, value in cog_inputs.items()}
    configure_logging()
    logger.info("Cog runtime: coglet %s", importlib.metadata.version("coglet"))  # not pinned: cog.yaml
    warn_retired_env(os.environ)
    params = from_kwargs(TrainParams, **inputs)
    while _last_work:
        shutil.rmtree(_last_work.pop(), ignore_errors=True)
    output_dir = _Path(tempfile.mkdtemp(prefix=_WORK_PREFIX))
    _last_work.append(output_dir)
    tar = run_training(params, output_dir)
    _log_summary(tar)
    return TrainingOutput(weights=Path(tar))


def _log_summary(tar: _Path) -> None:
    """The last lines of the log: where report.html is and its headline (training/report.py)."""
    for line in summary_lines(tar):
        logger.info(line)


def _plain(value: tp.Any) -> tp.Any:
    """An input as our dataclass takes it: an omitted input called from Python (not by Cog) is still its
    `Input(...)`: take its default; a `Secret` becomes its string (kept out of logs and files by the trainer)."""
    if isinstance(value, FieldInfo):
        value = value.default
    if isinstance(value, Secret):
        value = value.get_secret_value()
    return value


def main(argv: list[str] | None = None) -> int:
    """`python train.py --dataset_path songs.zip --model_version tiny --epochs 1 --output_dir out/`"""
    parser = build_parser(
        TrainParams, prog="train.py", description="Fine-tune MusicGen on your audio (the inputs of `cog train`)."
    )
    parser.add_argument(
        "--output_dir",
        default="output",
        help="CLI only: where trained_model.tar, checkpoints/ and the prepared dataset (work/) go.",
    )
    args = vars(parser.parse_args(argv))
    output_dir = _Path(args.pop("output_dir"))
    configure_logging()
    warn_retired_env(os.environ)
    with cli_errors("training") as outcome:
        params = from_kwargs(TrainParams, **args)
        tar = run_training(params, output_dir)
        _log_summary(tar)
        print(f"Wrote {tar}")
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
