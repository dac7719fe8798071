"""Key, bpm and tags with essentia, in a process of its own.

essentia-tensorflow bundles its own TensorFlow; it must never share a process with the `tensorflow` package, and
keeping it away from torch too means a crash in it cannot take the preparation down. So this file imports nothing
from the project (it is started as a script, not through the `preprocessing` package) and talks through files:

    python essentia_worker.py CONFIG_JSON  < requests (one JSON per line: {"id", "clips": [wav paths], "tags"})

It appends one JSON line per track to `config["results"]` (first a `{"type": "status"}` line saying which tag
heads loaded), flushing after each so the parent can show progress. A request with `"embed": OUT.npy` asks for the
discogs-effnet embeddings of its clips instead (`[patches, 1280]` saved to OUT.npy; the audio check's Fréchet
distance, evaluation/effnet.py).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Below this many samples at 16 kHz, discogs-effnet has no full 128-frame patch to look at (~2.1 s).
MIN_TAG_SAMPLES = 16000 * 3


def _load_track(paths: list[str]):
    """Mono float32 of the track's clips, back to back, and the sample rate."""
    import numpy as np
    import soundfile as sf

    parts, sr = [], None
    for p in paths:
        data, rate = sf.read(p, dtype="float32", always_2d=True)
        if sr is None:
            sr = rate
        elif rate != sr:
            raise ValueError(f"clips of one track have different sample rates ({sr}, {rate})")
        parts.append(data.mean(axis=1))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32), int(sr)


class Tagger:
    """discogs-effnet embeddings -> one classification head per label family (genre, moods, instruments)."""

    def __init__(self, config: dict):
        import essentia.standard as es
        import numpy as np

        emb = config["embeddings"]
        self.embedder = es.TensorflowPredictEffnetDiscogs(
            graphFilename=emb["pb"],
            input=emb["input"],
            output=emb["output"],
            lastPatchMode=emb.get("last_patch", "discard"),  # "repeat": a short sample still gets an embedding
        )
        self.heads: dict[str, dict] = {}
        self.errors: dict[str, str] = {}
        probe = None
        for family, head in config["heads"].items():
            try:
                with open(head["json"], encoding="utf-8") as f:
                    classes = list(json.load(f)["classes"])
                model = es.TensorflowPredict2D(graphFilename=head["pb"], input=head["input"], output=head["output"])
                if probe is None:
                    rng = np.random.default_rng(0)
                    probe = self.embedder((0.1 * rng.standard_normal(16000 * 4)).astype(np.float32))
                out = np.asarray(model(probe))
                if out.ndim != 2 or out.shape[1] != len(classes):
                    raise ValueError(
                        f"{os.path.basename(head['pb'])} outputs {out.shape[-1]} values but "
                        f"{os.path.basename(head['json'])} lists {len(classes)} classes: the files do not match"
                    )
                self.heads[family] = {**head, "model": model, "classes": classes}
            except Exception as e:  # noqa: BLE001 - reported to the parent, which warns once
                self.errors[family] = f"{type(e).__name__}: {e}"

    def __call__(self, audio16k) -> dict:
        import numpy as np

        if len(audio16k) < MIN_TAG_SAMPLES or not self.heads:
            return {}
        embeddings = np.asarray(self.embedder(audio16k))
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            return {}
        out = {}
        for family, head in self.heads.items():
            scores = np.asarray(head["model"](embeddings)).mean(axis=0)
            order = np.argsort(-scores, kind="stable")
            picked = [(head["classes"][i], float(scores[i])) for i in order if scores[i] >= head["threshold"]]
            out[family] = [[label, round(score, 4)] for label, score in picked[: head["top"]]]
        return out


def embed(request: dict, tagger: Tagger | None) -> dict:
    import essentia.standard as es
    import numpy as np

    if tagger is None:
        raise RuntimeError("no discogs-effnet graph loaded (see the status line)")
    audio, sr = _load_track(request["clips"])
    audio16k = es.Resample(inputSampleRate=sr, outputSampleRate=16000, quality=1)(audio) if sr != 16000 else audio
    embeddings = np.asarray(tagger.embedder(audio16k), dtype=np.float32)
    np.save(request["embed"], embeddings.reshape(-1, embeddings.shape[-1]) if embeddings.size else embeddings)
    return {"type": "track", "id": request["id"], "embed": request["embed"], "patches": int(len(embeddings))}


# Chosen by measurement on pieces rendered from scores, whose key and tempo are known (`bench/key_tempo.py`; the
# numbers are those of the set it was not chosen on, 48 pieces): the `edma` key profile scores MIREX 0.979 on the
# 32 kHz clips where essentia's default `bgate` scores 0.950 (temperley 0.967, krumhansl 0.950, shaath 0.935), and
# no better at the source's 44.1 kHz (0.965), so the clips are analysed as they are. For tempo, Percival's
# estimator (Acc1 0.81, Acc2 1.00) is as right as RhythmExtractor2013 (0.83 / 1.00: one piece more) at a sixth of
# its cost (0.28 s per minute of audio against 1.66), and no better at the source's rate; its misses are octave
# errors on slow pieces, which Acc2 allows.
KEY_PROFILE = "edma"


def estimate_key(audio, sr: int) -> tuple[str | None, float]:
    """`("A minor", strength)` of mono float32 `audio`, or `(None, 0.0)` when essentia finds no key."""
    import essentia.standard as es

    key, scale, strength = es.KeyExtractor(sampleRate=sr, profileType=KEY_PROFILE)(audio)
    return (f"{key} {scale}" if key else None), float(strength)


def estimate_bpm(audio, sr: int) -> float | None:
    """The tempo of mono float32 `audio` in quarter notes per minute, or None when there is no pulse."""
    import essentia.standard as es

    bpm = float(es.PercivalBpmEstimator(sampleRate=sr)(audio))
    return bpm if bpm > 0 else None


def analyze(request: dict, tagger: Tagger | None) -> dict:
    import essentia.standard as es

    audio, sr = _load_track(request["clips"])
    result: dict = {"type": "track", "id": request["id"], "seconds": round(len(audio) / sr, 3)}
    key, strength = estimate_key(audio, sr)
    result["key"] = key
    result["key_strength"] = round(strength, 4)
    bpm = estimate_bpm(audio, sr)
    result["bpm"] = round(bpm, 1) if bpm else None
    if request.get("tags") and tagger is not None:
        audio16k = es.Resample(inputSampleRate=sr, outputSampleRate=16000, quality=1)(audio) if sr != 16000 else audio
        result["tags"] = tagger(audio16k)
    return result


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        config = json.load(f)
    import essentia

    essentia.log.infoActive = False
    essentia.log.warningActive = False
    with open(config["results"], "a", encoding="utf-8") as out:

        def emit(obj: dict) -> None:
            out.write(json.dumps(obj) + "\n")
            out.flush()

        tagger = None
        status: dict = {"type": "status", "heads": [], "errors": {}}
        if config.get("tagger"):
            try:
                tagger = Tagger(config["tagger"])
                status["heads"] = sorted(tagger.heads)
                status["errors"] = tagger.errors
            except Exception as e:  # noqa: BLE001
                status["errors"] = {"embeddings": f"{type(e).__name__}: {e}"}
        emit(status)
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            try:
                emit(embed(request, tagger) if request.get("embed") else analyze(request, tagger))
            except Exception as e:  # noqa: BLE001 - one bad track must not stop the others
                traceback.print_exc()
                emit({"type": "track", "id": request.get("id"), "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
