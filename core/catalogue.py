"""The catalogue: every model version and training method by name, and which family each version belongs to.

A leaf: it imports nothing of ours (nor torch), so the params modules, the loaders and the tests all read the one
list. Every version is one `ModelSpec` record in `SPECS`; the name lists below are views derived from them. Adding
a checkpoint of a known family: one record here, then `scripts/cog_signatures.py` writes the `model_version`
choices into the Cog signatures of `predict.py` and `train.py` (Cog reads them statically; a test fails while
they are stale). A new family: its hooks in `core/families.py`, `generation/families.py`, `training/families.py`.
"""

from __future__ import annotations

import dataclasses
import typing as tp

__all__ = [
    "ModelSpec",
    "SPECS",
    "SPEC",
    "spec",
    "find",
    "TINY_COMPRESSION",
    "PRETRAINED",
    "TINY_VERSIONS",
    "MODEL_VERSIONS",
    "STYLE_PRETRAINED",
    "STYLE_TINY_VERSIONS",
    "STYLE_VERSIONS",
    "ALL_MODEL_VERSIONS",
    "SCRATCH_VERSIONS",
    "FINE_TUNED",
    "MODEL_VERSION_CHOICES",
    "TRAINABLE_VERSIONS",
    "MELODY_VERSIONS",
    "STEREO_VERSIONS",
    "FSDP_AUTO_VERSIONS",
    "LM_LAYOUTS",
    "LM_WIDTHS",
    "PRETRAINED_COMPRESSION",
    "CHECKPOINT_FILES",
    "METHODS",
    "SAMPLER_PRECISIONS",
]

# The 32 kHz EnCodec of every facebook/musicgen-* model (and of `micro`, trained from scratch on it).
PRETRAINED_COMPRESSION = "facebook/encodec_32khz"
TINY_COMPRESSION = "tiny"  # the tiny models' small EnCodec, built offline by core/tiny.py


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model version: everything the code needs to know about it, in one record.

    `family` names the hooks that load, condition and train it (a family is a way of conditioning: `text`, `melody`,
    `style`, `scratch`); `loader` says who builds it: `audiocraft` (its own `MusicGen.get_pretrained`), `style`
    (core/style.py: audiocraft 1.3.0 has no style conditioner), `tiny` (core/tiny.py, offline), `scratch` (a new LM
    trained from nothing: trainable, never loaded as a base). `layout` is (transformer layers, codebooks `n_q`),
    `width` (model dimension, attention heads), both None where the user chooses them (scratch). `test_twin` is the
    tiny version that stands for it in offline tests. `text_encoder` is the text conditioner: `t5` (audiocraft's
    `t5-base`, as the facebook/musicgen-* models have), `lut` (a lookup table: the offline tiny models, no download)
    or `none` (unconditional: trained from scratch).
    """

    name: str
    family: str
    loader: str
    hub_id: str | None = None
    compression: str = PRETRAINED_COMPRESSION
    channels: int = 1
    layout: tuple[int, int] | None = None
    width: tuple[int, int] | None = None
    fsdp_auto: bool = False  # 1.5 B parameters and more: `parallel=auto` shards it (FSDP) with more than one process
    test_twin: str | None = None
    text_encoder: str = "t5"

    @property
    def stereo(self) -> bool:
        return self.channels == 2

    @property
    def melody(self) -> bool:
        return self.family == "melody"

    @property
    def style(self) -> bool:
        return self.family == "style"

    @property
    def scratch(self) -> bool:
        return self.family == "scratch"

    @property
    def tiny(self) -> bool:
        return self.compression == TINY_COMPRESSION


_SMALL, _MEDIUM, _LARGE = (1024, 16), (1536, 24), (2048, 32)  # (dim, heads): the MusicGen paper's three sizes


def _hub(name: str, family: str, layout: tuple[int, int], width: tuple[int, int], twin: str, **kw) -> ModelSpec:
    return ModelSpec(
        name, family, "audiocraft", hub_id=f"facebook/musicgen-{name}", layout=layout, width=width, test_twin=twin, **kw
    )


# Every model version, in the order the choice lists show them. Adding a checkpoint of a known family: one record.
SPECS: tuple[ModelSpec, ...] = (
    _hub("small", "text", (24, 4), _SMALL, "tiny"),
    _hub("medium", "text", (48, 4), _MEDIUM, "tiny", fsdp_auto=True),
    _hub("large", "text", (48, 4), _LARGE, "tiny", fsdp_auto=True),
    _hub("melody", "melody", (48, 4), _MEDIUM, "tiny-melody", fsdp_auto=True),
    _hub("melody-large", "melody", (48, 4), _LARGE, "tiny-melody", fsdp_auto=True),
    _hub("stereo-small", "text", (24, 8), _SMALL, "tiny-stereo", channels=2),
    _hub("stereo-medium", "text", (48, 8), _MEDIUM, "tiny-stereo", channels=2, fsdp_auto=True),
    _hub("stereo-large", "text", (48, 8), _LARGE, "tiny-stereo", channels=2, fsdp_auto=True),
    _hub("stereo-melody", "melody", (48, 8), _MEDIUM, "tiny-melody", channels=2, fsdp_auto=True),
    _hub("stereo-melody-large", "melody", (48, 8), _LARGE, "tiny-melody", channels=2, fsdp_auto=True),
    ModelSpec(
        "tiny", "text", "tiny", compression=TINY_COMPRESSION, layout=(2, 4), test_twin="tiny", text_encoder="lut"
    ),
    ModelSpec(
        "tiny-stereo",
        "text",
        "tiny",
        compression=TINY_COMPRESSION,
        channels=2,
        layout=(2, 8),
        test_twin="tiny-stereo",
        text_encoder="lut",
    ),
    ModelSpec(
        "tiny-melody",
        "melody",
        "tiny",
        compression=TINY_COMPRESSION,
        layout=(2, 4),
        test_twin="tiny-melody",
        text_encoder="lut",
    ),
    ModelSpec("tiny-t5", "text", "tiny", compression=TINY_COMPRESSION, test_twin="tiny-t5"),
    ModelSpec(
        "style",
        "style",
        "style",
        hub_id="facebook/musicgen-style",
        width=_MEDIUM,
        fsdp_auto=True,
        test_twin="tiny-style",
    ),
    ModelSpec("tiny-style", "style", "style", compression=TINY_COMPRESSION, test_twin="tiny-style", text_encoder="lut"),
    ModelSpec("micro", "scratch", "scratch", test_twin="tiny-micro", text_encoder="none"),
    ModelSpec(
        "tiny-micro", "scratch", "scratch", compression=TINY_COMPRESSION, test_twin="tiny-micro", text_encoder="none"
    ),
)
SPEC: dict[str, ModelSpec] = {s.name: s for s in SPECS}


def spec(name: str) -> ModelSpec:
    """The record of a model version; a KeyError names the known ones (callers check user input before this)."""
    try:
        return SPEC[name]
    except KeyError:
        raise KeyError(f"unknown model version {name!r}; known: {', '.join(SPEC)}") from None


def find(version: str) -> ModelSpec | None:
    """The record of a `model_version` input, or of the hub id a fine-tune names as its base (`facebook/musicgen-
    melody` is `melody`); None for what the catalogue does not know (a local folder): such a model's family is read
    from the loaded model itself."""
    return SPEC.get(version) or next((s for s in SPECS if s.hub_id and s.hub_id == version), None)


def _names(keep: tp.Callable[[ModelSpec], bool]) -> tuple[str, ...]:
    return tuple(s.name for s in SPECS if keep(s))


# The views below are derived from SPECS; read them, never extend them by hand.
# The facebook/musicgen-* checkpoints audiocraft's loaders build, by the names our inputs use.
PRETRAINED: dict[str, str] = {s.name: s.hub_id for s in SPECS if s.loader == "audiocraft" and s.hub_id}
# Small random models built offline in audiocraft's checkpoint format (core/tiny.py).
TINY_VERSIONS: tuple[str, ...] = _names(lambda s: s.loader == "tiny")
# The models audiocraft's own loaders build (and so training and export handle as they are).
MODEL_VERSIONS: tuple[str, ...] = (*PRETRAINED, *TINY_VERSIONS)
# MusicGen-Style (core/style.py): loaded by our own loader (audiocraft 1.3.0 has no style conditioner).
STYLE_PRETRAINED: dict[str, str] = {s.name: s.hub_id for s in SPECS if s.loader == "style" and s.hub_id}
STYLE_TINY_VERSIONS: tuple[str, ...] = _names(lambda s: s.loader == "style" and s.tiny)
STYLE_VERSIONS: tuple[str, ...] = (*STYLE_PRETRAINED, *STYLE_TINY_VERSIONS)
ALL_MODEL_VERSIONS: tuple[str, ...] = (*MODEL_VERSIONS, *STYLE_VERSIONS)
# New LMs trained from scratch on an existing EnCodec (training/methods/scratch.py): trainable, not loadable.
SCRATCH_VERSIONS: tuple[str, ...] = _names(lambda s: s.scratch)
# predict's "the weights this deployment was trained into" (COG_WEIGHTS / replicate_weights).
FINE_TUNED = "fine-tuned"
# The one `model_version` choice list of both predict and train. Cog names a choice list's schema component after
# the input, and `cog build` keeps one component per name for both modes: two different lists under one name
# would leave training with predict's. Each side refuses the choices that are not its own, naming the fix.
MODEL_VERSION_CHOICES: tuple[str, ...] = (FINE_TUNED, *ALL_MODEL_VERSIONS, *SCRATCH_VERSIONS)
TRAINABLE_VERSIONS: tuple[str, ...] = (*ALL_MODEL_VERSIONS, *SCRATCH_VERSIONS)

# Melody: a chroma conditioner (`self_wav`) on the melody input. Stereo: 2 channels, interleaved codebooks.
MELODY_VERSIONS: tuple[str, ...] = _names(lambda s: s.melody)
STEREO_VERSIONS: tuple[str, ...] = _names(lambda s: s.stereo)
FSDP_AUTO_VERSIONS: tuple[str, ...] = _names(lambda s: s.fsdp_auto)
# (transformer layers, codebooks) of each LM audiocraft builds: lets a bad `lora_targets` fail before the dataset
# is prepared (the authoritative check runs on the loaded model).
LM_LAYOUTS: dict[str, tuple[int, int]] = {s.name: s.layout for s in SPECS if s.layout}
# (model dimension, attention heads) of each facebook/musicgen-* LM: a fine-tune of one must have the same, checked
# before it is built.
LM_WIDTHS: dict[str, tuple[int, int]] = {s.name: s.width for s in SPECS if s.width and s.loader == "audiocraft"}
# A model folder in audiocraft's checkpoint format holds both.
CHECKPOINT_FILES: tuple[str, ...] = ("state_dict.bin", "compression_state_dict.bin")

# Training methods (training/methods/): what the model learns and what the weights tar carries.
METHODS: tuple[str, ...] = ("full", "lora", "textual_inversion", "text_projection")
# The token sampler's precision (generation/fast.py), for predict and for the trainer's generations alike. `auto`:
# int8 weights on CPU (next-token KL ~0.0007 nats vs fp32, ~7x audiocraft's speed; docs/speed.md), fp16 on CUDA
# (audiocraft's own GPU precision); `none`: the LM's own precision, the exact tokens of audiocraft's generate.
SAMPLER_PRECISIONS: tuple[str, ...] = ("auto", "int8", "bf16", "fp16", "none")
