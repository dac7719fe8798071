#!/usr/bin/env python
"""Download, at image build time, every file a booted container would otherwise fetch: each verified by checksum,
retried a bounded number of times with backoff, and moved into place atomically.

Run by cog.yaml's build `run:` steps. Cog writes those steps into its Dockerfile before `COPY . /src`, so no file of
this repository is readable there; the step therefore carries this whole file in its own text, compressed
(`python3 -c "import base64,zlib;exec(...)"`), written by `python3 scripts/bake_weights.py --write-cog-yaml cog.yaml`.
Any edit here changes that text, so Docker rebuilds the layer (it reuses a layer while its command text is
unchanged), and no build flag is needed (`cog run`, `cog exec`, `cog serve`, `cog train` take no `--secret`).
tests/test_build_steps.py fails while cog.yaml carries an older copy. It therefore uses only the standard library
and huggingface_hub (installed from requirements.txt), nothing of this repository.

Where it downloads from: the Hugging Face files from `HF_ENDPOINT` (huggingface_hub's own variable; default
https://huggingface.co); the others from their publishers, or, when `MGFT_BAKE_MIRROR` is set, from that base URL
followed by the original host and path (`$MGFT_BAKE_MIRROR/essentia.upf.edu/models/...`,
`$MGFT_BAKE_MIRROR/dl.fbaipublicfiles.com/demucs/...`): a mirror, or the loopback fake of the tests. The checksums
are the same either way. In a Cog build, set either in cog.yaml's top-level `environment:` (written as `ENV` before
the `run:` steps).

What it bakes (`--only` picks groups):

- `t5`: `t5-base`, the text encoder audiocraft's T5Conditioner loads for the facebook/musicgen-* models
  (config, tokenizer, `model.safetensors`), into the Hugging Face cache;
- `encodec`: `facebook/encodec_32khz`, the EnCodec a trained_model.tar references, into the Hugging Face cache;
- `clap`: `laion/larger_clap_music`, the CLAP model of the report's and `python -m evaluation`'s prompt adherence and
  audio distances (evaluation/clap.py), into the Hugging Face cache (configs, tokenizer and one weights file:
  `model.safetensors` when the repo has it, else `pytorch_model.bin`);
- `htdemucs`: demucs' `955717e8-8726e21a.th` into the torch hub cache (vocal removal, melody chroma);
- `essentia`: the auto-labeling models (discogs-effnet embeddings, genre / mood / instrument heads) into
  `$MGFT_ESSENTIA_MODELS`, else `$MGFT_CACHE/essentia`, else `~/.cache/musicgen-ft/essentia`.

How each file is verified:

- Hugging Face files: against the hub's own metadata, read at build time for the resolved commit
  (`HfApi.model_info(files_metadata=True)`): the LFS sha256 for large files, the git blob sha1 for small ones.
  Fixed hashes cannot be known offline for a moving `main`; the commit baked is printed and written to the cache's
  `refs/main`, so a build is reproducible by passing `--t5-revision` / `--encodec-revision` / `--clap-revision`.
- htdemucs: the full sha256 recorded below (its file name carries the first 8 hex digits, as torch.hub names it).
- essentia: the sha256 recorded below where a published value was found (the effnet embeddings and the instrument
  head), the byte size where only that was found (genre head); the mood head has no recorded value: it is
  downloaded, its sha256 printed so it can be pinned here, and `--strict` refuses it instead.

A file already in place with the right checksum is not downloaded again. A wrong checksum is retried (the partial
file deleted each time) and then fails naming the URL, the expected and the received hash.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import sys
import time
import typing as tp
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("bake_weights")

# Named in messages: inside the image this file runs from cog.yaml's text, where it has no `__file__`.
SCRIPT = "scripts/bake_weights.py"
MIRROR_ENV = "MGFT_BAKE_MIRROR"

ATTEMPTS = 4
BACKOFF = 2.0  # seconds before the 2nd attempt, doubling after each failure (2, 4, 8: bounded)
TIMEOUT = 60.0
CHUNK = 1 << 20

ESSENTIA_BASE = "https://essentia.upf.edu/models"
HTDEMUCS_URL = "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th"
HTDEMUCS_SHA256 = "8726e21a993978c7ba086d3872e7608d7d5bfca646ca4aca459ffda844faa8b4"
HTDEMUCS_SIZE = 84141911

# (remote path under ESSENTIA_BASE, sha256 or None, size in bytes or None); the file lands under its base name.
ESSENTIA_FILES: tuple[tuple[str, str | None, int | None], ...] = (
    (
        "feature-extractors/discogs-effnet/discogs-effnet-bs64-1.pb",
        "3ed9af50d5367c0b9c795b294b00e7599e4943244f4cbd376869f3bfc87721b1",
        18366619,
    ),
    ("classification-heads/genre_discogs400/genre_discogs400-discogs-effnet-1.pb", None, 2057977),
    ("classification-heads/genre_discogs400/genre_discogs400-discogs-effnet-1.json", None, 14951),
    ("classification-heads/mtg_jamendo_moodtheme/mtg_jamendo_moodtheme-discogs-effnet-1.pb", None, None),
    ("classification-heads/mtg_jamendo_moodtheme/mtg_jamendo_moodtheme-discogs-effnet-1.json", None, None),
    (
        "classification-heads/mtg_jamendo_instrument/mtg_jamendo_instrument-discogs-effnet-1.pb",
        "2e8c3003c722e098da371b6a1f7ad0ce62fac0dcfc09c7c7997d430941196c2a",
        2706836,
    ),
    ("classification-heads/mtg_jamendo_instrument/mtg_jamendo_instrument-discogs-effnet-1.json", None, 3382),
)

# Hugging Face repos and the files loading them needs (those the repo has; `required` must be there).
HF_REPOS: dict[str, dict[str, tp.Any]] = {
    "t5": {
        "repo": "t5-base",
        "files": (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "spiece.model",
            "special_tokens_map.json",
            "model.safetensors",
        ),  # fmt: skip
        "required": ("config.json", "model.safetensors"),
    },
    "encodec": {
        "repo": "facebook/encodec_32khz",
        "files": ("config.json", "preprocessor_config.json", "model.safetensors"),
        "required": ("config.json", "model.safetensors"),
    },
    "clap": {
        "repo": "laion/larger_clap_music",
        "files": (
            "config.json",
            "preprocessor_config.json",
            "processor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
        ),  # fmt: skip
        "required": ("config.json",),
        # the weights: the first of these the repo has (both are the same weights; transformers reads either)
        "one_of": ("model.safetensors", "pytorch_model.bin"),
    },
}
GROUPS = ("t5", "encodec", "clap", "htdemucs", "essentia")
# huggingface_hub errors that another try cannot fix (a wrong id, offline mode set in the build environment).
FINAL_HUB_ERRORS = ("OfflineModeIsEnabled", "RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError")


class BakeError(RuntimeError):
    """A file could not be baked; the message names its URL and why."""


class ChecksumError(ValueError):
    pass


@dataclass(frozen=True)
class Asset:
    """One file to bake: `url` into `dest`, verified by `sha256` (hex), or `git_sha1` (the hub's blob id of a
    small non-LFS file: sha1 of `blob <size>\\0<bytes>`), and/or `size`. None of them: unpinned (see `--strict`)."""

    url: str
    dest: Path
    sha256: str | None = None
    git_sha1: str | None = None
    size: int | None = None

    @property
    def pinned(self) -> bool:
        return bool(self.sha256 or self.git_sha1)


def _digests(path: Path) -> tuple[str, str, int]:
    """(sha256, git blob sha1, size) of a file, in one pass for the sha256 and a second (small files) for git's."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode())  # noqa: S324 - git's object id, not a security hash
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest(), size


def verify(asset: Asset, path: Path) -> str:
    """Raise ChecksumError unless `path` matches `asset`'s checksums; returns the file's sha256."""
    sha256, blob, size = _digests(path)
    if asset.size is not None and size != asset.size:
        raise ChecksumError(f"size {size} bytes, expected {asset.size}")
    if asset.sha256 and sha256 != asset.sha256:
        raise ChecksumError(f"sha256 {sha256}, expected {asset.sha256}")
    if asset.git_sha1 and blob != asset.git_sha1:
        raise ChecksumError(f"git blob sha1 {blob}, expected {asset.git_sha1}")
    return sha256


def _retryable(error: Exception) -> bool:
    """Client errors (404, 403...) will not change on retry; timeouts, 429, 5xx, resets and checksums may."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    return True


def download(
    asset: Asset,
    *,
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF,
    timeout: float = TIMEOUT,
    strict: bool = False,
    sleep: tp.Callable[[float], None] = time.sleep,
) -> Path:
    """Download `asset` to its `dest`, verified, retried up to `attempts` times (waiting `backoff`, then twice as
    long each time), and moved into place atomically: `dest` appears complete and verified or not at all.

    An existing `dest` that verifies is kept (no request). Raises BakeError naming the URL.
    """
    if strict and not asset.pinned:
        raise BakeError(f"{asset.url}: no sha256 is recorded for it and --strict is set; pin it in {SCRIPT}")
    dest = asset.dest
    if dest.is_file():
        try:
            verify(asset, dest)
            if asset.pinned or asset.size is not None:
                logger.info("%s: already in place and verified", dest)
                return dest
        except ChecksumError as e:
            logger.warning("%s is there but does not verify (%s): downloading it again", dest, e)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(asset.url, headers={"User-Agent": "musicgen-ft-bake/1"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
            sha256 = verify(asset, tmp)
            os.replace(tmp, dest)  # same folder: atomic
            if not asset.pinned:
                logger.warning("%s: no checksum recorded; got sha256 %s (pin it in %s)", asset.url, sha256, SCRIPT)
            logger.info("Baked %s (%.1f MB, sha256 %s)", dest, dest.stat().st_size / 1e6, sha256[:16])
            return dest
        except (OSError, ChecksumError) as e:  # URLError and HTTPError are OSErrors
            last = e
            tmp.unlink(missing_ok=True)
            if attempt == attempts or not _retryable(e):
                break
            wait = backoff * 2 ** (attempt - 1)
            logger.warning("%s: attempt %d/%d failed (%s); retrying in %.0f s", asset.url, attempt, attempts, e, wait)
            sleep(wait)
    raise BakeError(f"Could not bake {asset.url} into {dest}: {last} (after {attempt} attempt(s))")


# ------------------------------------------------------------------------------------------------ destinations


def hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (and so demucs) looks: `$TORCH_HOME/hub/checkpoints`, as `torch.hub.get_dir()` computes."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def essentia_dir() -> Path:
    if os.environ.get("MGFT_ESSENTIA_MODELS"):
        return Path(os.environ["MGFT_ESSENTIA_MODELS"]).expanduser()
    cache = os.environ.get("MGFT_CACHE") or str(Path.home() / ".cache" / "musicgen-ft")
    return Path(cache).expanduser() / "essentia"


def mirrored(url: str) -> str:
    """`url`, or its copy under `$MGFT_BAKE_MIRROR` (`<mirror>/<host>/<path>`) when that is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip().rstrip("/")
    return f"{mirror}/{url.split('://', 1)[1]}" if mirror else url


def htdemucs_assets() -> list[Asset]:
    dest = torch_hub_checkpoints() / HTDEMUCS_URL.rsplit("/", 1)[1]
    return [Asset(mirrored(HTDEMUCS_URL), dest, sha256=HTDEMUCS_SHA256, size=HTDEMUCS_SIZE)]


def essentia_assets() -> list[Asset]:
    folder = essentia_dir()
    return [
        Asset(mirrored(f"{ESSENTIA_BASE}/{path}"), folder / path.rsplit("/", 1)[1], sha256=sha256, size=size)
        for path, sha256, size in ESSENTIA_FILES
    ]


# ------------------------------------------------------------------------------------------------ Hugging Face


def _with_retries(what: str, call: tp.Callable[[], tp.Any], attempts: int, backoff: float, sleep) -> tp.Any:
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - hub client errors vary; the last one is reported
            if attempt == attempts or type(e).__name__ in FINAL_HUB_ERRORS:
                raise BakeError(f"{what}: {type(e).__name__}: {e} (after {attempt} attempt(s))") from None
            wait = backoff * 2 ** (attempt - 1)
            logger.warning("%s: attempt %d/%d failed (%s); retrying in %.0f s", what, attempt, attempts, e, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def bake_hf(
    repo: str,
    files: tp.Sequence[str],
    *,
    required: tp.Sequence[str] = (),
    one_of: tp.Sequence[str] = (),
    revision: str = "main",
    cache: Path | None = None,
    endpoint: str | None = None,
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF,
    sleep: tp.Callable[[float], None] = time.sleep,
) -> Path:
    """Bake `files` of model repo `repo` at `revision` into huggingface_hub's cache layout (`blobs/<etag>`,
    `snapshots/<commit>/<file>` links, `refs/<revision>`), each verified against the hub's metadata for that
    commit, and the first of `one_of` that the repo has (a BakeError when it has none). Returns the snapshot folder.
    Offline loaders (`HF_HUB_OFFLINE=1`) then find them."""
    from huggingface_hub import HfApi

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    cache = cache or hf_cache()
    api = HfApi(endpoint=endpoint)
    info = _with_retries(
        f"{endpoint}/api/models/{repo} (revision {revision})",
        lambda: api.model_info(repo, revision=revision, files_metadata=True, timeout=TIMEOUT),
        attempts,
        backoff,
        sleep,
    )
    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    missing = [f for f in required if f not in siblings]
    if missing:
        raise BakeError(f"{repo}@{commit}: the repo lacks {', '.join(missing)} (it has {', '.join(sorted(siblings))})")
    if one_of:
        chosen = next((f for f in one_of if f in siblings), None)
        if chosen is None:
            raise BakeError(f"{repo}@{commit}: the repo has none of {', '.join(one_of)} "
                            f"(it has {', '.join(sorted(siblings))})")  # fmt: skip
        files = [*files, chosen]
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    for name in (f for f in files if f in siblings):
        sibling = siblings[name]
        lfs = getattr(sibling, "lfs", None)
        sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
        git_sha1 = None if sha256 else getattr(sibling, "blob_id", None)
        if not (sha256 or git_sha1):
            raise BakeError(f"{repo}@{commit}: the hub gave no checksum for {name}; cannot verify it")
        etag = sha256 or git_sha1
        asset = Asset(f"{endpoint}/{repo}/resolve/{commit}/{name}", root / "blobs" / etag, sha256, git_sha1,
                      getattr(sibling, "size", None))  # fmt: skip
        download(asset, attempts=attempts, backoff=backoff, sleep=sleep)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(asset.dest, link.parent))  # as huggingface_hub links them
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    logger.info("Baked %s at commit %s into %s", repo, commit, snapshot)
    return snapshot


# ------------------------------------------------------------------------------------------------ cog.yaml's step

# The bake step's program: this file, zlib-compressed and base64-encoded (an alphabet the shell, YAML and the
# Dockerfile pass through unchanged), compiled under its own name so that a traceback names it. Cog refuses a
# `run` command with a newline, so a heredoc is not possible; BuildKit refuses a Dockerfile line over 64 KiB.
_LOADER = "import base64,zlib;exec(compile(zlib.decompress(base64.b64decode('{}')),'bake_weights.py','exec'))"
_STEP = re.compile(
    r"""^python3 -c "import base64,zlib;exec\(compile\(zlib\.decompress\(base64\.b64decode\('([A-Za-z0-9+/=]*)'\)\),"""
    r"""'bake_weights\.py','exec'\)\)"(.*)$"""
)
MAX_DOCKERFILE_LINE = 65535 - 1  # BuildKit's parser reads lines with bufio.Scanner's default limit


def cog_command(source: bytes, args: str = "") -> str:
    """cog.yaml's bake step running `source` (this file's bytes) with `args` (its command line)."""
    payload = base64.b64encode(zlib.compress(source, 9)).decode("ascii")
    return f'python3 -c "{_LOADER.format(payload)}"' + (f" {args.strip()}" if args.strip() else "")


def parse_cog_command(command: str) -> tuple[bytes, str] | None:
    """(the program, its arguments) of a bake step `cog_command` wrote, or None for any other command."""
    match = _STEP.match(command.strip())
    if not match:
        return None
    return zlib.decompress(base64.b64decode(match.group(1), validate=True)), match.group(2).strip()


def write_cog_yaml(path: Path, source: bytes) -> bool:
    """Rewrite the bake step of cog.yaml at `path` to carry `source`, keeping its arguments and every other line;
    written to a temporary name, then renamed. Returns whether the file changed."""
    lines = path.read_text().splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if parse_cog_command(line.strip().removeprefix("- ").strip())]
    if len(found) != 1:
        raise BakeError(f"{path}: expected one build.run step of the form {cog_command(b'', '')[:60]}..., "
                        f"found {len(found)}")  # fmt: skip
    (i,) = found
    indent, rest = lines[i].split("- ", 1)
    program, args = parse_cog_command(rest.strip())
    if program == source:  # compared decoded: another zlib build may compress the same bytes differently
        return False
    command = cog_command(source, args)
    if len(f"RUN {command}") > MAX_DOCKERFILE_LINE:
        raise BakeError(f"the bake step would be {len(command)} characters, over BuildKit's {MAX_DOCKERFILE_LINE}")
    lines[i] = f"{indent}- {command}\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return True


# ------------------------------------------------------------------------------------------------ entry point


def bake(
    groups: tp.Sequence[str] = GROUPS,
    *,
    revisions: dict[str, str] | None = None,
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF,
    strict: bool = False,
) -> dict[str, tp.Any]:
    """Bake `groups`; returns what landed where (printed as JSON by the CLI)."""
    done: dict[str, tp.Any] = {}
    for group in groups:
        if group in HF_REPOS:
            spec = HF_REPOS[group]
            revision = (revisions or {}).get(group, "main")
            snapshot = bake_hf(spec["repo"], spec["files"], required=spec["required"], one_of=spec.get("one_of", ()),
                               revision=revision, attempts=attempts, backoff=backoff)  # fmt: skip
            done[group] = str(snapshot)
        elif group in ("htdemucs", "essentia"):
            assets = htdemucs_assets() if group == "htdemucs" else essentia_assets()
            done[group] = [str(download(a, attempts=attempts, backoff=backoff, strict=strict)) for a in assets]
        else:
            raise BakeError(f"unknown group {group!r}: choose from {', '.join(GROUPS)}")
    return done


def main(argv: tp.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bake_weights.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups ({', '.join(GROUPS)})")
    parser.add_argument("--attempts", type=int, default=ATTEMPTS, help="tries per file (bounded; default %(default)s)")
    parser.add_argument("--backoff", type=float, default=BACKOFF, help="seconds before the first retry, doubling")
    parser.add_argument("--strict", action="store_true", help="refuse files with no recorded checksum")
    parser.add_argument("--t5-revision", default="main", help="t5-base revision (a commit for reproducible builds)")
    parser.add_argument("--encodec-revision", default="main", help="facebook/encodec_32khz revision")
    parser.add_argument("--clap-revision", default="main", help="laion/larger_clap_music revision")
    parser.add_argument(
        "--write-cog-yaml",
        metavar="PATH",
        help="bake nothing: write this file into the bake step of the cog.yaml at PATH (after editing this file)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.write_cog_yaml:
        if "__file__" not in globals():
            parser.error("--write-cog-yaml: run it from a checkout (python3 scripts/bake_weights.py ...)")
        try:
            changed = write_cog_yaml(Path(args.write_cog_yaml), Path(__file__).read_bytes())
        except (OSError, BakeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.write_cog_yaml}: {'bake step updated' if changed else 'already up to date'}")
        return 0
    if os.environ.get(MIRROR_ENV, "").strip():
        logger.info("%s is set: the files not on the Hugging Face hub come from %s", MIRROR_ENV, mirrored("https://"))
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if args.attempts < 1:
        parser.error("--attempts must be at least 1")
    try:
        revisions = {"t5": args.t5_revision, "encodec": args.encodec_revision, "clap": args.clap_revision}
        done = bake(groups, revisions=revisions, attempts=args.attempts, backoff=args.backoff, strict=args.strict)
    except BakeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(done, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
