"""The catalogue: every model version and training method by name, and which family each version belongs to.

A leaf: it imports nothing of ours (nor torch), so the params modules, the loaders and the tests all read the one
list. Adding a model version: add it here, and to the literal `model_version` choices of `predict.py` and `train.py`
(Cog reads those signatures statically; `tests/test_cog_schema.py` proves they equal `MODEL_VERSION_CHOICES`).
"""

from __future__ import annotations

__all__ = [
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

# The facebook/musicgen-* checkpoints, by the names our inputs use.
PRETRAINED: dict[str, str] = {
    "small": "facebook/musicgen-small",
    "medium": "facebook/musicgen-medium",
    "large": "facebook/musicgen-large",
    "melody": "facebook/musicgen-melody",
    "melody-large": "facebook/musicgen-melody-large",
    "stereo-small": "facebook/musicgen-stereo-small",
    "stereo-medium": "facebook/musicgen-stereo-medium",
    "stereo-large": "facebook/musicgen-stereo-large",
    "stereo-melody": "facebook/musicgen-stereo-melody",
    "stereo-melody-large": "facebook/musicgen-stereo-melody-large",
}
# Small random models built offline in audiocraft's checkpoint format (core/tiny.py).
TINY_VERSIONS: tuple[str, ...] = ("tiny", "tiny-stereo", "tiny-melody", "tiny-t5")
# The models audiocraft's own loaders build (and so training and export handle as they are).
MODEL_VERSIONS: tuple[str, ...] = (*PRETRAINED, *TINY_VERSIONS)
# MusicGen-Style (core/style.py): loaded by our own loader (audiocraft 1.3.0 has no style conditioner), so listed
# apart from MODEL_VERSIONS.
STYLE_PRETRAINED: dict[str, str] = {"style": "facebook/musicgen-style"}
STYLE_TINY_VERSIONS: tuple[str, ...] = ("tiny-style",)
STYLE_VERSIONS: tuple[str, ...] = (*STYLE_PRETRAINED, *STYLE_TINY_VERSIONS)
ALL_MODEL_VERSIONS: tuple[str, ...] = (*MODEL_VERSIONS, *STYLE_VERSIONS)
# New LMs trained from scratch on an existing EnCodec (training/methods/scratch.py): trainable, not loadable.
SCRATCH_VERSIONS: tuple[str, ...] = ("micro", "tiny-micro")
# predict's "the weights this deployment was trained into" (COG_WEIGHTS / replicate_weights).
FINE_TUNED = "fine-tuned"
# The one `model_version` choice list of both predict and train. Cog names a choice list's schema component after
# the input, and `cog build` keeps one component per name for both modes: two different lists under one name
# would leave training with predict's. Each side refuses the choices that are not its own, naming the fix.
MODEL_VERSION_CHOICES: tuple[str, ...] = (FINE_TUNED, *ALL_MODEL_VERSIONS, *SCRATCH_VERSIONS)
TRAINABLE_VERSIONS: tuple[str, ...] = (*ALL_MODEL_VERSIONS, *SCRATCH_VERSIONS)

# Families. Melody: a chroma conditioner (`self_wav`) on the melody input. Stereo: 2 channels, interleaved codebooks.
MELODY_VERSIONS: tuple[str, ...] = ("melody", "melody-large", "stereo-melody", "stereo-melody-large", "tiny-melody")
STEREO_VERSIONS: tuple[str, ...] = (
    "stereo-small",
    "stereo-medium",
    "stereo-large",
    "stereo-melody",
    "stereo-melody-large",
    "tiny-stereo",
)
# 1.5 B parameters and more (medium, melody, style): `parallel=auto` shards them (FSDP) with more than one process.
FSDP_AUTO_VERSIONS: tuple[str, ...] = (
    "medium",
    "large",
    "melody",
    "melody-large",
    "stereo-medium",
    "stereo-large",
    "stereo-melody",
    "stereo-melody-large",
    "style",
)
# (transformer layers, codebooks) of each LM audiocraft builds: lets a bad `lora_targets` fail before the dataset
# is prepared (the authoritative check runs on the loaded model).
LM_LAYOUTS: dict[str, tuple[int, int]] = {
    "small": (24, 4),
    "medium": (48, 4),
    "large": (48, 4),
    "melody": (48, 4),
    "melody-large": (48, 4),
    "stereo-small": (24, 8),
    "stereo-medium": (48, 8),
    "stereo-large": (48, 8),
    "stereo-melody": (48, 8),
    "stereo-melody-large": (48, 8),
    "tiny": (2, 4),
    "tiny-stereo": (2, 8),
    "tiny-melody": (2, 4),
}
# (model dimension, attention heads) of each facebook/musicgen-* LM (the MusicGen paper's small / medium / large; the
# melody and stereo versions share their size's): a fine-tune of one must have the same, checked before it is built.
LM_WIDTHS: dict[str, tuple[int, int]] = {
    "small": (1024, 16),
    "medium": (1536, 24),
    "large": (2048, 32),
    "melody": (1536, 24),
    "melody-large": (2048, 32),
    "stereo-small": (1024, 16),
    "stereo-medium": (1536, 24),
    "stereo-large": (2048, 32),
    "stereo-melody": (1536, 24),
    "stereo-melody-large": (2048, 32),
}
# The 32 kHz EnCodec of every facebook/musicgen-* model (and of `micro`, trained from scratch on it).
PRETRAINED_COMPRESSION = "facebook/encodec_32khz"
# A model folder in audiocraft's checkpoint format holds both.
CHECKPOINT_FILES: tuple[str, ...] = ("state_dict.bin", "compression_state_dict.bin")

# Training methods (training/methods/): what the model learns and what the weights tar carries.
METHODS: tuple[str, ...] = ("full", "lora", "textual_inversion", "text_projection")
# The token sampler's precision (generation/fast.py), for predict and for the trainer's generations alike. `auto`:
# int8 weights on CPU (next-token KL ~0.0007 nats vs fp32, ~7x audiocraft's speed; docs/speed.md), fp16 on CUDA
# (audiocraft's own GPU precision); `none`: the LM's own precision, the exact tokens of audiocraft's generate.
SAMPLER_PRECISIONS: tuple[str, ...] = ("auto", "int8", "bf16", "fp16", "none")
