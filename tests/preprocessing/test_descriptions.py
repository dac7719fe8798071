"""Descriptions as the text encoder reads them: bounded (T5 reads 512 tokens), decoded with a named fallback."""

from __future__ import annotations

import codecs
import logging

import pytest

from preprocessing.descriptions import MAX_DESCRIPTION_CHARS, MAX_TEXT_BYTES, compose, read_text_description, shorten


def _read(tmp_path, raw: bytes) -> tuple[str | None, list[str]]:
    path = tmp_path / "song.txt"
    path.write_bytes(raw)
    return read_text_description(path, "album/song.txt")


def test_utf8_with_bom_blank_lines_and_whitespace(tmp_path):
    assert _read(tmp_path, codecs.BOM_UTF8 + b"\n \n  dub   techno\tpads \nsecond") == ("dub techno pads", [])
    assert _read(tmp_path, b"\n\n  \n") == (None, [])


@pytest.mark.parametrize(
    "raw,encoding,text",
    [
        ("café música".encode("latin-1"), "cp1252", "café música"),  # main: 'caf\ufffd m\ufffdsica'
        ("\u201cnoir\u201d jazz \u2013 brushes".encode("cp1252"), "cp1252", "\u201cnoir\u201d jazz \u2013 brushes"),
        (b"caf\xe9 \x81 bytes cp1252 leaves undefined", "Latin-1", "café \x81 bytes cp1252 leaves undefined"),
    ],
)
def test_non_utf8_is_decoded_with_a_named_fallback(tmp_path, caplog, raw, encoding, text):
    got, warnings = _read(tmp_path, raw)
    if encoding == "Latin-1":
        text = text.replace("\x81 ", "")  # the C1 control character is dropped, not kept
    assert got == text
    (warning,) = warnings
    assert "album/song.txt" in warning and "not valid UTF-8" in warning and encoding in warning
    assert any(r.levelno == logging.WARNING and r.message == warning for r in caplog.records)


def test_utf16_with_a_bom_is_read(tmp_path):
    assert _read(tmp_path, "ambient drones, 曲".encode("utf-16")) == ("ambient drones, 曲", [])


def test_a_character_cut_by_the_read_limit_is_not_taken_for_bad_utf8(tmp_path):
    # The first line runs past MAX_TEXT_BYTES and a 3-byte character straddles the limit.
    raw = ("x" * (MAX_TEXT_BYTES - 1) + "曲" + " more").encode()
    got, warnings = _read(tmp_path, raw)
    assert got == "x" * MAX_DESCRIPTION_CHARS
    (warning,) = warnings
    assert "over 16 KiB" in warning and "UTF-8" not in warning


def test_an_endless_line_costs_a_bounded_read(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:  # 8 MiB on one line
        f.write(b"lofi piano rain " * (1 << 19))
    got, warnings = read_text_description(path, "huge.txt")
    assert len(got) <= MAX_DESCRIPTION_CHARS and got.split(" ")[-1] in ("lofi", "piano", "rain")
    assert "huge.txt" in warnings[0] and "512 tokens" in warnings[0]


def test_shorten_and_compose_keep_the_trigger_whole():
    assert shorten("a b c", 10) == "a b c"
    assert shorten("word " * 200, 20) == "word word word word"  # at a word boundary, no trailing space
    assert shorten("x" * 50, 20) == "x" * 20  # no boundary: a hard cut
    assert compose("jazz", " zq ", "one_same_description") == ("zq, jazz", [])
    assert compose("", "zq", "x") == ("zq", []) and compose("jazz", None, "x") == ("jazz", [])
    text, warnings = compose("slow " * 200, "zq_artist", "a.txt")
    assert text.startswith("zq_artist, slow slow") and len(text) <= MAX_DESCRIPTION_CHARS
    assert len(warnings) == 1 and warnings[0].startswith("a.txt:") and "with the trigger in front" in warnings[0]
    text, warnings = compose("jazz", "t" * 2000, "a.txt")
    assert text == "t" * MAX_DESCRIPTION_CHARS and warnings[0].startswith("trigger:")
