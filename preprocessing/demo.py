"""`python -m preprocessing.demo demo.zip`: a small synthesized dataset in one recognisable style, to try the whole
job offline (prepare -> fine-tune -> report -> predict) and to test that a fine-tune learns.

Every track is the same kind of music, a slow minor-key lo-fi loop: a four-chord cadence (i - iv - V - i, the V
major: the harmonic minor's leading tone) on an electric-piano-like voice, a sine bass on the chord roots, a kick on
beats 1 and 3, a noise snare on 2 and 4, soft eighth-note hats and a melody on the chords' tones. The cadence is
what makes the key plain to hear (and to measure: preparation finds the key each description names); a loop such as
i - VI - III - VII sounds as much like the relative major. Tracks differ in key, tempo, voicing and melody, so a
held-out track is new music of a style the others teach. Each track comes with `<track>.txt`, its description
(style, instruments, bpm, key), as a user's upload would.

The archive is deterministic: the same arguments give the same bytes (audio from seeded generators, FLAC, fixed
zip timestamps). With the defaults it is 8 tracks of 24 s, about 3.4 MB.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from core.params import InputError

logger = logging.getLogger(__name__)

__all__ = ["STYLE", "synthesize_track", "track_description", "write_demo", "main"]

SAMPLE_RATE = 16000  # the content stays below 8 kHz; preparation resamples to 32 kHz (half the archive size)
STYLE = "zzq lofi"  # the style word every description starts with (use it in prompts)
KEYS = {"A": 57, "C": 60, "D": 62, "E": 64, "G": 55}  # MIDI note of each key's tonic (minor keys)
# i - iv - V - i: (semitones above the minor tonic, the chord's third), the V major
PROGRESSION = ((0, 3), (5, 3), (7, 4), (0, 3))
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)  # fixed member timestamps: a deterministic archive


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _add(buffer: np.ndarray, start: int, sound: np.ndarray) -> None:
    end = min(len(buffer), start + len(sound))
    if start < end:
        buffer[start:end] += sound[: end - start]


def _tone(freq: float, seconds: float, decay: float, harmonics: tuple[float, ...] = (1.0,)) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(a * np.sin(2 * np.pi * freq * (i + 1) * t) for i, a in enumerate(harmonics))
    attack = np.minimum(1.0, t / 0.005)  # 5 ms attack: no clicks
    return wave * attack * np.exp(-t / decay)


def _kick(seconds: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    freq = 45 + 75 * np.exp(-t / 0.04)  # the pitch drop of a kick drum
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    return np.sin(phase) * np.exp(-t / 0.12)


def _noise_hit(rng: np.random.Generator, seconds: float, decay: float, bright: bool) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = rng.standard_normal(len(t))
    if bright:  # a first difference: high-passed noise for the hats
        noise = np.diff(noise, prepend=0.0)
    return noise * np.exp(-t / decay)


def track_key_and_bpm(index: int, seed: int) -> tuple[str, int]:
    rng = np.random.default_rng([seed, index, 1])
    key = sorted(KEYS)[int(rng.integers(len(KEYS)))]
    return key, int(rng.integers(78, 97))


def synthesize_track(index: int, seconds: float = 24.0, seed: int = 0) -> np.ndarray:
    """Mono float32 audio at `SAMPLE_RATE` of demo track `index` (deterministic in `index`, `seconds`, `seed`)."""
    rng = np.random.default_rng([seed, index, 2])
    key, bpm = track_key_and_bpm(index, seed)
    tonic = KEYS[key]
    beat = 60.0 / bpm
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n)
    inversion = int(rng.integers(3))  # voicing differs per track
    melody_note = int(rng.integers(3))
    kick = _kick()
    n_beats = int(seconds / beat) + 1
    for b in range(n_beats):
        at = int(b * beat * SAMPLE_RATE)
        bar, beat_in_bar = divmod(b, 4)
        step, third = PROGRESSION[bar % 4]
        root = tonic + step
        chord_tones = (0, third, 7)
        if beat_in_bar in (0, 2):  # chord stabs and bass on 1 and 3
            notes = [root, root + third, root + 7]
            notes = sorted(notes[inversion:] + [x + 12 for x in notes[:inversion]])
            for note in notes:
                _add(out, at, 0.12 * _tone(_hz(note), 2 * beat, 0.6, (1.0, 0.35, 0.1)))
            _add(out, at, 0.35 * _tone(_hz(root - 24), beat * 1.5, 0.4, (1.0, 0.2)))
            _add(out, at, 0.6 * kick)
        else:  # snare on 2 and 4
            _add(out, at, 0.12 * _noise_hit(rng, 0.2, 0.05, bright=False))
        for half in (0, 1):  # hats and melody on eighths
            at8 = at + int(half * beat / 2 * SAMPLE_RATE)
            _add(out, at8, 0.04 * _noise_hit(rng, 0.05, 0.01, bright=True))
            if rng.random() < 0.55:  # the chord's tones over two octaves, moving by at most two of them
                melody_note = int(np.clip(melody_note + rng.integers(-2, 3), 0, 2 * len(chord_tones) - 1))
                octave, degree = divmod(melody_note, len(chord_tones))
                pitch = tonic + 12 + 12 * octave + (step + chord_tones[degree]) % 12
                _add(out, at8, 0.1 * _tone(_hz(pitch), beat, 0.3, (1.0, 0.0, 0.3)))
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.05 * SAMPLE_RATE))
    out *= fade
    return (0.7 * out / max(1e-9, float(np.abs(out).max()))).astype(np.float32)


def track_description(index: int, seed: int = 0) -> str:
    key, bpm = track_key_and_bpm(index, seed)
    return f"{STYLE}, mellow electric piano chords, sine bass, soft kick and snare, {bpm} bpm, {key} minor"


def _flac(audio: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_demo(out: str | Path, tracks: int = 8, seconds: float = 24.0, seed: int = 0) -> Path:
    """Write the demo archive to `out` (a .zip, atomically): `demo_track_<i>.flac` + `.txt` per track."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise InputError("out", f"{out.name} does not end in .zip; give a path such as demo.zip")
    if out.is_dir():
        raise InputError("out", f"{out} is a folder; give a file path such as {out / 'demo.zip'}")
    if not 1 <= tracks <= 100:
        raise InputError("tracks", f"{tracks} is outside 1..100")
    if not 2.0 <= seconds <= 300.0:
        raise InputError("seconds", f"{seconds} is outside 2..300")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".demo-", suffix=".zip", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:  # FLAC is compressed already
            for i in range(tracks):
                name = f"demo_track_{i + 1:02d}"
                for member, data in (
                    (f"{name}.flac", _flac(synthesize_track(i, seconds, seed))),
                    (f"{name}.txt", (track_description(i, seed) + "\n").encode()),
                ):
                    info = zipfile.ZipInfo(member, date_time=_ZIP_TIME)
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info(
        "Wrote %s: %d tracks of %.0f s (%.1f MB), style %r", out, tracks, seconds, out.stat().st_size / 1e6, STYLE
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocessing.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the archive to write, e.g. demo.zip")
    parser.add_argument("--tracks", type=int, default=8, help="number of tracks (default 8)")
    parser.add_argument("--seconds", type=float, default=24.0, help="length of each track (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="another seed gives other tracks of the same style")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = write_demo(args.out, args.tracks, args.seconds, args.seed)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
