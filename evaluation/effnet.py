"""Embeddings in essentia's discogs-effnet space, for a second Fréchet distance next to EnCodec's (when the model
file is present: `discogs-effnet-bs64-1.pb` in `$MGFT_ESSENTIA_MODELS`, else `$MGFT_CACHE/essentia`, the folder
auto-labeling reads; only the embedding graph is needed, not the tag heads).

essentia-tensorflow stays in its own process, as for auto-labeling: the embeddings are computed by
`preprocessing/essentia_worker.py` (one `embed` request per file, `[patches, 1280]` saved as .npy), started and
read through `preprocessing.analysis.Analyzer`. One 128-frame patch (~2 s at 16 kHz) every 62 frames (~1 s), the
model's own framing; a sample shorter than a patch is repeated to fill one.
"""

from __future__ import annotations

import tempfile
import typing as tp
from pathlib import Path

import numpy as np

from core.audio import save_audio
from evaluation.frechet import embedding_frechet
from preprocessing import analysis

__all__ = ["effnet_graph", "effnet_embeddings", "effnet_frechet"]


def effnet_graph() -> tuple[Path | None, str | None]:
    """The discogs-effnet graph file, or None and why it is not used (what to do to get it)."""
    folder = analysis.resolve_models(None).folder
    graph = folder / analysis.EMBEDDINGS["pb"]
    if graph.is_file():
        return graph, None
    return None, (
        f"{analysis.EMBEDDINGS['pb']} is not in {folder}; download it from {analysis.EMBEDDINGS['url']} into that "
        f"folder, or point ${analysis.ENV_MODELS} at a folder holding it"
    )


def effnet_embeddings(files: tp.Sequence[Path], graph: Path, scratch: Path) -> list[np.ndarray]:
    """`[patches, 1280]` float32 embeddings of each audio file, in the essentia worker; RuntimeError naming the
    worker's error when it cannot give them."""
    config = {
        "embeddings": {
            "pb": str(graph),
            "input": analysis.EMBEDDINGS["input"],
            "output": analysis.EMBEDDINGS["output"],
            "last_patch": "repeat",
        },
        "heads": {},
    }
    worker = analysis.Analyzer(scratch, config)
    outs = [scratch / f"embedding_{i}.npy" for i in range(len(files))]
    for i, (file, out) in enumerate(zip(files, outs, strict=True)):
        worker.submit(str(i), [Path(file)], tags=False, embed=out)
    results, status, warnings = worker.collect()
    if (status.get("errors") or {}).get("embeddings"):
        raise RuntimeError(f"discogs-effnet did not load: {status['errors']['embeddings']}")
    missing = [str(files[i]) for i in range(len(files)) if str(i) not in results]
    if missing:
        raise RuntimeError(f"no embeddings for {', '.join(missing)}: {'; '.join(warnings) or 'see the log'}")
    return [np.load(out).reshape(-1, 1280) for out in outs]


def effnet_frechet(
    generated: dict[str, tp.Sequence[tp.Any]], rate: int, reference_files: tp.Sequence[Path]
) -> dict[str, tp.Any]:
    """Fréchet distance in discogs-effnet space from each set of `generated` samples (`[C, T]` tensors at `rate`)
    to the `reference_files` (the held-out clips): `{"frechet_<set>": d, ...}`, or `{"skipped": why}`."""
    graph, reason = effnet_graph()
    if graph is None:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="effnet-") as tmp:
        scratch = Path(tmp)
        files = [Path(f) for f in reference_files]
        sets = []
        for name, wavs in generated.items():
            for i, wav in enumerate(wavs):
                path = scratch / f"{name}_{i}.wav"
                save_audio(path, wav.float().cpu(), rate, "wav")
                files.append(path)
            sets.append((name, len(wavs)))
        try:
            embeddings = effnet_embeddings(files, graph, scratch / "worker")
        except RuntimeError as e:
            return {"skipped": str(e)}
    held = np.concatenate(embeddings[: len(reference_files)])
    out: dict[str, tp.Any] = {"embedding": "discogs-effnet (essentia), 1280-d, one per ~1 s patch"}
    out["vectors"] = {"held_out": len(held)}
    start = len(reference_files)
    for name, count in sets:
        mine = np.concatenate(embeddings[start : start + count])
        start += count
        out["vectors"][name] = len(mine)
        if len(mine) < 2 or len(held) < 2:
            return {"skipped": f"too few embeddings for a Fréchet distance ({len(mine)} and {len(held)} patches)"}
        out[f"frechet_{name}"] = embedding_frechet(mine, held)
    return out
