"""`trained_model.tar`: the weights a fine-tune produces and predict.py loads.

A real tar archive holding

- `state_dict.bin` in audiocraft's exported-LM format: `{'best_state': fp16 state dict, 'xp.cfg': plain dict,
  'version': audiocraft version, 'exported': True}` (plain containers only: loads with `weights_only=True`);
- `compression_state_dict.bin`: for a facebook/musicgen-* base, audiocraft's *reference* form
  `{'pretrained': 'facebook/encodec_32khz', ...}` plus `base_model` (the exact base whose EnCodec we prefer when it
  is cached); for tiny or local-folder bases, a copy of the base's file (the full state);
- `finetune.json`: base model_version, method, training inputs, labels vocabulary, trigger word, format version;
- for fine-tunes that reference their base instead of copying it (`finetune.json` `base_model`; `state_dict.bin`
  then holds the config and an empty `best_state`): `adapter.safetensors` + `adapter_config.json` (LoRA) or
  `embeddings.safetensors` (textual inversion, text projection); see `core/adapters.py`.

Extracted, the folder loads with audiocraft's own `MusicGen.get_pretrained(folder)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import typing as tp
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from core import adapters, tiny
from core.errors import WeightsError
from core.versions import CHECKPOINT_FILES, PRETRAINED, STYLE_PRETRAINED, ModelUnavailableError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FINETUNE_FILE = "finetune.json"
OPTIONAL_FILES = ("adapter.safetensors", "adapter_config.json", "embeddings.safetensors")
KNOWN_FILES = (*CHECKPOINT_FILES, FINETUNE_FILE, *OPTIONAL_FILES)
PRETRAINED_COMPRESSION = "facebook/encodec_32khz"
MAX_MEMBER_BYTES = 64 * 1024**3
REPORT_MEMBERS = ("loss.png", "samples/")  # the training report: for people, not needed to load


def _plain(cfg: tp.Any) -> dict:
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
    plain = _plain(cfg)
    for key in ("device", "dtype"):  # overwritten by the loader; keep the package device-neutral
        plain.pop(key, None)
    return {"best_state": best_state, "xp.cfg": plain, "version": audiocraft.__version__, "exported": True}


def compression_package(base: str) -> dict:
    """The compression part for base model `base` (a model_version or a local model folder)."""
    import audiocraft

    if base in PRETRAINED or base in STYLE_PRETRAINED or base.startswith("facebook/musicgen"):
        return {
            "pretrained": PRETRAINED_COMPRESSION,
            "base_model": {**PRETRAINED, **STYLE_PRETRAINED}.get(base, base),
            "exported": True,
            "version": audiocraft.__version__,
        }
    if base == "micro":  # trained from scratch on the pretrained EnCodec (training/methods/scratch.py)
        return {"pretrained": PRETRAINED_COMPRESSION, "exported": True, "version": audiocraft.__version__}
    if base == "tiny-micro":  # ... on the tiny models' EnCodec
        base = "tiny"
    tiny_versions = (*tiny.TINY_VERSIONS, *tiny.STYLE_TINY_VERSIONS)
    folder = tiny.ensure_tiny(base) if base in tiny_versions else Path(base)
    return torch.load(folder / "compression_state_dict.bin", map_location="cpu", weights_only=True)


def write_trained_model(
    out_tar: str | Path,
    *,
    state_dict: dict[str, torch.Tensor],
    cfg: tp.Any,
    base_model: str,
    finetune: dict[str, tp.Any],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `trained_model.tar` atomically (a partial file never carries the final name)."""
    out_tar = Path(out_tar)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    info = {"format_version": FORMAT_VERSION, "base_model": base_model, **finetune}
    members: dict[str, bytes] = {}
    for name, obj in (("state_dict.bin", lm_package(state_dict, cfg)), ("compression_state_dict.bin", None)):
        buffer = io.BytesIO()
        torch.save(obj if obj is not None else compression_package(base_model), buffer)
        members[name] = buffer.getvalue()
    members[FINETUNE_FILE] = json.dumps(info, indent=2, sort_keys=True, default=str).encode()
    for name, data in (extra_files or {}).items():
        if name not in OPTIONAL_FILES:
            raise ValueError(f"{name} is not a known weights member ({OPTIONAL_FILES})")
        members[name] = data
    fd, tmp = tempfile.mkstemp(prefix=".trained_model-", suffix=".tar", dir=out_tar.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for name, data in members.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                member.mode = 0o644
                tar.addfile(member, io.BytesIO(data))
        os.replace(tmp, out_tar)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("Wrote %s (%.1f MB)", out_tar, out_tar.stat().st_size / 1e6)
    return out_tar


# ------------------------------------------------------------------------------------------------ loading


def cache_dir(kind: str) -> Path:
    path = tiny.cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(url_or_path: str | os.PathLike[str]) -> Path:
    """A local path for a weights file given as a path, `file://` URL or http(s) URL (downloads cached by URL)."""
    text = str(url_or_path)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("http", "https"):
        target = cache_dir("downloads") / (hashlib.sha256(text.encode()).hexdigest()[:24] + ".tar")
        if target.is_file():
            logger.info("Using cached download of %s", text)
            return target
        logger.info("Downloading weights from %s", text)
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(text, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise WeightsError(f"Could not download weights from {text}: {e}. Check the URL and the network.") from None
        os.replace(tmp, target)
        return target
    if parsed.scheme == "file":
        text = urllib.parse.unquote(parsed.path)
    path = Path(text).expanduser()
    if not path.exists():
        raise WeightsError(f"Weights not found: {path} does not exist. Give the path or URL of a trained_model.tar.")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack(weights: str | Path) -> Path:
    """Extract a `trained_model.tar` (path or URL) into the cache, keyed by its content; returns the folder.

    A folder already holding the checkpoint files is returned as is. Only regular files with known names are
    taken from the archive (a leading folder is allowed); links, devices and paths outside are refused.
    """
    path = fetch(weights)
    if path.is_dir():
        _check_folder(path)
        return path
    if not tarfile.is_tarfile(path):
        raise WeightsError(
            f"{path.name} is not a trained_model.tar: expected a tar archive holding "
            f"{', '.join(CHECKPOINT_FILES)} and {FINETUNE_FILE} (as written by train.py)."
        )
    folder = cache_dir("weights") / _sha256(path)[:20]
    if (folder / "state_dict.bin").is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder.parent))
    try:
        with tarfile.open(path) as tar:
            taken = 0
            for member in tar.getmembers():
                name = Path(member.name).name
                if not member.isfile() or name not in KNOWN_FILES:
                    is_report = member.name.lstrip("./").startswith(REPORT_MEMBERS)
                    if (member.isfile() and not is_report) or member.issym() or member.islnk():
                        logger.warning("Ignoring %s in %s (not a weights file)", member.name, path.name)
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise WeightsError(f"{member.name} in {path.name} is implausibly large ({member.size} bytes)")
                source = tar.extractfile(member)
                assert source is not None
                with open(tmp / name, "wb") as out:
                    shutil.copyfileobj(source, out, length=1 << 20)
                taken += 1
        _check_folder(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "state_dict.bin").is_file():
                raise
    except tarfile.TarError as e:
        raise WeightsError(f"{path.name} is a corrupt tar archive ({e}); re-download or re-export it.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_folder(folder: Path) -> None:
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        raise WeightsError(
            f"The weights lack {', '.join(missing)}: a trained_model.tar must hold {', '.join(CHECKPOINT_FILES)} "
            f"(and {FINETUNE_FILE}). Was it written by train.py?"
        )
    try:
        pkg = torch.load(folder / "state_dict.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"state_dict.bin is not a readable torch checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
        raise WeightsError("state_dict.bin is not an audiocraft LM checkpoint (no 'best_state' / 'xp.cfg').")


def read_finetune_info(folder: str | Path) -> dict[str, tp.Any]:
    path = Path(folder) / FINETUNE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{FINETUNE_FILE} is not valid JSON ({e}).") from None


def _load_lm(folder: Path, device: str, load_lm_model: tp.Callable[..., tp.Any]) -> tp.Any:
    """audiocraft's loader, or ours for MusicGen-Style fine-tunes (audiocraft 1.3.0 has no style conditioner)."""
    from core import style

    if style.is_style_folder(folder):
        return style.load_style_lm(folder, device)
    return load_lm_model(str(folder), device=device)


def load_trained_model(weights: str | Path, device: str | None = None):
    """A fine-tuned MusicGen from a `trained_model.tar` (path or URL) or its extracted folder.

    Uses audiocraft's loaders. For a facebook/musicgen-* base, the base's own EnCodec is used when it is in the
    Hugging Face cache; otherwise audiocraft's reference (`facebook/encodec_32khz`) is followed.
    """
    from audiocraft.models import MusicGen
    from audiocraft.models.loaders import load_compression_model, load_lm_model

    from core.versions import default_device

    folder = unpack(weights)
    info = read_finetune_info(folder)
    base = str(info.get("base_model", ""))
    device = device or default_device()
    if (folder / adapters.ADAPTER_CONFIG_FILE).is_file() or (folder / adapters.EMBEDDINGS_FILE).is_file():
        return _load_with_adapter(folder, info, base, device)
    model_home = tiny.ensure_tiny(base) if base in tiny.TINY_VERSIONS else folder
    try:
        with tiny.tiny_hubs(model_home):
            lm = _load_lm(folder, device, load_lm_model)
        pkg = torch.load(folder / "compression_state_dict.bin", map_location="cpu", weights_only=True)
        compression = None
        if "pretrained" in pkg and pkg.get("base_model"):
            try:
                compression = load_compression_model(pkg["base_model"], device=device)
            except Exception as e:  # noqa: BLE001 - fall back to audiocraft's own reference below
                logger.info("Base EnCodec of %s not available (%s); using %s", pkg["base_model"], e, pkg["pretrained"])
        if compression is None:
            compression = load_compression_model(str(folder), device=device)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailableError(
            f"Could not load the fine-tuned weights in {folder} (base {base or 'unknown'}): {type(e).__name__}: {e}. "
            "If the base is a facebook/musicgen-* model, its EnCodec must be downloadable or in the HF cache."
        ) from None
    if "self_wav" in lm.condition_provider.conditioners:  # as MusicGen.get_pretrained does
        lm.condition_provider.conditioners["self_wav"].match_len_on_eval = True
        lm.condition_provider.conditioners["self_wav"]._use_masking = False
    model = MusicGen(f"fine-tune of {base}" if base else str(folder), compression, lm)
    model.finetune_info = info
    return model


def _load_with_adapter(folder: Path, info: dict[str, tp.Any], base: str, device: str):
    """A fine-tune that references its base (LoRA, textual inversion, text projection): the base model (by its
    model_version, as trained) with the adapter merged into its LM and/or the learned tensors put in."""
    from core.versions import load_musicgen

    if not base:
        raise WeightsError(f"{FINETUNE_FILE} names no base_model: the LoRA adapter in {folder} cannot be applied.")
    lora = (folder / adapters.ADAPTER_CONFIG_FILE).is_file()
    if lora and not (folder / adapters.ADAPTER_FILE).is_file():
        raise WeightsError(f"{adapters.ADAPTER_CONFIG_FILE} without {adapters.ADAPTER_FILE} in {folder}.")
    model = load_musicgen(base, device)
    try:
        if lora:
            adapters.apply_lora_files(model.lm, folder, merge=True)
        if (folder / adapters.EMBEDDINGS_FILE).is_file():
            adapters.apply_partial_file(model.lm, folder)
    except (KeyError, ValueError, RuntimeError) as e:
        raise WeightsError(
            f"The learned weights in {folder} do not fit base model {base} ({type(e).__name__}: {e}); "
            "was it trained on another model_version?"
        ) from None
    model.name = f"{info.get('method', 'adapter')} fine-tune of {base}"
    model.finetune_info = info
    return model
