"""The inputs of dataset preparation: one frozen dataclass, used as the CLI flags of `python -m preprocessing`.

The inputs marked `prepare=True` are declared here only: `training.params.TrainParams` reuses them (`same_as`) as
Cog inputs of `train()` and passes them on."""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.params import InputError, param

__all__ = ["PrepareParams", "DEVICES", "validate", "is_url", "url_message"]

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class PrepareParams:
    dataset_path: str | None = param(
        None,
        "Your training audio: a zip, tar, tar.gz/tgz or gz archive (folders allowed) or a single audio file "
        "(wav, mp3, flac, ogg, opus, m4a, aac, aiff). A text file named like a track (song.mp3 + song.txt) gives "
        "that track's description.",
        file=True,
        required=True,
        prepare=True,
    )
    auto_labeling: bool = param(
        True,
        "Describe tracks that have no description automatically: genre, mood and instruments (essentia), key and bpm.",
        prepare=True,
    )
    drop_vocals: bool = param(
        True,
        "Remove vocals with demucs (htdemucs) before cutting clips; drums, bass and the rest are kept.",
        prepare=True,
    )
    one_same_description: str | None = param(
        None, "One description for every clip; overrides the text files and the automatic labels.", prepare=True
    )
    trigger: str | None = param(
        None,
        "A word put at the start of every description (e.g. a made-up artist token); use it in prompts later "
        "to call the style you trained.",
        prepare=True,
    )
    chunk_seconds: float = param(
        30.0, "Tracks are cut into consecutive clips of this many seconds (MusicGen trains on 30 s).", ge=1.0, le=300.0
    )
    min_clip_seconds: float = param(
        5.0, "Clips (a track's last piece, or a whole short track) shorter than this are dropped.", ge=0.5, le=300.0
    )
    max_unpacked_gb: float = param(
        20.0, "Refuse an archive whose content adds up to more than this many GiB.", ge=0.001, le=10000.0
    )
    max_files: int = param(10000, "Refuse an archive holding more files than this.", ge=1, le=10000000)
    max_compression_ratio: float = param(
        200.0, "Refuse an archive with a member compressed more than this ratio (zip bomb guard).", ge=2.0, le=1e6
    )
    demucs_repo: str | None = param(
        None,
        "Folder holding the htdemucs weights as a demucs repo (htdemucs.yaml + 955717e8-8726e21a.th). "
        "Default: $MGFT_DEMUCS_REPO, else the torch hub cache.",
    )
    essentia_models: str | None = param(
        None,
        "Folder holding essentia's discogs-effnet, genre_discogs400, mtg_jamendo_moodtheme and "
        "mtg_jamendo_instrument .pb/.json files. Default: $MGFT_ESSENTIA_MODELS, else ~/.cache/musicgen-ft/essentia.",
    )
    device: str = param("auto", "Where vocal removal runs: auto picks the GPU when there is one.", choices=DEVICES)


def validate(params: PrepareParams) -> None:
    """Checks that need more than one field or a look at the disk; raised before any long work."""
    if not params.dataset_path or not str(params.dataset_path).strip():
        raise InputError("dataset_path", "no training data given; pass a zip/tar/gz archive or an audio file")
    if is_url(str(params.dataset_path)):
        raise InputError("dataset_path", url_message(str(params.dataset_path)))
    if params.min_clip_seconds > params.chunk_seconds:
        raise InputError(
            "min_clip_seconds",
            f"{params.min_clip_seconds} s is longer than chunk_seconds ({params.chunk_seconds} s); "
            "choose a value up to chunk_seconds",
        )


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    return bool(_URL.match(text.strip()))


def url_message(text: str) -> str:
    return (
        f"{text} is a URL; a local run reads files only. URLs work as Cog inputs (`cog train -i "
        f"dataset_path=<url>` or the Replicate API download it for you); here, download it first (e.g. "
        f"`curl -L -o data.zip '{text}'`) and pass the file"
    )
