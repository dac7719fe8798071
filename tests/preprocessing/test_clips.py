"""Clip planning, clip names and caption wording."""

from __future__ import annotations

import pytest

from preprocessing import captions
from preprocessing.clips import MAX_NAME_BYTES, ClipNamer, Span, base_name, plan_clips

SR = 32000


@pytest.mark.parametrize(
    "seconds,expected,dropped",
    [
        (75, [(0, 30), (30, 60), (60, 75)], 0),  # 30 + 30 + 15
        (64, [(0, 30), (30, 60)], 4),  # a 4 s tail is dropped
        (65, [(0, 30), (30, 60), (60, 65)], 0),  # exactly min_clip_seconds is kept
        (12, [(0, 12)], 0),  # shorter than a chunk: one clip
        (30, [(0, 30)], 0),
        (4.9, [], 4.9),  # shorter than min_clip_seconds: nothing
    ],
)
def test_plan_clips(seconds, expected, dropped):
    spans, tail = plan_clips(round(seconds * SR), SR, 30.0, 5.0)
    assert [(s.start / SR, s.end / SR) for s in spans] == expected
    assert [s.index for s in spans] == list(range(len(expected)))
    assert tail / SR == pytest.approx(dropped)


def test_plan_clips_other_lengths():
    spans, _ = plan_clips(10 * SR, SR, 4.0, 1.0)
    assert spans == [Span(0, 0, 4 * SR), Span(1, 4 * SR, 8 * SR), Span(2, 8 * SR, 10 * SR)]


def test_clip_names_keep_unicode_and_stay_safe():
    assert base_name("Artist/Album 2/Sóng ♪ 1.mp3") == "Artist__Album_2__Sóng_1"
    assert base_name("日本語/曲.flac") == "日本語__曲"
    assert base_name('a/b:c*d?e"f<g>h|i.wav') == "a__b_c_d_e_f_g_h_i"
    assert base_name("--.weird..wav") == "weird"  # leading/trailing dots and dashes trimmed
    assert base_name("♪♪♪.wav") == "track"
    assert base_name("Cafe\u0301.wav") == "Café"  # NFC
    long = base_name("é" * 300 + ".wav")
    assert len(long.encode()) <= MAX_NAME_BYTES and long == "é" * (MAX_NAME_BYTES // 2)


def test_clip_names_are_unique_case_insensitively():
    namer = ClipNamer()
    bases = [namer.track_base(p) for p in ("a/song.wav", "a/Song.mp3", "a/song.flac", "a__song.wav")]
    # `__` only ever separates folders: a literal `a__song` file becomes `a_song`, it cannot pose as `a/song`.
    assert bases == ["a__song", "a__Song-2", "a__song-3", "a_song"]
    assert ClipNamer.clip_name("a__song", 2) == "a__song_002.wav"


def test_caption_wording():
    analysis = {
        "key": "C major",
        "bpm": 119.6,
        "tags": {
            "genre": [["Jazz---Bossa Nova", 0.6], ["Latin---Bossa Nova", 0.2]],
            "moods": [["relaxing", 0.3]],
            "instruments": [["piano", 0.5], ["acousticguitar", 0.2]],
        },
    }
    fields = captions.label_fields(analysis)
    assert fields == {
        "key": "C major",
        "bpm": 119.6,
        "genre": "jazz, bossa nova, latin",
        "moods": ["relaxing"],
        "instrument": "piano, acoustic guitar",
        "keywords": ["jazz", "bossa nova", "latin", "relaxing", "piano", "acoustic guitar"],
    }
    assert captions.caption(fields) == "jazz, bossa nova, latin, relaxing, piano, acoustic guitar, in C major, 120 bpm"
    empty = captions.label_fields(None)
    assert captions.caption(empty) == "" and set(empty.values()) == {None}
    assert captions.with_trigger("", " tok ") == "tok"
    assert captions.with_trigger("jazz", "tok") == "tok, jazz"
    assert captions.with_trigger("jazz", None) == "jazz"
