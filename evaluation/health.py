"""Sample health: is a generated sample silence, clipped, offset, noise, a stuck loop or a held drone? And did
fine-tuning change what the model generates at all?

The failures users of MusicGen fine-tuners report most (a fine-tune that makes noise, silence, a loop, or the base
model's music) are found here by measuring, not by listening. Every sample gets `sample_health(wav, sample_rate)`:
a `Health` with the measures below and the names of those past their threshold (`flags`). Each threshold is in
`THRESHOLDS`, and `THRESHOLD_REASONS` says why it is where it is; docs/metrics.md repeats both.

Measures (all on the mono downmix, except clipping and DC, on every channel):

- `silent_fraction`: the share of 50 ms frames quieter than `SILENCE_DBFS` (-60 dBFS RMS). Flag `silence`.
- `clipped_fraction`: the share of samples held flat near full scale (|x| >= 0.99 and equal to both neighbours):
  digital clipping cuts the waves' tops off flat; a peak-normalized sample touches full scale at a rounded crest.
  Flag `clipping`.
- `dc_offset`: the largest |mean| of a channel, in full-scale units. Flag `dc`.
- `spectral_flatness`: the median over non-silent frames of the power spectrum's geometric / arithmetic mean
  between 50 Hz and 16 kHz (Wiener entropy): about 0.56 for white noise, near 0 for a tone. Flag `noise`.
- `loop_correlation`, `loop_period_s`: the sample repeating itself. Its log-mel spectrogram (25 ms hop, each band's
  mean over time removed, so that only what changes counts) is correlated with itself shifted by every lag from
  1 s to 8 s (at most half the sample, so that at least two periods are seen); the highest correlation and its
  lag. Music repeats bars, but played or produced music varies within them (melody, fills, noise of the drums);
  a stuck generation replays the same second of audio almost exactly. Flag `loop`.
- `level_spread_db`: how much the sample changes at all. Over its audible spectrogram frames (RMS above
  `SILENCE_DBFS`), each mel band's level (dB) has a standard deviation over time; their mean, each band weighted by
  its share of the power, so that the bands one hears count and a faint noise floor does not. A held tone, chord or
  drone measures near 0 dB; white noise about 1.7 (its narrow bands fluctuate); music several dB (notes start and
  stop, chords move). Flag `static` when it is *below* its threshold: the degenerate stuck loop, a sample that
  repeats itself at every lag, which `loop` misses because it measures changes only. A sample with less than
  `STATIC_MIN_AUDIBLE_S` of audible frames is not judged (it measures 0, unflagged: a silent sample is
  `silence`, not `static`).

`indistinguishable(base_wavs, tuned_wavs, sample_rate)` compares the base model's and the fine-tune's samples for
the same prompts and seeds: the same correlation of log-mel changes, pair by pair. The fine-tune "changed
nothing" when the median pair correlates above `indistinguishable_correlation`, or when both sides are all noise.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass, field

import torch

__all__ = [
    "Health",
    "THRESHOLDS",
    "THRESHOLD_REASONS",
    "FLAGS",
    "BELOW_FLAGS",
    "FLAG_MEASURES",
    "sample_health",
    "pair_correlations",
    "indistinguishable",
    "loop_measure",
    "level_spread",
]

SILENCE_DBFS = -60.0  # a 50 ms frame quieter than this is silent (16-bit dither sits near -90 dBFS)
FRAME_S = 0.05  # silence frames
HOP_S = 0.025  # spectrogram hop (40 frames per second: onsets and notes, not single cycles)
N_MELS = 64
LOOP_LAGS_S = (1.0, 8.0)
FLATNESS_BAND_HZ = (50.0, 16000.0)
STATIC_MIN_AUDIBLE_S = 1.0  # too little sound to say it does not change

THRESHOLDS: dict[str, float] = {
    "silence": 0.25,
    "clipping": 0.001,
    "dc": 0.02,
    "noise": 0.3,
    "loop": 0.9,
    "static": 0.3,
    "indistinguishable_correlation": 0.9,
}
THRESHOLD_REASONS: dict[str, str] = {
    "silence": "a quarter of the sample's 50 ms frames below -60 dBFS: a pause, a fade or a break in music is "
    "shorter; a sample that stops (a silent tail) or never starts is longer",
    "clipping": "0.1 % of the samples held flat near full scale: a peak-normalized or full-scale sample has rounded "
    "crests; audible clipping cuts them flat, a few samples at a time, on many crests",
    "dc": "a channel's mean above 2 % of full scale: music is centred on 0 (its DC is below 0.1 %); an offset "
    "this large takes headroom and clicks at the start and end",
    "noise": "median spectral flatness above 0.3: white noise measures about 0.56 and music with drums stays "
    "below 0.2 (pitched sound concentrates its power in harmonics, which flatness measures)",
    "loop": "log-mel changes correlating above 0.9 with themselves 1-8 s later: an exact replay measures near 1; "
    "music that repeats bars while varying its melody, drums or mix measures well below",
    "static": "mel band levels varying by less than 0.3 dB over time (standard deviation, power-weighted mean over "
    "bands): a held sine, chord or drone measures under 0.1 (under 0.01 without noise), white noise 0.8-1.7 "
    "(48-16 kHz), music 3 or more, ambient pads included; flagged when below",
    "indistinguishable_correlation": "the median base/fine-tuned pair above 0.9 on the same measure: the fine-tune "
    "replays what the base model generates for the same prompt and seed",
}
FLAGS = ("silence", "clipping", "dc", "noise", "loop", "static")
FLAG_MEASURES = {  # the measure in `Health.measures` each flag is judged on
    "silence": "silent_fraction",
    "clipping": "clipped_fraction",
    "dc": "dc_offset",
    "noise": "spectral_flatness",
    "loop": "loop_correlation",
    "static": "level_spread_db",
}
BELOW_FLAGS = ("static",)  # raised when the measure is below its threshold (the others: above)


@dataclass(frozen=True)
class Health:
    """`flags`: the names (of `FLAGS`) past their threshold, in `FLAGS` order; `measures`: every measure."""

    flags: tuple[str, ...]
    measures: dict[str, float] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.flags


def _check(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """`wav` as float32 `[C, T]`; a ValueError for anything that cannot be measured (NaN/inf, empty, bad rate)."""
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"expected a waveform tensor [C, T], got {type(wav).__name__}")
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2 or wav.shape[-1] == 0:
        raise ValueError(f"expected a waveform [C, T] with samples, got shape {tuple(wav.shape)}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 8000:
        raise ValueError(f"sample_rate must be an integer of at least 8000 Hz, got {sample_rate!r}")
    wav = wav.detach().float().cpu()
    if not torch.isfinite(wav).all():
        raise ValueError("the waveform holds NaN or infinite values: it is not audio")
    return wav


def _frames(x: torch.Tensor, size: int, hop: int) -> torch.Tensor:
    """`[n, size]` frames of a 1-D signal (the tail shorter than a frame is dropped, at least one frame)."""
    if len(x) < size:
        x = torch.nn.functional.pad(x, (0, size - len(x)))
    return x.unfold(0, size, hop)


def _spectrogram(mono: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Power spectrogram `[F, frames]` with a ~46 ms window and `HOP_S` hop."""
    n_fft = 1 << math.ceil(math.log2(0.046 * sample_rate))
    hop = max(1, round(HOP_S * sample_rate))
    if len(mono) < n_fft:
        mono = torch.nn.functional.pad(mono, (0, n_fft - len(mono)))
    window = torch.hann_window(n_fft)
    spec = torch.stft(mono, n_fft, hop, window=window, center=False, return_complex=True)
    return spec.abs().square()


def _mel(power: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """`[N_MELS, frames]` mel power of a power spectrogram `[F, frames]`."""
    from torchaudio.functional import melscale_fbanks

    banks = melscale_fbanks(power.shape[0], 30.0, sample_rate / 2, N_MELS, sample_rate)  # [F, N_MELS]
    return banks.T @ power


def _log_mel(power: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """`[N_MELS, frames]` log-mel (dB, floored 80 dB below the sample's loudest cell)."""
    db = 10 * torch.log10(_mel(power, sample_rate).clamp_min(1e-12))
    return db.clamp_min(db.max() - 80.0)


def _changes(log_mel: torch.Tensor) -> torch.Tensor:
    """Each band's mean over time removed: what the sound does, not its steady colour."""
    return log_mel - log_mel.mean(dim=1, keepdim=True)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def loop_measure(log_mel: torch.Tensor, frame_rate: float) -> tuple[float, float]:
    """(highest correlation, its lag in seconds) of the log-mel changes with themselves `LOOP_LAGS_S` later, lags up
    to half the sample; (0, 0) when the sample is shorter than two periods of the shortest lag."""
    frames = log_mel.shape[1]
    low = round(LOOP_LAGS_S[0] * frame_rate)
    high = min(round(LOOP_LAGS_S[1] * frame_rate), frames // 2)
    if high < low:
        return 0.0, 0.0
    best, best_lag = -1.0, low
    for lag in range(low, high + 1):
        # Each band's mean is taken over the overlap on each side: a crescendo does not look like a repetition.
        value = _correlation(_changes(log_mel[:, :-lag]), _changes(log_mel[:, lag:]))
        if value > best:
            best, best_lag = value, lag
    return max(best, 0.0), best_lag / frame_rate


def level_spread(mono: torch.Tensor, power: torch.Tensor, sample_rate: int) -> float | None:
    """How much a sample changes, in dB: each mel band's standard deviation over the audible frames of `power`
    `[F, frames]` (the spectrogram of `mono` `[T]`), averaged with each band weighted by its share of the power.
    None when fewer than `STATIC_MIN_AUDIBLE_S` of frames are audible (nothing to judge)."""
    n_fft, hop = 2 * (power.shape[0] - 1), max(1, round(HOP_S * sample_rate))
    if len(mono) < n_fft:
        mono = torch.nn.functional.pad(mono, (0, n_fft - len(mono)))
    rms = _frames(mono, n_fft, hop).square().mean(dim=1).sqrt()  # the spectrogram's frames, one to one
    audible = rms >= 10 ** (SILENCE_DBFS / 20)
    if int(audible.sum()) * HOP_S < STATIC_MIN_AUDIBLE_S:
        return None
    mel = _mel(power[:, audible], sample_rate).double()  # [N_MELS, audible frames]
    db = 10 * torch.log10(mel.clamp_min(1e-20))
    db = db.clamp_min(db.max() - 80.0)  # bands the window's leakage barely reaches do not swing wildly
    weight = mel.mean(dim=1) / mel.mean(dim=1).sum()
    return float((weight * db.std(dim=1)).sum())


def sample_health(wav: torch.Tensor, sample_rate: int) -> Health:
    """The health of one sample `wav` `[C, T]` (any rate of at least 8 kHz): every measure and the flags past
    `THRESHOLDS`. A ValueError for a waveform that is not audio (NaN/inf, empty)."""
    wav = _check(wav, sample_rate)
    mono = wav.mean(dim=0)
    frame = max(1, round(FRAME_S * sample_rate))
    rms = _frames(mono, frame, frame).square().mean(dim=1).sqrt()
    silent = rms < 10 ** (SILENCE_DBFS / 20)
    measures: dict[str, float] = {"silent_fraction": float(silent.float().mean())}

    # Flat tops: near full scale and equal to both neighbours (a crest, however loud, is rounded).
    middle = wav[:, 1:-1]
    held = (middle.abs() >= 0.99) & ((middle - wav[:, :-2]).abs() < 1e-6) & ((middle - wav[:, 2:]).abs() < 1e-6)
    measures["clipped_fraction"] = float(held.float().mean()) if held.numel() else 0.0
    measures["dc_offset"] = float(wav.mean(dim=1).abs().max())

    power = _spectrogram(mono, sample_rate)
    bin_hz = sample_rate / (2 * (power.shape[0] - 1))
    low, high = round(FLATNESS_BAND_HZ[0] / bin_hz), min(round(FLATNESS_BAND_HZ[1] / bin_hz), power.shape[0] - 1)
    band = power[low : high + 1].double().clamp_min(1e-20)
    flatness = torch.exp(band.log().mean(dim=0)) / band.mean(dim=0)  # [frames]
    level = band.mean(dim=0)
    # Frames within 60 dB of the loudest, and not digital silence (whose flat floor would read as white noise).
    loud = (level > level.max() * 1e-6) & (level > 1e-10)
    measures["spectral_flatness"] = float(flatness[loud].median()) if bool(loud.any()) else 0.0

    if measures["silent_fraction"] < 1.0:
        correlation, period = loop_measure(_log_mel(power, sample_rate), 1.0 / HOP_S)
    else:
        correlation, period = 0.0, 0.0  # nothing to repeat
    measures["loop_correlation"], measures["loop_period_s"] = correlation, period
    spread = level_spread(mono, power, sample_rate)
    measures["level_spread_db"] = spread if spread is not None else 0.0  # 0 dB: nothing sounds, so nothing changes

    values = {name: measures[FLAG_MEASURES[name]] for name in FLAGS}
    if spread is None:  # too little sound to judge is not `static`: it is `silence`
        values["static"] = math.inf
    flags = tuple(
        name
        for name in FLAGS
        if (values[name] < THRESHOLDS[name] if name in BELOW_FLAGS else values[name] > THRESHOLDS[name])
    )
    return Health(flags=flags, measures=measures)


def pair_correlations(
    base_wavs: tp.Sequence[torch.Tensor], tuned_wavs: tp.Sequence[torch.Tensor], sample_rate: int
) -> list[float]:
    """For each (base, fine-tuned) pair (same prompt and seed, `[C, T]` each): the correlation of their log-mel
    changes over the length they share; 1.0 for the same audio, near 0 for unrelated music."""
    if len(base_wavs) != len(tuned_wavs) or not base_wavs:
        raise ValueError(f"need pairs: {len(base_wavs)} base and {len(tuned_wavs)} fine-tuned samples")
    values = []
    for base, tuned in zip(base_wavs, tuned_wavs, strict=True):
        base, tuned = _check(base, sample_rate).mean(dim=0), _check(tuned, sample_rate).mean(dim=0)
        length = min(len(base), len(tuned))
        mels = [_log_mel(_spectrogram(w[:length], sample_rate), sample_rate) for w in (base, tuned)]
        values.append(_correlation(_changes(mels[0]), _changes(mels[1])))
    return values


def indistinguishable(
    base_wavs: tp.Sequence[torch.Tensor], tuned_wavs: tp.Sequence[torch.Tensor], sample_rate: int
) -> bool:
    """Whether the fine-tune's samples cannot be told from the base model's for the same prompts and seeds: the
    median pair correlates above `THRESHOLDS['indistinguishable_correlation']`, or every sample of both is noise."""
    correlations = sorted(pair_correlations(base_wavs, tuned_wavs, sample_rate))
    median = (
        correlations[len(correlations) // 2]
        if len(correlations) % 2
        else sum(correlations[len(correlations) // 2 - 1 : len(correlations) // 2 + 1]) / 2
    )
    if median > THRESHOLDS["indistinguishable_correlation"]:
        return True
    return all("noise" in sample_health(w, sample_rate).flags for w in (*base_wavs, *tuned_wavs))
