"""Sample health: each flag on its synthetic case (a loop, a silent tail, white noise, clipping, DC) and on none of
them for music. The music is the demo's synthesized tracks (preprocessing/demo.py: drums with noise snares, bass,
chords and a melody over a repeating progression) and, when Debian's `singularity-music` package is installed, its
game music (the tracks without a DC offset in the files themselves)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.health import FLAGS, THRESHOLD_REASONS, THRESHOLDS, indistinguishable, pair_correlations, sample_health
from preprocessing.demo import SAMPLE_RATE, synthesize_track

SR = SAMPLE_RATE  # 16 kHz: the demo's rate
GAME_MUSIC = Path("/usr/share/games/singularity/music")
# Of singularity-music's tracks, these are centred on 0 in the files themselves (the others carry a DC offset of
# 2-40 % of full scale, which the `dc` flag reports: measured the same with soundfile and PyAV).
CENTRED = ("A New Journey.ogg", "Aberrations.ogg", "Nebula.ogg", "Orbital Elevator.ogg", "Through Space.ogg")


def music(index: int = 0, seconds: float = 10.0, start: float = 4.0) -> torch.Tensor:
    """`[1, T]` of demo track `index`, from `start` s."""
    track = torch.from_numpy(synthesize_track(index, start + seconds)).float().reshape(1, -1)
    return track[:, int(start * SR) :]


@pytest.fixture(scope="module")
def clips() -> list[torch.Tensor]:
    return [music(i) for i in range(3)]


def test_music_is_healthy(clips):
    for clip in clips:
        health = sample_health(clip, SR)
        assert health.flags == () and health.healthy, health.measures
        assert health.measures["loop_correlation"] < THRESHOLDS["loop"] - 0.1  # repeating bars, not a replay


@pytest.mark.skipif(not GAME_MUSIC.is_dir(), reason="Debian's singularity-music is not installed")
def test_game_music_is_healthy():
    import soundfile as sf

    for name in CENTRED:
        path = str(GAME_MUSIC / name)
        sr = sf.info(path).samplerate
        data, _ = sf.read(path, start=sf.info(path).frames // 3, frames=10 * sr, dtype="float32", always_2d=True)
        health = sample_health(torch.from_numpy(data.T.copy()), sr)  # 10 s from a third in
        assert health.flags == (), (name, health.measures)


def test_a_loop_is_flagged(clips):
    """1.5 s of music replayed: flagged `loop`, with its period; the same music played on is not."""
    piece = clips[0][:, : int(1.5 * SR)]
    health = sample_health(piece.repeat(1, 7), SR)
    assert health.flags == ("loop",), health.measures
    assert health.measures["loop_period_s"] == pytest.approx(1.5, abs=0.03)
    assert health.measures["loop_correlation"] > 0.99


def test_a_silent_tail_is_flagged(clips):
    wav = clips[1].clone()
    tail = wav[:, int(6.5 * SR) :]  # stops after 6.5 s of 10, down to a -70 dBFS noise floor
    tail.copy_(10 ** (-70 / 20) * torch.randn(tail.shape, generator=torch.Generator().manual_seed(4)))
    health = sample_health(wav, SR)
    assert health.flags == ("silence",), health.measures
    assert health.measures["silent_fraction"] == pytest.approx(0.35, abs=0.02)
    assert sample_health(torch.zeros(1, 4 * SR), SR).flags == ("silence",)  # nothing at all


def test_white_noise_is_flagged():
    noise = 0.3 * torch.randn(2, 8 * SR, generator=torch.Generator().manual_seed(0))
    health = sample_health(noise, SR)
    assert health.flags == ("noise",), health.measures
    assert health.measures["spectral_flatness"] == pytest.approx(0.56, abs=0.05)  # exp(-Euler's gamma)


def test_a_held_tone_chord_or_drone_is_static():
    """A sample that does not change at all (the degenerate stuck loop: it repeats itself at every lag) is flagged
    `static`, though `loop` (changes only) reads it low: a steady sine, a steady chord, a tone with noise 20 dB
    below it, and a drone whose level wanders by 0.6 % as a tiny fine-tune's did (50 ms RMS 0.178-0.180)."""
    t = torch.arange(6 * SR) / SR
    sine = 0.5 * torch.sin(2 * torch.pi * 220.0 * t)
    chord = sum(0.2 * torch.sin(2 * torch.pi * f * t) for f in (220.0, 277.18, 329.63))  # A major, held
    noisy = sine + 0.05 * torch.randn(len(t), generator=torch.Generator().manual_seed(3))
    saw = sum(torch.sin(2 * torch.pi * 110.0 * k * t) / k for k in range(1, 20))
    drone = 0.2 * (1 + 0.006 * torch.sin(2 * torch.pi * 0.7 * t)) * saw
    for name, wav in (("sine", sine), ("chord", chord), ("noisy tone", noisy), ("drone", drone)):
        health = sample_health(torch.stack([wav, wav]), SR)
        assert health.flags == ("static",), (name, health.measures)
        assert health.measures["loop_correlation"] < THRESHOLDS["loop"], name  # what `loop` alone missed
    assert sample_health(noisy[None], SR).measures["level_spread_db"] > 0.05  # the noise moves it, a little


def test_music_noise_and_silence_are_not_static(clips):
    """Music changes (the demo's tracks measure about 20 dB); white noise is `noise` and silence is `silence`,
    neither `static` as well, at the rates samples come at."""
    for clip in clips:
        assert sample_health(clip, SR).measures["level_spread_db"] > 10.0
    for rate in (16000, 32000, 48000):
        noise = 0.3 * torch.randn(1, 6 * rate, generator=torch.Generator().manual_seed(rate))
        health = sample_health(noise, rate)
        assert health.flags == ("noise",), (rate, health.measures)
        silent = sample_health(torch.zeros(1, 6 * rate), rate)
        assert silent.flags == ("silence",) and silent.measures["level_spread_db"] == 0.0
    blip = torch.zeros(1, 6 * SR)
    blip[:, : SR // 2] = 0.5 * torch.sin(2 * torch.pi * 220.0 * torch.arange(SR // 2) / SR)
    assert sample_health(blip, SR).flags == ("silence",)  # half a second of tone: too little to call it held


@pytest.mark.skipif(not GAME_MUSIC.is_dir(), reason="Debian's singularity-music is not installed")
def test_real_music_is_not_static():
    """Every singularity-music track (ambient ones and the sustained pads of "March Thee to Dis" included), 10 s
    from 40 % in: the lowest measured 3.0 dB (Advanced Simulacra), ten times the threshold."""
    import soundfile as sf

    paths = sorted(GAME_MUSIC.rglob("*.ogg"))
    assert GAME_MUSIC / "lose" / "March Thee to Dis.ogg" in paths
    for path in paths:
        info = sf.info(str(path))
        data, _ = sf.read(
            str(path), start=int(0.4 * info.frames), frames=10 * info.samplerate, dtype="float32", always_2d=True
        )
        health = sample_health(torch.from_numpy(data.T.copy()), info.samplerate)
        assert "static" not in health.flags, (path.name, health.measures)
        assert health.measures["level_spread_db"] > 5 * THRESHOLDS["static"], path.name  # far from it, not near


def test_clipping_is_flagged_and_a_normalized_peak_is_not(clips):
    loud = clips[2] / clips[2].abs().max()  # peak-normalized, as predict writes its outputs: touches 1.0 once
    assert sample_health(loud, SR).flags == ()
    bass = torch.sin(2 * torch.pi * 40.0 * torch.arange(4 * SR) / SR)[None]  # full scale, many samples >= 0.999
    assert sample_health(bass, SR).measures["clipped_fraction"] == 0.0
    health = sample_health((4.0 * loud).clamp(-1.0, 1.0), SR)
    assert "clipping" in health.flags and health.measures["clipped_fraction"] > THRESHOLDS["clipping"]


def test_a_dc_offset_is_flagged(clips):
    health = sample_health(0.5 * clips[0] + 0.1, SR)
    assert health.flags == ("dc",), health.measures
    assert health.measures["dc_offset"] == pytest.approx(0.1, abs=0.005)
    assert sample_health(clips[0], SR).measures["dc_offset"] < 0.005  # music is centred


def test_indistinguishable_base_and_fine_tune(clips):
    """The same samples (or nearly: a fine-tune that moved nothing audible) are indistinguishable; different music
    is not; base and fine-tune both noise are."""
    nudged = [c + 1e-3 * torch.randn(c.shape, generator=torch.Generator().manual_seed(1)) for c in clips]
    assert indistinguishable(clips, nudged, SR)
    assert min(pair_correlations(clips, nudged, SR)) > 0.95  # a -60 dB noise floor added
    other = [clips[1], clips[2], clips[0]]
    assert not indistinguishable(clips, other, SR)
    assert max(pair_correlations(clips, other, SR)) < 0.5
    gen = torch.Generator().manual_seed(2)
    noise = [0.2 * torch.randn(1, 4 * SR, generator=gen) for _ in range(4)]
    assert indistinguishable(noise[:2], noise[2:], SR)  # different noise, the same failure
    with pytest.raises(ValueError, match="need pairs"):
        indistinguishable(clips, clips[:2], SR)


def test_not_audio_is_refused():
    for bad, match in (
        (torch.full((1, SR), float("nan")), "NaN or infinite"),
        (torch.zeros(1, 0), "with samples"),
        (torch.zeros(2, 3, SR), "with samples"),
    ):
        with pytest.raises(ValueError, match=match):
            sample_health(bad, SR)
    with pytest.raises(ValueError, match="sample_rate"):
        sample_health(torch.zeros(1, SR), 0)


def test_every_flag_has_a_documented_threshold():
    assert set(FLAGS) < set(THRESHOLDS) and set(THRESHOLDS) == set(THRESHOLD_REASONS)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for name, value in THRESHOLDS.items():
        assert f"`{name}`" in doc and f"{value:g}" in doc, name
