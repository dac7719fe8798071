"""CLAP metrics: does a sample follow its prompt, how close are the samples to the user's music, does one copy it.

CLAP (contrastive language-audio pretraining) maps audio and text into one space where a matching pair is close; the
MusicGen paper reports its text-audio similarity as the measure of text adherence. We use LAION's music CLAP,
`laion/larger_clap_music`, through transformers' `ClapModel` (no other framework), read from the Hugging Face cache
only: the image bakes it with the other weights (scripts/bake_weights.py, group `clap`). When it is not there,
`load_clap` returns None and `clap_skip_reason` says why and how to add it; the metrics are then skipped, never
downloaded in the middle of a run.

- `Clap.embed_audio(wavs, sample_rate)` `[N, D]`: each sample resampled to CLAP's 48 kHz and mixed to mono, cut
  into CLAP's 10 s windows (the last, shorter one kept when it is at least 1 s, or when it is the only one:
  the feature extractor repeats it to 10 s, as CLAP was trained), each window embedded, the mean of a sample's
  windows normalized again. No window is cropped at random: the same audio gives the same embedding.
- `Clap.embed_text(texts)` `[N, D]`, unit vectors too.
- `prompt_adherence`: the mean cosine similarity of each sample to its own prompt.
- `frechet`: the Fréchet distance of the two sets' Gaussians in CLAP's audio space (evaluation/frechet.py, as the
  EnCodec-latent one); it needs many samples, `kad` does not.
- `kad`: the Kernel Audio Distance (Chung et al. 2025, "KAD: No More FAD!"): the unbiased estimate of the squared
  maximum mean discrepancy with a Gaussian RBF kernel k(x, y) = exp(-|x - y|² / 2σ²), σ the median pairwise
  distance within the reference set (the second argument: the user's held-out clips, so that base and fine-tune
  are measured with one kernel), times 100 as the KAD toolkit reports it. Unbiased: two sets from one
  distribution measure 0 on average, small sets included (it may then be slightly negative).
- `copy_check`: each generated sample's nearest training clip by cosine similarity, flagged as a copy when its
  cosine distance (1 - similarity) is below `COPY_RATIO` x the median distance of a training clip to its own
  nearest other training clip (how close the user's clips, sections of the same tracks included, are to each
  other: new music in their style gets that close, a replay far closer). The same rule as the EnCodec copy check
  (evaluation/embed.py).
"""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import numpy as np
import torch

from core.audio import convert_channels, resample
from core.hub import download_command, hf_cache_hint, hub_cached, hub_offline, missing_from_cache
from evaluation.frechet import embedding_frechet

logger = logging.getLogger(__name__)

__all__ = [
    "CLAP_REPO",
    "CLAP_FILES",
    "CLAP_WEIGHTS",
    "COPY_RATIO",
    "KAD_SCALE",
    "Clap",
    "ClapLoadError",
    "clap_skip_reason",
    "load_clap",
    "prompt_similarities",
    "prompt_adherence",
    "frechet",
    "kad",
    "copy_check",
]

CLAP_REPO = "laion/larger_clap_music"
# What loading needs from the repo: its configs and tokenizer files, and the weights in one of two formats.
CLAP_FILES = ("config.json",)
CLAP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CLAP_DOWNLOAD = ("--include", '"*.json"', "--include", '"*.txt"', "--include", "pytorch_model.bin")
MIN_WINDOW_S = 1.0  # a last window shorter than this adds nothing a listener would hear as the sample
BATCH = 8  # 10 s windows per forward pass
COPY_RATIO = 0.5
KAD_SCALE = 100.0


class ClapLoadError(RuntimeError):
    """CLAP's files are there but do not load (a partial download, a wrong folder); the message says which."""


class Clap:
    """A loaded CLAP: `model` (transformers' ClapModel, eval mode, on `device`) and its `processor`."""

    def __init__(self, model: tp.Any, processor: tp.Any, device: str, source: str):
        self.model, self.processor, self.device, self.source = model, processor, device, source
        extractor = processor.feature_extractor
        self.sample_rate = int(extractor.sampling_rate)
        self.window = int(extractor.nb_max_samples)  # samples per window at `sample_rate`

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _windows(self, wav: torch.Tensor, sample_rate: int) -> list[np.ndarray]:
        if not isinstance(wav, torch.Tensor) or wav.dim() != 2 or wav.shape[-1] == 0:
            raise ValueError(f"expected a waveform [C, T] with samples, got {getattr(wav, 'shape', type(wav))}")
        wav = wav.detach().float().cpu()
        if not torch.isfinite(wav).all():
            raise ValueError("a waveform holds NaN or infinite values: it is not audio")
        mono = convert_channels(resample(wav, sample_rate, self.sample_rate), 1)[0]
        pieces = [mono[i : i + self.window] for i in range(0, len(mono), self.window)]
        if len(pieces) > 1 and len(pieces[-1]) < MIN_WINDOW_S * self.sample_rate:
            pieces.pop()
        return [p.numpy() for p in pieces]

    @torch.no_grad()
    def embed_audio(self, wavs: tp.Sequence[torch.Tensor], sample_rate: int) -> torch.Tensor:
        """`[N, D]` unit-norm CLAP audio embeddings of `wavs` (each `[C, T]` at `sample_rate`), float32 on the CPU."""
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        windows, owner = [], []
        for i, wav in enumerate(wavs):
            pieces = self._windows(wav, sample_rate)
            windows += pieces
            owner += [i] * len(pieces)
        if not windows:
            return torch.zeros(0, self.dim)
        embedded = []
        for start in range(0, len(windows), BATCH):
            inputs = self.processor.feature_extractor(
                windows[start : start + BATCH], sampling_rate=self.sample_rate, return_tensors="pt"
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            embedded.append(self.model.get_audio_features(**inputs).pooler_output.float().cpu())
        per_window = torch.cat(embedded)  # [windows, D]
        index = torch.tensor(owner)
        summed = torch.zeros(len(wavs), per_window.shape[1]).index_add_(0, index, per_window)
        return torch.nn.functional.normalize(summed, dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: tp.Sequence[str]) -> torch.Tensor:
        """`[N, D]` unit-norm CLAP text embeddings, float32 on the CPU."""
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.dim)
        tokenizer = self.processor.tokenizer
        # the text encoder's positions end before the tokenizer's own limit on small models (RoBERTa's offset of 2)
        limit = min(int(tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings) - 2)
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.model.get_text_features(**inputs).pooler_output.float().cpu()


def _is_folder(repo_or_folder: str | Path) -> bool:
    return Path(repo_or_folder).expanduser().is_dir()


def clap_skip_reason(repo_or_folder: str | Path = CLAP_REPO) -> str | None:
    """Why CLAP cannot be loaded from the disk (the folder or the Hugging Face cache), and how to add it; None
    when its files are there. Reads the disk only: no request."""
    if _is_folder(repo_or_folder):
        folder = Path(repo_or_folder).expanduser()
        if not (folder / "config.json").is_file() or not any((folder / w).is_file() for w in CLAP_WEIGHTS):
            return f"{folder} holds no CLAP model (config.json and {' or '.join(CLAP_WEIGHTS)} are needed)"
        return None
    repo = str(repo_or_folder)
    missing = missing_from_cache(repo, CLAP_FILES)
    if not any(hub_cached(repo, (w,)) for w in CLAP_WEIGHTS):
        missing.append(" or ".join(CLAP_WEIGHTS))
    if not missing:
        return None
    return (
        f"{repo} is not in the Hugging Face cache ({hf_cache_hint()}; missing {', '.join(missing)}). The Cog image "
        f"bakes it (cog.yaml's bake step, group clap of scripts/bake_weights.py); elsewhere add it with "
        f"`{download_command(repo, CLAP_DOWNLOAD)}`"
    )


def load_clap(device: str, repo_or_folder: str | Path = CLAP_REPO) -> Clap | None:
    """CLAP on `device` from a local folder or the Hugging Face cache (read offline), or None when its files are
    not there (the reason is logged; `clap_skip_reason` gives it). A ClapLoadError when they are there but do
    not load."""
    reason = clap_skip_reason(repo_or_folder)
    if reason is not None:
        logger.info("CLAP metrics skipped: %s", reason)
        return None
    from transformers import ClapModel, ClapProcessor

    source = str(Path(repo_or_folder).expanduser()) if _is_folder(repo_or_folder) else str(repo_or_folder)
    try:
        with hub_offline():
            model = ClapModel.from_pretrained(source).to(device).float().eval()
            processor = ClapProcessor.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types for a bad file
        raise ClapLoadError(
            f"CLAP ({source}) is there but does not load ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            f"delete it and add it again: `{download_command(CLAP_REPO, CLAP_DOWNLOAD)}`"
        ) from None
    return Clap(model, processor, device, source)


def _matrix(x: tp.Any, name: str) -> np.ndarray:
    """`x` `[N, D]` as float64 numpy; a ValueError for another shape, or NaN/inf."""
    x = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected embeddings [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: the embeddings hold NaN or infinite values")
    return x


def prompt_similarities(
    clap: Clap, wavs: tp.Sequence[torch.Tensor], sample_rate: int, prompts: tp.Sequence[str]
) -> list[float]:
    """Each sample's cosine similarity to its own prompt in CLAP's space (-1..1; higher: follows it better)."""
    if len(wavs) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per sample: {len(wavs)} samples, {len(prompts)} prompts")
    audio, text = clap.embed_audio(wavs, sample_rate), clap.embed_text(prompts)
    return [float(v) for v in (audio * text).sum(dim=-1)]


def prompt_adherence(clap: Clap, wavs: tp.Sequence[torch.Tensor], sample_rate: int, prompts: tp.Sequence[str]) -> float:
    """The mean CLAP cosine similarity of each sample to its own prompt (the MusicGen paper's text adherence)."""
    return float(np.mean(prompt_similarities(clap, wavs, sample_rate, prompts)))


def frechet(a: tp.Any, b: tp.Any) -> float:
    """Fréchet distance between the Gaussians of embeddings `a` `[N, D]` and `b` `[M, D]` (N, M >= 2)."""
    return embedding_frechet(_matrix(a, "a"), _matrix(b, "b"))


def _median_pairwise(x: np.ndarray) -> float:
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
    return float(np.median(d[np.triu_indices(len(x), k=1)]))


def kad(a: tp.Any, b: tp.Any, bandwidth: float | None = None) -> float:
    """Kernel Audio Distance between embeddings `a` `[N, D]` (e.g. generated) and `b` `[M, D]` (the reference):
    100 x the unbiased MMD² with a Gaussian RBF kernel of `bandwidth` σ (default: the median pairwise distance
    within `b`). N, M >= 2."""
    x, y = _matrix(a, "a"), _matrix(b, "b")
    if len(x) < 2 or len(y) < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need at least 2 vectors of one dimension in each set, got {x.shape} and {y.shape}")
    sigma = _median_pairwise(y) if bandwidth is None else float(bandwidth)
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"the kernel bandwidth must be > 0, got {sigma} (are the reference vectors all equal?)")
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(p: np.ndarray, q: np.ndarray, same: bool) -> float:
        d2 = np.maximum((p * p).sum(1)[:, None] + (q * q).sum(1)[None, :] - 2.0 * p @ q.T, 0.0)
        k = np.exp(-gamma * d2)
        if same:  # unbiased: the diagonal (each vector with itself) left out
            return float((k.sum() - np.trace(k)) / (len(p) * (len(p) - 1)))
        return float(k.mean())

    mmd2 = mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2.0 * mean_kernel(x, y, False)
    return KAD_SCALE * mmd2


def _embeddings(clap: Clap | None, items: tp.Any, sample_rate: int | None, name: str) -> torch.Tensor:
    """`items` as `[N, D]` embeddings: given as such, or embedded as waveforms `[C, T]` at `sample_rate`."""
    if isinstance(items, torch.Tensor | np.ndarray):
        return torch.from_numpy(_matrix(items, name)).float()
    if clap is None or sample_rate is None:
        raise ValueError(f"{name}: waveforms need a loaded CLAP and their sample_rate")
    return clap.embed_audio(list(items), sample_rate)


def copy_check(
    clap: Clap | None,
    generated: tp.Any,
    train_clips: tp.Any,
    sample_rate: int | None = None,
    names: tp.Sequence[str] | None = None,
    ratio: float = COPY_RATIO,
) -> dict[str, tp.Any]:
    """For each generated sample: its nearest training clip in CLAP's audio space (`names[i]`, else its index),
    their cosine similarity, and `copy` when their cosine distance is below `ratio` x `reference` (the median
    distance of a training clip to its nearest other one; None with a single clip: then nothing is flagged).

    `generated` and `train_clips` are CLAP embeddings `[N, D]`, or waveforms `[C, T]` at `sample_rate`."""
    gen = _embeddings(clap, generated, sample_rate, "generated")
    train = _embeddings(clap, train_clips, sample_rate, "train_clips")
    if len(train) == 0:
        raise ValueError("no training clips to compare with")
    gen, train = torch.nn.functional.normalize(gen, dim=-1), torch.nn.functional.normalize(train, dim=-1)
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(len(train))]
    if len(names) != len(train):
        raise ValueError(f"{len(names)} names for {len(train)} training clips")
    reference = None
    if len(train) >= 2:
        among = train @ train.T
        among.fill_diagonal_(-2.0)  # a clip is not its own neighbour
        reference = float(np.median(1.0 - among.max(dim=1).values.numpy()))
    samples = []
    for similarity in gen @ train.T:
        best = int(similarity.argmax())
        value = float(similarity[best])
        flagged = reference is not None and (1.0 - value) < ratio * reference
        samples.append({"nearest": names[best], "similarity": value, "copy": bool(flagged)})
    return {"reference": reference, "ratio": ratio, "samples": samples, "copies": sum(s["copy"] for s in samples)}
