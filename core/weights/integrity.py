"""Integrity of weights from anywhere: every member against its recorded sha256, an LM config against its base's
architecture (bounded before anything is built), an adapter's base against the recorded fingerprint, and a folder
holding what a loader needs. Nothing here builds a model."""

from __future__ import annotations

import hashlib
import logging
import typing as tp
from pathlib import Path

import torch

from core import adapters, tiny
from core.catalogue import CHECKPOINT_FILES, PRETRAINED_COMPRESSION, SPEC, TINY_COMPRESSION
from core.errors import WeightsError
from core.weights.format import (
    FINETUNE_FILE,
    INTEGRITY_MEMBERS,
    architecture_fingerprint,
    base_of,
    plain_cfg,
    read_finetune_info,
)
from core.weights.peft_format import check_peft_folder, is_peft_folder
from core.weights.transformers_format import CONFIG_FILE as TRANSFORMERS_CONFIG_FILE
from core.weights.transformers_format import is_transformers_folder

logger = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_members(folder: Path, info: dict[str, tp.Any], label: str) -> None:
    """Check each weights member against the sha256 finetune.json records (`integrity.sha256`).

    Tars written before these fields existed load with an info line. Called on every folder `unpack` returns
    except cached ones (checked when they were extracted).
    """
    recorded = (info.get("integrity") or {}).get("sha256")
    if not recorded:
        logger.info("%s records no checksums (written before they were added): its members are not verified", label)
        return
    for name, expected in sorted(recorded.items()):
        path = _member(folder, name, label)
        if not path.is_file():
            raise WeightsError(f"Weights {label}: {name} is missing, and {FINETUNE_FILE} lists it. Re-export the tar.")
        actual = sha256_file(path)
        if actual != expected:
            raise WeightsError(
                f"Weights {label}: {name} is corrupt (sha256 {actual[:16]}..., {FINETUNE_FILE} records "
                f"{expected[:16]}...). Re-download or re-export the trained_model.tar."
            )


def _member(folder: Path, name: str, label: str) -> Path:
    """`folder / name` for a weights member `name`, confined to the folder: a plain known name (finetune.json is
    checked for that), and no link leading out of it (in the Hugging Face cache, a snapshot's files are links to
    its repo's `blobs/`, which is theirs). Nothing outside is looked at: the error says nothing about it."""
    if name not in INTEGRITY_MEMBERS:
        raise WeightsError(f"Weights {label}: {FINETUNE_FILE} lists {name[:60]!r}, which is not a weights member.")
    path = folder / name
    if path.is_symlink():
        roots = [folder.resolve()]
        if folder.parent.name == "snapshots":
            roots.append((folder.parent.parent / "blobs").resolve())
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            target = None
        if target is None or not any(target.is_relative_to(root) for root in roots):
            raise WeightsError(
                f"Weights {label}: {name} is a link leading out of the weights folder; give a folder holding the "
                "files themselves (or the trained_model.tar)."
            )
    return path


def verify_architecture(info: dict[str, tp.Any], cfg: tp.Any, base: str, label: str) -> None:
    """The base architecture `cfg` describes must be the one the weights were trained on (finetune.json's
    `integrity.base_architecture`): an adapter never goes into another base."""
    recorded = (info.get("integrity") or {}).get("base_architecture")
    if not recorded:
        logger.info("%s records no base architecture fingerprint (an older tar): not verified", label)
        return
    actual = architecture_fingerprint(cfg)
    if actual != recorded:
        raise WeightsError(
            f"Weights {label} were trained on another architecture than base model {base or 'unknown'} "
            f"(fingerprint {actual[:12]} here, {recorded[:12]} recorded in {FINETUNE_FILE}): was base_model in "
            f"{FINETUNE_FILE} changed? Use the model_version the weights were trained on."
        )


# Bounds on an LM config inside state_dict.bin, for bases the catalogue cannot describe (a local model folder, a
# style model, a model trained from scratch): wide enough for every MusicGen, far below what would exhaust memory.
LM_CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "dim": (8, 8192),
    "num_heads": (1, 128),
    "num_layers": (1, 96),
    "n_q": (1, 32),
    "card": (2, 65536),
}
MAX_LM_PARAMETERS = 4_500_000_000  # musicgen-large, the largest base, has 3.3 B
# (n_q, card) of each EnCodec a model version names (`ModelSpec.compression`): what an LM trained on it predicts.
ENCODEC_CODEBOOKS = {PRETRAINED_COMPRESSION: (4, 2048), TINY_COMPRESSION: (tiny.N_Q, tiny.CARD)}


def base_architecture(base: str) -> dict[str, int]:
    """What the catalogue knows of base model `base`'s LM (`transformer_lm` keys: dim, num_heads, num_layers, n_q,
    card); empty for a base it does not describe (a local folder)."""
    spec = SPEC.get(base)
    if spec is None:  # a facebook/musicgen-* id audiocraft builds, as its version
        spec = next((s for s in SPEC.values() if s.loader == "audiocraft" and s.hub_id == base), None)
    if spec is None:
        return {}
    if spec.tiny and not spec.scratch:  # built offline by core/tiny.py: its config says everything
        lm = tiny.lm_cfg(spec.name)["transformer_lm"]
        return {key: int(lm[key]) for key in LM_CONFIG_BOUNDS}
    known: dict[str, int] = {}
    if spec.layout:
        known["num_layers"], known["n_q"] = spec.layout
    if spec.width and spec.loader == "audiocraft":  # MusicGen-Style's LM is not described by its width alone
        known["dim"], known["num_heads"] = spec.width
    if spec.loader == "audiocraft":
        known["card"] = ENCODEC_CODEBOOKS[spec.compression][1]
    if spec.scratch:
        known["n_q"], known["card"] = ENCODEC_CODEBOOKS[spec.compression]
    return known


def check_lm_config(cfg: tp.Any, base: str, label: str) -> None:
    """The LM config a full fine-tune's state_dict.bin carries, checked before anything is built from it: every
    size an integer within `LM_CONFIG_BOUNDS`, the whole under `MAX_LM_PARAMETERS`, and equal to the declared base's
    architecture where the catalogue knows it (a fine-tune keeps its base's shape). A config that asks for more is
    refused by name instead of allocated."""
    fix = "Use the trained_model.tar train.py wrote: its state_dict.bin was altered or is not ours."
    try:
        plain = plain_cfg(cfg)
    except Exception as e:  # noqa: BLE001 - whatever the file holds: one message
        raise WeightsError(
            f"state_dict.bin of {label}: its 'xp.cfg' is not a config ({type(e).__name__}). {fix}"
        ) from None
    lm = plain.get("transformer_lm")
    if not isinstance(lm, dict):
        raise WeightsError(f"state_dict.bin of {label}: its config has no transformer_lm section. {fix}")
    sizes: dict[str, int] = {}
    for key, (low, high) in LM_CONFIG_BOUNDS.items():
        value = lm.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise WeightsError(
                f"state_dict.bin of {label}: transformer_lm.{key} is {str(value)[:40]}, outside {low}..{high}. {fix}"
            )
        sizes[key] = value
    if sizes["dim"] % sizes["num_heads"]:
        raise WeightsError(
            f"state_dict.bin of {label}: transformer_lm.dim {sizes['dim']} is not a multiple of num_heads "
            f"{sizes['num_heads']}. {fix}"
        )
    parameters = 12 * sizes["num_layers"] * sizes["dim"] ** 2 + 2 * sizes["n_q"] * sizes["card"] * sizes["dim"]
    if parameters > MAX_LM_PARAMETERS:
        raise WeightsError(
            f"state_dict.bin of {label}: its config describes an LM of about {parameters / 1e9:.0f} B parameters, "
            f"more than any MusicGen ({MAX_LM_PARAMETERS / 1e9:.1f} B at most). {fix}"
        )
    expected = base_architecture(base)
    differ = [f"{key} {sizes[key]} (base: {value})" for key, value in expected.items() if sizes[key] != value]
    if differ:
        raise WeightsError(
            f"state_dict.bin of {label} does not have the architecture of its base model {base}: "
            f"{', '.join(differ)}. Was base_model in {FINETUNE_FILE} changed? {fix}"
        )
    segment = (plain.get("dataset") or {}).get("segment_duration") if isinstance(plain.get("dataset"), dict) else None
    if segment is not None and (
        not isinstance(segment, int | float) or isinstance(segment, bool) or not 0 < segment <= 3600
    ):
        raise WeightsError(
            f"state_dict.bin of {label}: dataset.segment_duration {str(segment)[:40]} is not a duration in seconds "
            f"(0..3600). {fix}"
        )


def check_folder(folder: Path, label: str | None = None) -> None:
    """A folder holds loadable weights: the checkpoint files (state_dict.bin an audiocraft LM checkpoint), or only
    a LoRA adapter whose config names its base model; or, in transformers' format, a MusicGen (its config and
    weights) or a PEFT LoRA adapter naming its base."""
    label = label or str(folder)
    if is_peft_folder(folder):
        check_peft_folder(folder, label)
        return
    if not (folder / "state_dict.bin").is_file() and is_transformers_folder(folder):
        check_transformers_folder(folder, label)
        return
    # Checksums first: a flipped byte is then reported as a corrupt member, whatever torch.load would make of it.
    verify_members(folder, read_finetune_info(folder, label), label)
    adapter_only = (folder / adapters.ADAPTER_CONFIG_FILE).is_file() and not (folder / "state_dict.bin").is_file()
    if adapter_only:
        if not (folder / adapters.ADAPTER_FILE).is_file():
            raise WeightsError(f"Weights {label}: {adapters.ADAPTER_CONFIG_FILE} without {adapters.ADAPTER_FILE}.")
        if not base_of(folder, read_finetune_info(folder, label)):
            raise WeightsError(
                f"Weights {label}: a LoRA adapter whose {adapters.ADAPTER_CONFIG_FILE} (and {FINETUNE_FILE}) names no "
                "base_model: it cannot be applied. Upload the whole trained_model.tar."
            )
        return
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        raise WeightsError(
            f"The weights {label} lack {', '.join(missing)}: a trained_model.tar must hold "
            f"{', '.join(CHECKPOINT_FILES)} (and {FINETUNE_FILE}). Was it written by train.py?"
        )
    try:
        pkg = torch.load(folder / "state_dict.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"state_dict.bin of {label} is not a readable torch checkpoint ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
        raise WeightsError(
            f"state_dict.bin of {label} is not an audiocraft LM checkpoint (no 'best_state' / 'xp.cfg')."
        )


def check_transformers_folder(folder: Path, label: str) -> None:
    """A transformers MusicGen folder: its weights are there, and its config's sizes are within `LM_CONFIG_BOUNDS`
    (read before anything is built: a config from anyone's URL must not ask for terabytes)."""
    import json

    fix = "Give a folder (or repo) saved by transformers' MusicgenForConditionalGeneration.save_pretrained."
    if not any(folder.glob("model*.safetensors")):
        raise WeightsError(f"Weights {label}: a transformers config.json without model.safetensors. {fix}")
    try:
        config = json.loads((folder / TRANSFORMERS_CONFIG_FILE).read_bytes().decode("utf-8"))
        decoder = config["decoder"]
        sizes = {
            "dim": decoder["hidden_size"],
            "num_heads": decoder["num_attention_heads"],
            "num_layers": decoder["num_hidden_layers"],
            "n_q": decoder["num_codebooks"],
            "card": decoder["vocab_size"],
        }
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        raise WeightsError(
            f"Weights {label}: config.json is not a transformers MusicGen config ({type(e).__name__}: {e}). {fix}"
        ) from None
    for key, (low, high) in LM_CONFIG_BOUNDS.items():
        value = sizes[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise WeightsError(
                f"Weights {label}: config.json's decoder gives {key} {str(value)[:40]}, outside {low}..{high}. {fix}"
            )
