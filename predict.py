"""Cog runner (`cog run`, Replicate predictions) and command line (`python predict.py --help`): generate music.

The inputs are defined once, in `generation.params.PredictParams`; `run`'s signature below is written from it by
`scripts/cog_signatures.py` as literal `Input(...)`s, because `cog build` reads it statically (a test fails when it
is stale, and tests/test_cog_schema.py checks that the schema `cog build` writes from it means what it says).

On Cog a prediction returns one audio file, as meta/musicgen and every MusicGen fine-tuner on Replicate do, so
clients written for them (`urlretrieve(output)`) work. `num_outputs` (one batch, one file each) is offered on
the command line and in the Python API (`generation.generate.Generator`), where a list of files is no surprise.
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

from cog import BaseRunner, Input, Path

from core.audio import save_audio
from core.errors import cli_errors
from core.logs import configure_logging, warn_retired_env
from core.params import build_parser, from_kwargs
from core.weights import DEFAULT_MIN_FREE_BYTES
from evaluation.health import sample_health
from generation.generate import Generator, output_paths, write_outputs
from generation.params import DEFAULT_BASE, PredictParams

logger = logging.getLogger("predict")

_OUTPUT_PREFIX = "musicgen-output-"
# The deployment's settings (environment variables, read here only: the code below the entry points takes them as
# arguments). MGFT_PRELOAD: the model version setup() loads when no weights are given (empty: none).
PRELOAD_ENV = "MGFT_PRELOAD"
MIN_FREE_ENV = "MGFT_WEIGHTS_MIN_FREE_GB"


def min_free_setting() -> int:
    """Bytes of disk the weights cache keeps free (`MGFT_WEIGHTS_MIN_FREE_GB`, GiB; default 10 as flux-fine-tuner)."""
    value = os.environ.get(MIN_FREE_ENV, "").strip()
    if not value:
        return DEFAULT_MIN_FREE_BYTES
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(f"{MIN_FREE_ENV}={value!r} is not a number of GiB (e.g. 10)") from None
    if not gib >= 0 or gib == float("inf"):
        raise ValueError(f"{MIN_FREE_ENV}={value!r}: give a finite number of GiB >= 0")
    return int(gib * 2**30)


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """`weights` is COG_WEIGHTS (a URL or path of a trained_model.tar): the `fine-tuned` model."""
        configure_logging()
        logger.info("Cog runtime: coglet %s", importlib.metadata.version("coglet"))  # not pinned: cog.yaml
        warn_retired_env(os.environ)
        weights = str(weights) if weights else None
        self.generator = Generator(setup_weights=weights, min_free_bytes=min_free_setting())
        self.generator.preload(os.environ.get(PRELOAD_ENV, DEFAULT_BASE))
        self._last_output: _Path | None = None

    # <cog-signature of generation.params:PredictParams: edit the dataclass, then run .venv/bin/python scripts/cog_signatures.py>
    def run(
        self,
        model_version: str = Input(
            description="Model to use. `fine-tuned`: the weights this model was trained into (or `replicate_weights`); without any fine-tuned weights it falls back to `stereo-melody-large`. The `tiny*` models are small random models for offline tests. `style`: MusicGen-Style (a prompt and/or `style_audio`). `micro`, `tiny-micro` are training choices (models trained from scratch): generate with their weights as `replicate_weights`.",
            default="fine-tuned",
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
        prompt: str | None = Input(
            description="A description of the music you want to generate. Empty: unconditional.", default=None
        ),
        input_audio: Path | None = Input(
            description="An audio file that will influence the generated music. If `continuation` is true, the generated music continues the audio file. Otherwise it follows the audio file's melody (melody models only).",
            default=None,
        ),
        duration: int = Input(
            description="Duration of the generated audio in seconds. Beyond the model's 30 s window, generation continues in overlapping windows.",
            default=8,
            ge=1,
            le=300,
        ),
        continuation: bool = Input(
            description="If true, the generated music continues `input_audio`. Otherwise it mimics `input_audio`'s melody.",
            default=False,
        ),
        continuation_start: int = Input(
            description="Start time of the audio file to use for continuation (seconds).", default=0, ge=0
        ),
        continuation_end: int | None = Input(
            description="End time of the audio file to use for continuation (seconds). Empty: the end of the file.",
            default=None,
            ge=0,
        ),
        multi_band_diffusion: bool = Input(
            description="Decode the tokens with MultiBand Diffusion instead of EnCodec (needs its weights; slower).",
            default=False,
        ),
        normalization_strategy: str = Input(
            description="Strategy for normalizing the output audio.",
            default="loudness",
            choices=["loudness", "clip", "peak", "rms"],
        ),
        top_k: int = Input(description="Reduces sampling to the k most likely tokens.", default=250, ge=0),
        top_p: float = Input(
            description="Reduces sampling to tokens with cumulative probability of p. When set to 0, top_k is used.",
            default=0.0,
            ge=0,
            le=1,
        ),
        temperature: float = Input(
            description="Controls the 'conservativeness' of the sampling process. Higher is more diverse.",
            default=1.0,
            ge=0,
        ),
        classifier_free_guidance: float = Input(
            description="Increases the influence of inputs on the output. Higher: closer to the inputs, less diverse.",
            default=3.0,
            ge=0,
        ),
        sampler_precision: str = Input(
            description="Precision of the token sampler: auto (int8 on CPU, fp16 on GPU), int8 (CPU only), bf16, fp16, or none (the model's own precision: exactly audiocraft's tokens).",
            default="auto",
            choices=["auto", "int8", "bf16", "fp16", "none"],
        ),
        output_format: str = Input(
            description="Output format for the generated audio.", default="wav", choices=["wav", "mp3"]
        ),
        seed: int | None = Input(
            description="Seed for the random number generator. Empty or -1: a random seed.", default=None, ge=-1
        ),
        replicate_weights: str | None = Input(
            description="The weights of a training: an https URL, a local path or a data: URI of a trained_model.tar, or a Hugging Face model repo id holding one (user/name). Empty: the weights this model was started with (COG_WEIGHTS), if any.",
            default=None,
        ),
        lora_scale: float = Input(
            description="LoRA weights only: how strongly the adapter acts (0: the base model, 1: as trained, up to 2: stronger).",
            default=1.0,
            ge=0.0,
            le=2.0,
        ),
        style_audio: Path | None = Input(
            description="MusicGen-Style models (`style`, `tiny-style`): an audio file whose style the music follows (an excerpt of `style_excerpt_length` seconds is taken from it). With a prompt too: text + style.",
            default=None,
        ),
        style_excerpt_length: float = Input(
            description="Style models: length in seconds of the excerpt of `style_audio` that sets the style (at most the length of `style_audio`).",
            default=3.0,
            ge=1.5,
            le=4.5,
        ),
        style_eval_q: int = Input(
            description="Style models: how many of the style conditioner's quantization levels are kept. Fewer: the music follows `style_audio` more loosely.",
            default=3,
            ge=1,
            le=6,
        ),
        classifier_free_guidance_beta: float | None = Input(
            description="Style models with a prompt and `style_audio`: double classifier-free guidance, pushing the prompt this many times more than the style (1 to 9 is typical; 1 = single guidance). Empty: single classifier-free guidance.",
            default=None,
            ge=0,
        ),
    ) -> Path:
        return self._run(locals())
        # </cog-signature>

    def _run(self, inputs: dict[str, tp.Any]) -> Path:
        """One Cog prediction from `run`'s inputs (`locals()` of the generated signature)."""
        params = from_kwargs(PredictParams, **{name: value for name, value in inputs.items() if name != "self"})
        result = self.generator.generate(params)
        # One request's output lives until the next request (Cog has sent it by then): nothing piles up in /tmp.
        self._forget_last_output()
        self._last_output = _Path(tempfile.mkdtemp(prefix=_OUTPUT_PREFIX))
        (out,) = write_outputs(result, self._last_output, params.output_format)
        logger.info(
            "Wrote %s (%.1f s, seed %d)%s",
            out.name,
            result.wav.shape[-1] / result.sample_rate,
            result.seed,
            _health_note(result.wav, result.sample_rate),
        )
        return Path(out)

    def _forget_last_output(self) -> None:
        if self._last_output is not None and self._last_output.name.startswith(_OUTPUT_PREFIX):
            shutil.rmtree(self._last_output, ignore_errors=True)
        self._last_output = None


def _health_note(wav: tp.Any, sample_rate: int) -> str:
    """`; health flags: noise, loop` for a sample that measures unhealthy (evaluation/health.py), else nothing."""
    flags = sample_health(wav, int(sample_rate)).flags
    return f"; health flags: {', '.join(flags)} (evaluation/health.py's thresholds)" if flags else ""


def _cli_outputs(output: str | None, fmt_input: str, n: int) -> tuple[list[_Path], str]:
    """Where the CLI writes and in which format: `--output` names a file (its extension, if wav or mp3, sets the
    format), an existing folder (`output.<fmt>` inside it), or nothing (`output.<output_format>` here)."""
    target = _Path(output) if output else _Path(f"output.{fmt_input}")
    if target.is_dir():
        target = target / f"output.{fmt_input}"
    fmt = target.suffix.lstrip(".").lower()
    if fmt not in ("wav", "mp3"):
        fmt = fmt_input
        target = target.with_name(target.name + f".{fmt}")
        logger.info("Writing %s (no wav/mp3 extension given: output_format=%s)", target, fmt)
    elif fmt != fmt_input:
        logger.info("Writing %s as %s (from its extension; output_format=%s)", target, fmt, fmt_input)
    return output_paths(target, n), fmt


def main(argv: list[str] | None = None) -> int:
    """`python predict.py --model_version tiny --prompt "lofi beat" --duration 2 --output out.wav`

    With `--num_outputs N` (N > 1) the files are `out_0.wav` ... `out_<N-1>.wav`.
    """
    parser = build_parser(
        PredictParams,
        prog="predict.py",
        description="Generate music with MusicGen (the inputs of a Cog prediction, `cog run`).",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="CLI only: the file to write (default output.<output_format>), or an existing folder to write it in; "
        "with num_outputs > 1: <stem>_<i><suffix> for each output.",
    )
    parser.add_argument("--weights", default=None, help="CLI only: like COG_WEIGHTS, the weights setup() loads.")
    args = vars(parser.parse_args(argv))
    output, setup_weights = args.pop("output"), args.pop("weights")
    configure_logging(fmt="%(levelname)s %(name)s: %(message)s")
    warn_retired_env(os.environ)
    with cli_errors("generation") as failed:
        params = from_kwargs(PredictParams, **args)
        paths, fmt = _cli_outputs(output, params.output_format, params.num_outputs)
        result = Generator(setup_weights=setup_weights, min_free_bytes=min_free_setting()).generate(params)
        for path, wav in zip(paths, result.wavs, strict=True):
            save_audio(path, wav, result.sample_rate, fmt)
            note = _health_note(wav, result.sample_rate)
            print(f"Wrote {path} ({wav.shape[-1] / result.sample_rate:.2f} s, seed {result.seed}){note}")
    return failed.code


if __name__ == "__main__":
    sys.exit(main())
