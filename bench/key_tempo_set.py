"""A labelled key/tempo test set rendered from scores we write: the truth is the score, not an analysis of audio.

Each piece is a score first (`Score`: key, mode, tempo, timbre, drums, and its notes), then audio at a source rate
(44.1 kHz, as uploads come). The harmony leaves no doubt about the key: 4-bar cadential phrases (major I-IV-V-I,
I-vi-ii-V-I, I-IV-I-V-I; minor i-iv-V-i with the harmonic minor's raised leading tone, i-VI-iv-V), a bass on the
roots, and a melody on the key's scale that lands on chord tones on the strong beats and on the tonic at each
phrase's end. The tempo is the score's quarter-note pulse: melody notes and the bass articulate the beats, and
some pieces add a drum kit (kick 1 and 3, snare 2 and 4, eighth hats).

Timbres cover what breaks tempo and key estimators: `voice` (a sustained, vibrato, slow-attack vocal-like tone),
`strings` (slow attack), `organ` (sustained, flat envelope), `piano` (decaying harmonics), `pluck` (a plucked string:
bright partials dying fast) and `marimba` (percussive, inharmonic partials). The sustained three go without drums
half of the time, and then their bass holds the bar: only the melody's soft onsets mark the beat.

    make_set(n, seed) -> list[Score]      the 24 keys in shuffled rounds, tempi spread over 60-150 bpm
    render(score, sample_rate) -> float32 mono audio

Used by `bench/key_tempo.py` (the benchmark) and `tests/preprocessing/test_key_tempo.py` (a small set in CI).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

SOURCE_RATE = 44100
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
HARMONIC_MINOR = (0, 2, 3, 5, 7, 8, 11)  # the raised 7th: the V chord's leading tone names the tonic
# Phrases as (chord root in semitones above the tonic, chord quality) per bar; each ends on the tonic.
MAJOR_PHRASES = (
    ((0, "maj"), (5, "maj"), (7, "maj"), (0, "maj")),
    ((0, "maj"), (9, "min"), (2, "min"), (7, "dom7")),
    ((0, "maj"), (5, "maj"), (0, "maj"), (7, "dom7")),
)
MINOR_PHRASES = (
    ((0, "min"), (5, "min"), (7, "dom7"), (0, "min")),
    ((0, "min"), (8, "maj"), (5, "min"), (7, "maj")),
    ((0, "min"), (5, "min"), (0, "min"), (7, "dom7")),
)
CHORD_TONES = {"maj": (0, 4, 7), "min": (0, 3, 7), "dom7": (0, 4, 7, 10)}
TIMBRES = ("voice", "strings", "organ", "piano", "pluck", "marimba")
SUSTAINED = ("voice", "strings", "organ")  # the timbres that get no drums half of the time


@dataclass
class Note:
    start: float  # beats from the piece's start
    length: float  # beats
    midi: int
    velocity: float
    part: str  # "melody", "chord", "bass"


@dataclass
class Score:
    name: str
    tonic: int  # pitch class, 0 = C
    mode: str  # "major" | "minor"
    bpm: float
    timbre: str
    drums: bool
    seconds: float
    notes: list[Note] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{PITCH_CLASSES[self.tonic]} {self.mode}"


def compose(name: str, tonic: int, mode: str, bpm: float, timbre: str, drums: bool, seconds: float, rng) -> Score:
    """The notes of one piece: cadential phrases until `seconds` is full, the last bar on the tonic chord."""
    score = Score(name, tonic, mode, float(bpm), timbre, drums, float(seconds))
    scale = MAJOR_SCALE if mode == "major" else HARMONIC_MINOR
    phrases = MAJOR_PHRASES if mode == "major" else MINOR_PHRASES
    base = 48 + tonic if tonic < 7 else 36 + tonic  # the chord register, C3..F#3 or G2..B2
    bars = max(2, int(np.ceil(seconds * bpm / 60.0 / 4.0)))
    progression: list[tuple[int, str]] = []
    while len(progression) < bars:
        progression.extend(phrases[int(rng.integers(len(phrases)))])
    progression = progression[: bars - 1] + [(0, "maj" if mode == "major" else "min")]
    degree = 0  # the melody's scale degree (0 = tonic), stepwise walk
    for bar, (root, quality) in enumerate(progression):
        t0 = 4.0 * bar
        tones = [root + x for x in CHORD_TONES[quality]]
        held = timbre in SUSTAINED
        for tone in tones[:4]:  # chord: held all bar by sustained voices, re-struck on 1 and 3 else
            for at in (0.0,) if held else (0.0, 2.0):
                score.notes.append(Note(t0 + at, 4.0 if held else 2.0, base + 12 + (tone % 12), 0.5, "chord"))
        if held and not drums:  # a choir or a string section: the bass holds the bar, only the melody moves
            score.notes.append(Note(t0, 4.0, base - 12 + root % 12, 0.7, "bass"))
        else:  # bass on every beat (root, fifth): the pulse and the harmony's root
            for at in (0.0, 1.0, 2.0, 3.0):
                interval = root if at in (0.0, 2.0) else root + 7
                score.notes.append(Note(t0 + at, 1.0, base - 12 + interval % 12, 0.8 if at == 0 else 0.6, "bass"))
        beat = 0.0
        while beat < 4.0:  # melody: quarter notes, some eighth pairs and halves
            last = bar == len(progression) - 1
            choice = rng.random()
            length = 2.0 if (choice < 0.15 or last) and beat % 2 == 0 else (0.5 if choice > 0.8 else 1.0)
            if beat % 1 == 0 and (beat % 2 == 0 or last):  # strong beats: the nearest chord tone
                pcs = [(x % 12) for x in tones]
                candidates = [d for d in range(-3, 10) if scale[d % 7] % 12 in pcs]
                degree = min(candidates, key=lambda d: (abs(d - degree), d))
                if last:
                    degree = 0 if degree < 4 else 7
            else:
                degree = int(np.clip(degree + rng.choice((-2, -1, 1, 2)), -3, 9))
            octave, step = divmod(degree, 7)
            score.notes.append(Note(t0 + beat, length, base + 24 + 12 * octave + scale[step], 0.9, "melody"))
            beat += length
    return score


def make_set(n: int = 48, seed: int = 0, seconds: float = 30.0, bpm_range: tuple[float, float] = (60, 150)) -> list:
    """`n` scores: keys in a shuffled cycle through all 24 (so n >= 24 has each once), timbres in turn, tempi
    spread evenly over `bpm_range` in a shuffled order, drums on the non-sustained timbres and on half of the
    sustained ones."""
    rng = np.random.default_rng(seed)
    keys = [(t, m) for m in ("major", "minor") for t in range(12)]
    order = [keys[i] for r in range(-(-n // 24)) for i in rng.permutation(24)][:n]
    lo, hi = bpm_range
    tempi = rng.permutation(np.round(np.linspace(lo, hi, n) + rng.uniform(-1, 1, n), 1) if n > 1 else [lo])
    timbres = [TIMBRES[(i + int(rng.integers(len(TIMBRES)))) % len(TIMBRES)] for i in range(n)]
    scores = []
    for i, ((tonic, mode), bpm, timbre) in enumerate(zip(order, tempi, timbres, strict=True)):
        drums = timbre not in SUSTAINED or rng.random() < 0.5
        name = f"{i:02d}_{PITCH_CLASSES[tonic]}{'m' if mode == 'minor' else ''}_{bpm:.0f}_{timbre}"
        scores.append(compose(name, tonic, mode, float(bpm), timbre, bool(drums), seconds, rng))
    return scores


# ------------------------------------------------------------------------------------------------- rendering


WAVETABLE = 16384  # nearest-sample lookup: its error is below -80 dB


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _envelope(n: int, sr: int, attack: float, decay: float | None, release: float = 0.03) -> np.ndarray:
    t = np.arange(n) / sr
    env = np.minimum(1.0, t / attack)
    if decay is not None:
        env = env * np.exp(-t / decay)
    tail = max(1, int(release * sr))
    env[-tail:] *= np.linspace(1.0, 0.0, min(tail, n))
    return env


@functools.lru_cache(maxsize=512)
def _wavetable(partials: tuple[tuple[float, float], ...]) -> np.ndarray:
    grid = np.arange(WAVETABLE) / WAVETABLE
    return sum(amp * np.sin(2 * np.pi * ratio * grid + 0.7 * ratio) for ratio, amp in partials)


def _additive(freq: float, n: int, sr: int, partials, vibrato: float = 0.0) -> np.ndarray:
    """Sum of harmonic `partials` ((ratio to `freq`, amplitude)) below Nyquist, read from a one-period wavetable
    (a sine per partial per sample would make rendering the set take minutes)."""
    t = np.arange(n) / sr
    # with `vibrato`: 5.5 Hz vibrato of that many semitones, as a singer's
    cycles = np.cumsum(freq * 2.0 ** (vibrato / 12 * np.sin(2 * np.pi * 5.5 * t))) / sr if vibrato else freq * t
    table = _wavetable(tuple((r, round(a, 4)) for r, a in partials if freq * r < sr / 2 - 500))
    return table[(cycles * WAVETABLE).astype(np.int64) % WAVETABLE]


def _voice_partials(midi: int) -> list[tuple[float, float]]:
    """Harmonics shaped by two fixed formants (an 'ah'): a sung vowel, not a pure tone."""
    f0 = _hz(midi)
    out = []
    for h in range(1, 16):
        f = f0 * h
        gain = np.exp(-(((f - 700) / 250) ** 2)) + 0.6 * np.exp(-(((f - 1150) / 300) ** 2)) + 0.15 / h
        out.append((float(h), float(gain)))
    return out


def _note_audio(note: Note, timbre: str, seconds: float, sr: int, rng) -> np.ndarray:
    n = max(1, int(seconds * sr))
    f = _hz(note.midi)
    if note.part == "bass" and timbre in ("voice", "strings", "organ"):
        timbre = "bass_soft"
    elif note.part == "bass":
        timbre = "bass"
    if timbre == "voice":
        wave = _additive(f, n, sr, _voice_partials(note.midi), vibrato=0.25)
        return wave * _envelope(n, sr, 0.09, None, 0.12)
    if timbre == "strings":  # a sawtooth-like spectrum, slow bow attack
        wave = _additive(f, n, sr, [(h, 1.0 / h) for h in range(1, 12)], vibrato=0.1)
        return wave * _envelope(n, sr, 0.12, None, 0.15)
    if timbre == "organ":
        wave = _additive(f, n, sr, [(1, 1.0), (2, 0.6), (3, 0.3), (4, 0.25), (6, 0.12), (8, 0.1)])
        return wave * _envelope(n, sr, 0.02, None, 0.03)
    if timbre == "piano":
        wave = _additive(f, n, sr, [(1, 1.0), (2, 0.5), (3, 0.3), (4, 0.15), (5, 0.1), (6, 0.05)])
        return wave * _envelope(n, sr, 0.004, 0.5 * 2.0 ** ((60 - note.midi) / 24))
    if timbre == "pluck":
        # a plucked string: bright partials that die fast over a mellow body that rings
        bright = _additive(f, n, sr, [(h, 0.8 / h) for h in range(2, 14)])
        body = _additive(f, n, sr, [(1, 1.0), (2, 0.3), (3, 0.1)])
        return bright * _envelope(n, sr, 0.002, 0.08) + body * _envelope(n, sr, 0.002, 0.9)
    if timbre == "marimba":  # a bar: partials 1 and 3.9 (inharmonic), the upper one decaying fast
        t = np.arange(n) / sr
        wave = np.sin(2 * np.pi * f * t) + 0.25 * np.sin(2 * np.pi * 3.9 * f * t) * np.exp(-t / 0.05)
        return wave * _envelope(n, sr, 0.002, 0.4)
    if timbre == "bass_soft":
        wave = _additive(f, n, sr, [(1, 1.0), (2, 0.3), (3, 0.1)])
        return wave * _envelope(n, sr, 0.04, 0.8, 0.08)
    wave = _additive(f, n, sr, [(1, 1.0), (2, 0.4), (3, 0.15)])  # "bass": a plucked electric bass
    return wave * _envelope(n, sr, 0.005, 0.35)


def _kick(sr: int) -> np.ndarray:
    t = np.arange(int(0.3 * sr)) / sr
    freq = 45 + 80 * np.exp(-t / 0.035)
    return np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.11)


def _noise(rng, sr: int, seconds: float, decay: float, bright: bool) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = rng.standard_normal(len(t))
    if bright:
        noise = np.diff(noise, prepend=0.0)
    return noise * np.exp(-t / decay)


def _add(buffer: np.ndarray, start: int, sound: np.ndarray) -> None:
    end = min(len(buffer), start + len(sound))
    if 0 <= start < end:
        buffer[start:end] += sound[: end - start]


PART_GAIN = {"melody": 0.5, "chord": 0.16, "bass": 0.35}


def render(score: Score, sample_rate: int = SOURCE_RATE) -> np.ndarray:
    """Mono float32 audio of `score`, peak 0.8 (deterministic in the score's name)."""
    seed = int.from_bytes(score.name.encode()[:16].ljust(16, b"\0"), "little") % 2**63
    rng = np.random.default_rng(seed)
    beat = 60.0 / score.bpm
    n = int(score.seconds * sample_rate)
    out = np.zeros(n)
    for note in score.notes:
        start = int(note.start * beat * sample_rate)
        if start >= n:
            continue
        seconds = note.length * beat * (1.0 if score.timbre in SUSTAINED else 1.6)  # decaying voices ring over
        sound = _note_audio(note, score.timbre, seconds, sample_rate, rng)
        _add(out, start, PART_GAIN[note.part] * note.velocity * sound)
    if score.drums:
        kick = _kick(sample_rate)
        for b in range(int(score.seconds / beat) + 1):
            at = int(b * beat * sample_rate)
            if b % 2 == 0:
                _add(out, at, 0.7 * kick)
            else:
                _add(out, at, 0.25 * _noise(rng, sample_rate, 0.2, 0.06, bright=False))
            for half in (0, 1):
                _add(out, at + int(half * beat / 2 * sample_rate), 0.06 * _noise(rng, sample_rate, 0.05, 0.012, True))
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * sample_rate))
    out *= fade
    return (0.8 * out / max(1e-9, float(np.abs(out).max()))).astype(np.float32)


# ------------------------------------------------------------------------------------------------- scores


def _parse_key(key: str | None) -> tuple[int, str] | None:
    if not key:
        return None
    tonic, mode = key.split()
    names = {name: i for i, name in enumerate(PITCH_CLASSES)}
    names.update({"Db": 1, "D#": 3, "Gb": 6, "G#": 8, "A#": 10, "Cb": 11, "E#": 5, "Fb": 4, "B#": 0})
    return names[tonic], mode


def mirex_key_score(truth: str, estimate: str | None) -> float:
    """MIREX's weighted key score: 1 same key, 0.5 a perfect fifth away (either way, same mode), 0.3 the relative
    key, 0.2 the parallel key, else 0."""
    t, e = _parse_key(truth), _parse_key(estimate)
    if t is None or e is None:
        return 0.0
    (tt, tm), (et, em) = t, e
    if (tt, tm) == (et, em):
        return 1.0
    if tm == em and (et - tt) % 12 in (5, 7):
        return 0.5
    if tm == "major" and em == "minor" and et == (tt + 9) % 12:
        return 0.3
    if tm == "minor" and em == "major" and et == (tt + 3) % 12:
        return 0.3
    if tt == et and tm != em:
        return 0.2
    return 0.0


def tempo_acc(truth: float, estimate: float | None, tolerance: float = 0.04) -> tuple[bool, bool]:
    """(Acc1, Acc2): within `tolerance` of the truth; of the truth or its x2, x1/2, x3, x1/3."""
    if not estimate or not np.isfinite(estimate):
        return False, False
    within = [abs(estimate - truth * f) <= tolerance * truth * f for f in (1, 2, 0.5, 3, 1 / 3)]
    return within[0], any(within)
