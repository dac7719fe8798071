"""The `trained_model.tar` format: its members, `finetune.json`, and the one tar writer.

A real tar archive holding

- `state_dict.bin` in audiocraft's exported-LM format: `{'best_state': fp16 state dict, 'xp.cfg': plain dict,
  'version': audiocraft version, 'exported': True}` (plain containers only: loads with `weights_only=True`);
- `compression_state_dict.bin`: for a facebook/musicgen-* base, audiocraft's *reference* form
  `{'pretrained': 'facebook/encodec_32khz', ...}` plus `base_model` (the exact base whose EnCodec we prefer when it
  is cached); for tiny or local-folder bases, a copy of the base's file (the full state);
- `finetune.json`: base model_version, method, training inputs, labels vocabulary, trigger word, format version,
  and `integrity`: the sha256 of every weights member and a fingerprint of the base architecture
  (`architecture_fingerprint`), both verified on load (`core.weights.integrity`);
- for fine-tunes that reference their base instead of copying it (`finetune.json` `base_model`; `state_dict.bin`
  then holds the config and an empty `best_state`): `adapter.safetensors` + `adapter_config.json` (LoRA) or
  `embeddings.safetensors` (textual inversion, text projection); see `core/adapters.py`.

Beside them, under `transformers/`, the same fine-tune in Hugging Face transformers' format, for other tools
(`core.weights.transformers_format`: config + safetensors of `MusicgenForConditionalGeneration` or
`MusicgenMelodyForConditionalGeneration`; a LoRA adapter as a PEFT adapter on the transformers base,
`core.weights.peft_format`); finetune.json's `transformers` says which, or why the model has no such form. Loading
the tar never reads that folder (the members above are the weights).

Extracted, the folder loads with audiocraft's own `MusicGen.get_pretrained(folder)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import typing as tp
from pathlib import Path

import torch

from core import adapters, tiny
from core.catalogue import CHECKPOINT_FILES, PRETRAINED_COMPRESSION, SPEC
from core.errors import WeightsError
from core.files import current_umask

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FINETUNE_FILE = "finetune.json"
OPTIONAL_FILES = ("adapter.safetensors", "adapter_config.json", "embeddings.safetensors")
KNOWN_FILES = (*CHECKPOINT_FILES, FINETUNE_FILE, *OPTIONAL_FILES)
MAX_MEMBER_BYTES = 64 * 1024**3
# The training report (training/export.py): for people, not needed to load, so unpacking skips it without a warning.
REPORT_MEMBERS = ("loss.png", "metrics.json", "report.html", "samples/")
# The fine-tune in transformers' format (a folder in the tar, and beside the tar in output_dir): for other tools.
TRANSFORMERS_FOLDER = "transformers"
PORTABLE_MEMBERS = (TRANSFORMERS_FOLDER + "/",)
# The members whose bytes are the weights: hashed into finetune.json on export, verified on load.
INTEGRITY_MEMBERS = (*CHECKPOINT_FILES, *OPTIONAL_FILES)
# LM cfg sections audiocraft's builders construct every LM parameter from (names and shapes follow from them).
ARCHITECTURE_KEYS = ("lm_model", "transformer_lm", "codebooks_pattern", "conditioners", "fuser")


def plain_cfg(cfg: tp.Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return tp.cast(dict, OmegaConf.to_container(cfg, resolve=True))
    if isinstance(cfg, str):
        return tp.cast(dict, OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    return dict(cfg)


def lm_package(state_dict: dict[str, torch.Tensor], cfg: tp.Any) -> dict:
    """audiocraft's exported-LM package, weights in fp16 (half the size; loads into an fp32 model as is)."""
    import audiocraft

    best_state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
        for k, v in state_dict.items()
    }
    plain = plain_cfg(cfg)
    for key in ("device", "dtype"):  # overwritten by the loader; keep the package device-neutral
        plain.pop(key, None)
    return {"best_state": best_state, "xp.cfg": plain, "version": audiocraft.__version__, "exported": True}


def compression_package(base: str) -> dict:
    """The compression part for base model `base` (a model_version, a facebook/musicgen-* id or a local folder)."""
    import audiocraft

    spec = SPEC.get(base)  # None: a local folder or a hub id the catalogue does not name
    if (spec is not None and spec.hub_id) or base.startswith("facebook/musicgen"):
        return {
            "pretrained": PRETRAINED_COMPRESSION,
            "base_model": spec.hub_id if spec is not None else base,
            "exported": True,
            "version": audiocraft.__version__,
        }
    if spec is not None and spec.scratch and spec.compression == PRETRAINED_COMPRESSION:
        # trained from scratch on the pretrained EnCodec (training/methods/scratch.py): a reference, as above
        return {"pretrained": PRETRAINED_COMPRESSION, "exported": True, "version": audiocraft.__version__}
    if spec is not None and spec.tiny:  # a scratch LM on the tiny EnCodec takes the tiny model's (its `compression`)
        folder = tiny.ensure_tiny(spec.compression if spec.scratch else base)
    else:
        folder = Path(base)
    return torch.load(folder / "compression_state_dict.bin", map_location="cpu", weights_only=True)


def architecture_fingerprint(cfg: tp.Any) -> str:
    """A hash of the LM architecture `cfg` describes: its `ARCHITECTURE_KEYS` sections, without dropout rates.

    audiocraft's `get_lm_model` builds every LM parameter (names and shapes: dim, heads, layers, n_q, card, the
    conditioners and their projections) from these keys and nothing else, so equal fingerprints mean the same
    parameter names and shapes. It is read from the cfg, not the weights, because an adapter export holds no base
    weights: at load the base model is built first and its own `lm.cfg` is fingerprinted and compared.
    """

    def strip(node: tp.Any) -> tp.Any:
        if isinstance(node, dict):
            return {str(k): strip(v) for k, v in node.items() if "dropout" not in str(k)}
        if isinstance(node, list | tuple):
            return [strip(v) for v in node]
        return node

    plain = plain_cfg(cfg)
    arch = strip({k: plain.get(k) for k in ARCHITECTURE_KEYS})
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()


def write_trained_model(
    out_tar: str | Path,
    *,
    state_dict: dict[str, torch.Tensor],
    cfg: tp.Any,
    base_model: str,
    finetune: dict[str, tp.Any],
    extra_files: dict[str, bytes] | None = None,
    report_files: dict[str, bytes] | None = None,
    portable_files: dict[str, Path] | None = None,
) -> Path:
    """Write `trained_model.tar` (through `write_tar`: atomic, mode 0644 less the umask).

    `finetune.json` gets `integrity`: the sha256 of each weights member and `architecture_fingerprint(cfg)` (the
    base's architecture: `cfg` is the base's LM cfg for adapter exports, the trained LM's for full ones).
    `extra_files`: adapter / embeddings members (`OPTIONAL_FILES`), hashed like the weights. `report_files`: the
    training report (loss plot, samples, report.html: for people, not read on load), after the weights, not hashed.
    `portable_files`: the transformers form (name in its folder -> file), stored under `transformers/`, last.
    """
    members: dict[str, bytes | Path] = {
        **weights_members(
            state_dict=state_dict, cfg=cfg, base_model=base_model, finetune=finetune, extra_files=extra_files
        )
    }
    for name, data in (report_files or {}).items():
        if name in KNOWN_FILES:
            raise ValueError(f"{name} is a weights member, not a report file; name the report file otherwise")
        members[name] = data
    for name, path in (portable_files or {}).items():
        members[f"{TRANSFORMERS_FOLDER}/{name}"] = Path(path)
    out_tar = write_tar(out_tar, members)
    logger.info("Wrote %s (%.1f MB)", out_tar, out_tar.stat().st_size / 1e6)
    return out_tar


def weights_members(
    *,
    state_dict: dict[str, torch.Tensor],
    cfg: tp.Any,
    base_model: str,
    finetune: dict[str, tp.Any],
    extra_files: dict[str, bytes] | None = None,
) -> dict[str, bytes]:
    """The weights members of a trained_model.tar and its finetune.json (with `integrity`), name -> bytes: what
    `write_trained_model` writes, and what an extracted tar's folder holds."""
    members: dict[str, bytes] = {}
    for name, obj in (("state_dict.bin", lm_package(state_dict, cfg)), ("compression_state_dict.bin", None)):
        buffer = io.BytesIO()
        torch.save(obj if obj is not None else compression_package(base_model), buffer)
        members[name] = buffer.getvalue()
    for name, data in (extra_files or {}).items():
        if name not in OPTIONAL_FILES:
            raise ValueError(f"{name} is not a known weights member ({OPTIONAL_FILES})")
        members[name] = data
    integrity = {
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
        "base_architecture": architecture_fingerprint(cfg),
    }
    info = {"format_version": FORMAT_VERSION, "base_model": base_model, **finetune, "integrity": integrity}
    members[FINETUNE_FILE] = json.dumps(info, indent=2, sort_keys=True, default=str).encode()
    return members


def write_tar(out_tar: str | Path, members: tp.Mapping[str, bytes | Path]) -> Path:
    """Write the tar `out_tar` holding `members` (name -> bytes, or a file copied in chunks: gigabytes of weights
    are never held in memory twice; in that order); the one writer of our tars.

    Atomic: written to a temp file beside it, then renamed, so a partial file never carries the final name. The
    file is mode 0644 less the umask (a file handed to users; `mkstemp` alone would leave it 0600). Every member is
    a regular file, mode 0644, mtime 0, owner 0: the same members make the same archive byte for byte.
    """
    out_tar = Path(out_tar)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".trained_model-", suffix=".tar", dir=out_tar.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for name, data in members.items():
                member = tarfile.TarInfo(name)
                member.size = data.stat().st_size if isinstance(data, Path) else len(data)
                member.mode = 0o644
                member.mtime = 0
                if isinstance(data, Path):
                    with open(data, "rb") as source:
                        tar.addfile(member, source)
                else:
                    tar.addfile(member, io.BytesIO(data))
        os.chmod(tmp, 0o644 & ~current_umask())
        os.replace(tmp, out_tar)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_tar


def base_of(folder: Path, info: dict[str, tp.Any]) -> str:
    """The base model a fine-tune references: finetune.json's, else (adapter-only repos) adapter_config.json's."""
    base = str(info.get("base_model", "") or "")
    if not base and (folder / adapters.ADAPTER_CONFIG_FILE).is_file():
        try:
            config = json.loads((folder / adapters.ADAPTER_CONFIG_FILE).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            config = {}
        base = config.get("base_model") if isinstance(config, dict) else None
        base = base if isinstance(base, str) else ""
    return base


MAX_FINETUNE_BYTES = 16 * 1024**2  # finetune.json holds settings and a report summary: kilobytes, not megabytes
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def read_finetune_info(folder: str | Path, label: str | None = None) -> dict[str, tp.Any]:
    """finetune.json of a weights folder, every field we read typed and bounded (`check_finetune_info`); `{}` when
    there is none (tars written before it existed). Whatever the file holds, a bad one is a `WeightsError` naming
    the weights and the fix, never a traceback: weights come from anyone's URL."""
    label = label or str(folder)
    path = Path(folder) / FINETUNE_FILE
    if not path.is_file():
        return {}
    fix = "Re-export the trained_model.tar with train.py (or re-download it)."
    try:
        if path.stat().st_size > MAX_FINETUNE_BYTES:
            raise WeightsError(f"{FINETUNE_FILE} of {label} is over {MAX_FINETUNE_BYTES >> 20} MB: not ours. {fix}")
        text = path.read_bytes().decode("utf-8")
        info = json.loads(text)
    except UnicodeDecodeError as e:
        raise WeightsError(f"{FINETUNE_FILE} of {label} is not UTF-8 text (byte {e.start}). {fix}") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{FINETUNE_FILE} of {label} is not valid JSON ({e}). {fix}") from None
    except RecursionError:
        raise WeightsError(f"{FINETUNE_FILE} of {label} is nested too deeply to be ours. {fix}") from None
    except OSError as e:
        raise WeightsError(f"{FINETUNE_FILE} of {label} could not be read ({e.strerror or e}). {fix}") from None
    check_finetune_info(info, label)
    return info


def check_finetune_info(info: tp.Any, label: str) -> None:
    """The fields of finetune.json the loader reads, each of its type and within bounds: a JSON object;
    `format_version` one this code reads; `base_model`, `method` short strings; `integrity.sha256` a map of weights
    member names (`INTEGRITY_MEMBERS`: plain names in the weights folder, never a path) to sha256 hex digests;
    `integrity.base_architecture` a sha256 hex digest. Other fields are the training's record, for people."""
    fix = "Re-export the trained_model.tar with train.py (or re-download it)."

    def bad(what: str) -> WeightsError:
        return WeightsError(f"{FINETUNE_FILE} of {label}: {what}. {fix}")

    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, found {_json_type(info)}")
    version = info.get("format_version", FORMAT_VERSION)  # tars from before the field are the first format
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WeightsError(
            f"{FINETUNE_FILE} of {label}: format_version {str(version)[:40]!r} is not a format this code knows "
            f"(it reads format {FORMAT_VERSION}). Use a trained_model.tar written by train.py."
        )
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{FINETUNE_FILE} of {label}: format_version {version} was written by a newer version of this fine-tuner "
            f"(this one reads format {FORMAT_VERSION}): upgrade it to load these weights."
        )
    for name in ("base_model", "method"):
        value = info.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 4096):
            raise bad(f"{name} must be a string (a model_version or folder), found {_json_type(value)}")
    integrity = info.get("integrity")
    if integrity is None:
        return
    if not isinstance(integrity, dict):
        raise bad(f"integrity must be an object, found {_json_type(integrity)}")
    sha = integrity.get("sha256")
    if sha is not None:
        if not isinstance(sha, dict):
            raise bad(f"integrity.sha256 must be an object (member name: sha256), found {_json_type(sha)}")
        for name, digest in sha.items():
            if name not in INTEGRITY_MEMBERS:
                # Only the known member names: a path here would make the loader read (and report on) a file
                # outside the weights folder.
                raise bad(f"integrity.sha256 lists {name[:60]!r}, which is not a weights member")
            if not isinstance(digest, str) or not HEX64.match(digest):
                raise bad(f"integrity.sha256 of {name} is not a sha256 hex digest")
    fingerprint = integrity.get("base_architecture")
    if fingerprint is not None and not (isinstance(fingerprint, str) and HEX64.match(fingerprint)):
        raise bad("integrity.base_architecture is not a sha256 hex digest")


def _json_type(value: tp.Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
