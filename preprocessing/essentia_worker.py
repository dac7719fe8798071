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
# no better at the source's 44.1 kHz (0.965), so the clips are analysed as they are.
KEY_PROFILE = "edma"


def estimate_key(audio, sr: int) -> tuple[str | None, float]:
    """`("A minor", strength)` of mono float32 `audio`, or `(None, 0.0)` when essentia finds no key."""
    import essentia.standard as es

    key, scale, strength = es.KeyExtractor(sampleRate=sr, profileType=KEY_PROFILE)(audio)
    return (f"{key} {scale}" if key else None), float(strength)


# Tempo is PercivalBpmEstimator's reading, halved when its beats are half-beats. Percival finds the pulse period
# well (Acc2 1.00 on the scored pieces; as right as RhythmExtractor2013 at a sixth of its cost), but picks the wrong
# metrical level for about one piece in five, mostly a slow piece read at double speed (its eighth notes taken for
# the beat). Onset strength cannot settle it (a rule comparing on-beat and off-beat onsets did not separate right
# from doubled readings): hi-hats and eighth-note melodies make the eighths as loud as the beats. What separates them
# is *where the pitch content changes*: notes and chords start on beats, so the chroma change recurs at the beat
# period, while half-way between beats it mostly does not. So when the chroma change recurs at Percival's period
# well below (by OCTAVE_MARGIN in autocorrelation) how it recurs at twice that period, Percival's beats are
# half-beats and the tempo is halved. Measured on the tuning set (seed 0): a slow piece's eighths recur 0.25-0.67
# below its quarter notes, a fast piece's quarter notes at most 0.11 below its half notes; -0.2 sits between.
# The opposite move (doubling a reading whose half-beats recur as strongly as its beats) is not made: real music
# moves its pitch on subdivisions too (arpeggios, runs), so recurrence at a faster level is no evidence that it is
# the beat (on 16 tracks of real game music it doubled four readings of 83-100 bpm that RhythmExtractor2013 reads
# at 100-111).
# There is no evidence either way, and Percival's reading stands, when the pitch content barely changes (a drone, a
# pad: mean change below CHANGE_RANGE[0]), when it is mostly noise, silence or drums rather than sustained notes
# (mean change above CHANGE_RANGE[1]: music with harmony measured 0.02-0.10, a drum kit alone 0.13-0.60), or when
# the change recurs at neither period (both below OCTAVE_FLOOR). The result stays inside Percival's search range.
OCTAVE_MARGIN = -0.2
OCTAVE_FLOOR = 0.2
CHANGE_RANGE = (0.01, 0.12)
BPM_RANGE = (50, 210)  # PercivalBpmEstimator's minBPM/maxBPM defaults
CHROMA_HOP = 0.01  # s: 100 frames a second
CHROMA_SPAN = 0.1  # s each side of a frame: shorter than half a beat at 210 bpm (0.14 s), so each beat resolves
CHROMA_BAND = (60.0, 2000.0)  # Hz: the fundamentals and first partials of bass, chords and melody


def chroma_change(audio, sr: int):
    """`(acf, fps, mean)`: the autocorrelation (1 at lag 0) of how much the chroma changes at each frame, the frame
    rate, and the mean change. The change at a frame is 1 - cosine between the mean chroma of the CHROMA_SPAN before
    it and of the CHROMA_SPAN after it."""
    import numpy as np

    hop = max(1, round(CHROMA_HOP * sr))
    n_fft = int(2 ** round(np.log2(0.064 * sr)))
    span = max(1, round(CHROMA_SPAN * sr / hop))
    frames = 1 + (len(audio) - n_fft) // hop
    if frames < 2 * span + 4:
        return np.zeros(1), sr / hop, 0.0
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    band = (freqs > CHROMA_BAND[0]) & (freqs < CHROMA_BAND[1])
    pitch_class = np.round(12 * np.log2(freqs[band] / 440.0)).astype(int) % 12
    fold = np.zeros((int(band.sum()), 12))
    fold[np.arange(len(pitch_class)), pitch_class] = 1.0
    window = np.hanning(n_fft).astype(np.float32)
    chroma = np.empty((frames, 12))
    for start in range(0, frames, 1024):  # in blocks: a long track's whole spectrogram would not fit
        idx = np.arange(n_fft)[None, :] + hop * np.arange(start, min(frames, start + 1024))[:, None]
        power = np.abs(np.fft.rfft(audio[idx] * window, axis=1)[:, band]) ** 2
        chroma[start : start + len(idx)] = np.sqrt(power @ fold)
    chroma /= np.linalg.norm(chroma, axis=1, keepdims=True) + 1e-9
    total = np.vstack([np.zeros(12), np.cumsum(chroma, axis=0)])
    t = np.arange(span, frames - span)
    before, after = total[t] - total[t - span], total[t + span] - total[t]
    cosine = (before * after).sum(1) / (np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1) + 1e-9)
    change = 1.0 - cosine
    mean = float(change.mean())
    spectrum = np.fft.rfft(change - mean, 2 * len(change))
    acf = np.fft.irfft(np.abs(spectrum) ** 2)[: len(change)]
    return acf / max(float(acf[0]), 1e-12), sr / hop, mean


def _recurrence(acf, fps: float, bpm: float) -> float:
    """How strongly the chroma change recurs at the beat period of `bpm`: the autocorrelation's highest value within
    3 % of that lag (Percival's reading is within ~1 %; the rest is the frame grid)."""
    import numpy as np

    lag = 60.0 / bpm * fps
    lo, hi = int(np.floor(lag * 0.97)), int(np.ceil(lag * 1.03)) + 1
    return float(acf[lo:hi].max()) if 0 < lo < hi <= len(acf) else 0.0


def beats_are_half_beats(audio, sr: int, bpm: float) -> bool:
    """True when the chroma of `audio` says that `bpm`'s beats are half-beats: its change recurs well below (by
    OCTAVE_MARGIN) at `bpm`'s period than at twice that period. False when it does not, or there is no evidence."""
    acf, fps, mean = chroma_change(audio, sr)
    if not CHANGE_RANGE[0] <= mean <= CHANGE_RANGE[1]:
        return False
    at_beat, at_two_beats = _recurrence(acf, fps, bpm), _recurrence(acf, fps, bpm / 2)
    if max(at_beat, at_two_beats) < OCTAVE_FLOOR:
        return False
    return at_beat - at_two_beats < OCTAVE_MARGIN


def estimate_bpm(audio, sr: int) -> float | None:
    """The tempo of mono float32 `audio` in quarter notes per minute, or None when there is no pulse: Percival's
    reading, halved when its beats are half-beats (`beats_are_half_beats`)."""
    import essentia.standard as es

    bpm = float(es.PercivalBpmEstimator(sampleRate=sr, minBPM=BPM_RANGE[0], maxBPM=BPM_RANGE[1])(audio))
    if bpm <= 0:
        return None
    if bpm / 2 >= BPM_RANGE[0] and beats_are_half_beats(audio, sr, bpm):
        return bpm / 2
    return bpm


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
