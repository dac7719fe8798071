"""Cog predictor (`cog predict`) and command line (`python predict.py --help`): generate music with MusicGen.

The inputs are defined once, in `generation.params.PredictParams`; the signature below repeats them as literal
`Input(...)`s because Cog reads it statically (tests/test_predict.py checks that both agree).

The output is a list of files, one per output (`num_outputs`, default 1: a list of one), as Replicate's
flux fine-tuner returns its images: Cog needs one static return type.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path as _Path

from cog import BasePredictor, Input, Path

from core.params import build_parser, from_kwargs
from generation.generate import Generator, output_paths, write_outputs
from generation.params import PredictParams

logger = logging.getLogger("predict")


class Predictor(BasePredictor):
    def setup(self, weights: str | None = None) -> None:
        """`weights` is COG_WEIGHTS (a URL or path of a trained_model.tar): the `fine-tuned` model."""
        weights = str(weights) if weights else None
        self.generator = Generator(setup_weights=weights)
        self.generator.preload()

    def predict(
        self,
        model_version: str = Input(
            description="Model to use. `fine-tuned`: the weights this model was trained into (or "
            "`replicate_weights`); without any fine-tuned weights it falls back to `stereo-melody-large`. The "
            "`tiny*` models are small random models for offline tests. `style`: MusicGen-Style (a prompt and/or "
            "`style_audio`).",
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
            ],
        ),
        prompt: str = Input(
            description="A description of the music you want to generate. Empty: unconditional.", default=None
        ),
        input_audio: Path = Input(
            description="An audio file that will influence the generated music. If `continuation` is true, the "
            "generated music continues the audio file. Otherwise it follows the audio file's melody (melody models "
            "only).",
            default=None,
        ),
        duration: int = Input(
            description="Duration of the generated audio in seconds. Beyond the model's 30 s window, generation "
            "continues in overlapping windows.",
            default=8,
            ge=1,
            le=300,
        ),
        num_outputs: int = Input(
            description="Number of outputs to generate from the same inputs, in one batch (they share each step's "
            "weight reads: cheaper than separate predictions); one file each. They differ from each other; the same "
            "seed and num_outputs give the same files again.",
            default=1,
            ge=1,
            le=8,
        ),
        continuation: bool = Input(
            description="If true, the generated music continues `input_audio`. Otherwise it mimics `input_audio`'s "
            "melody.",
            default=False,
        ),
        continuation_start: int = Input(
            description="Start time of the audio file to use for continuation (seconds).", default=0, ge=0
        ),
        continuation_end: int = Input(
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
        output_format: str = Input(
            description="Output format for the generated audio.", default="wav", choices=["wav", "mp3"]
        ),
        seed: int = Input(
            description="Seed for the random number generator. Empty or -1: a random seed.", default=None, ge=-1
        ),
        replicate_weights: str = Input(
            description="URL or path of a trained_model.tar (the output of a training). Empty: the weights this "
            "model was started with (COG_WEIGHTS), if any.",
            default=None,
        ),
        style_audio: Path = Input(
            description="MusicGen-Style models (`style`, `tiny-style`): an audio file whose style the music follows "
            "(an excerpt of `style_excerpt_length` seconds is taken from it). With a prompt too: text + style.",
            default=None,
        ),
        style_excerpt_length: float = Input(
            description="Style models: length in seconds of the excerpt of `style_audio` that sets the style (at most "
            "the length of `style_audio`).",
            default=3.0,
            ge=1.5,
            le=4.5,
        ),
        style_eval_q: int = Input(
            description="Style models: how many of the style conditioner's quantization levels are kept. Fewer: the "
            "music follows `style_audio` more loosely.",
            default=3,
            ge=1,
            le=6,
        ),
        classifier_free_guidance_beta: float = Input(
            description="Style models with a prompt and `style_audio`: double classifier-free guidance, pushing the "
            "prompt this many times more than the style (1 to 9 is typical; 1 = single guidance). Empty: single "
            "classifier-free guidance.",
            default=None,
            ge=0,
        ),
    ) -> list[Path]:
        params = from_kwargs(
            PredictParams,
            model_version=model_version,
            prompt=prompt,
            input_audio=str(input_audio) if input_audio else None,
            duration=duration,
            num_outputs=num_outputs,
            continuation=continuation,
            continuation_start=continuation_start,
            continuation_end=continuation_end,
            multi_band_diffusion=multi_band_diffusion,
            normalization_strategy=normalization_strategy,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            classifier_free_guidance=classifier_free_guidance,
            output_format=output_format,
            seed=seed,
            replicate_weights=replicate_weights,
            style_audio=str(style_audio) if style_audio else None,
            style_excerpt_length=style_excerpt_length,
            style_eval_q=style_eval_q,
            classifier_free_guidance_beta=classifier_free_guidance_beta,
        )
        result = self.generator.generate(params)
        outs = write_outputs(result, tempfile.mkdtemp(prefix="musicgen-"), params.output_format)
        logger.info("Wrote %s (seed %d)", ", ".join(str(o) for o in outs), result.seed)
        return [Path(out) for out in outs]


def main(argv: list[str] | None = None) -> int:
    """`python predict.py --model_version tiny --prompt "lofi beat" --duration 2 --output out.wav`

    With `--num_outputs N` (N > 1) the files are `out_0.wav` ... `out_<N-1>.wav`.
    """
    from core.params import InputError
    from core.versions import ModelUnavailableError
    from core.weights import WeightsError

    parser = build_parser(
        PredictParams, prog="predict.py", description="Generate music with MusicGen (the inputs of `cog predict`)."
    )
    parser.add_argument(
        "--output",
        default="output.wav",
        help="Where to write the audio (CLI only); with num_outputs > 1: <stem>_<i><suffix> for each output.",
    )
    parser.add_argument("--weights", default=None, help="CLI only: like COG_WEIGHTS, the weights setup() loads.")
    args = vars(parser.parse_args(argv))
    output, setup_weights = _Path(args.pop("output")), args.pop("weights")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = from_kwargs(PredictParams, **args)
        generator = Generator(setup_weights=setup_weights)
        result = generator.generate(params)
    except (InputError, ModelUnavailableError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = output.suffix.lstrip(".").lower()
    if fmt not in ("wav", "mp3"):
        fmt = params.output_format
        output = output.with_name(output.name + f".{fmt}")
    elif fmt != params.output_format:
        logger.info("Writing %s as %s (from its extension; output_format=%s)", output, fmt, params.output_format)
    from core.audio import save_audio

    for path, wav in zip(output_paths(output, len(result)), result.wavs, strict=True):
        save_audio(path, wav, result.sample_rate, fmt)
        print(f"Wrote {path} ({wav.shape[-1] / result.sample_rate:.2f} s, seed {result.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
