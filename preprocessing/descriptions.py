"""Descriptions as the text encoder will read them: bounded in size, decoded without silent mojibake.

MusicGen's T5 encoder reads at most 512 tokens, and audiocraft tokenizes descriptions untruncated, so an oversized
description costs memory in proportion to its length (a 100 KB line drove a training into an out-of-memory kill).
A sentencepiece token covers at least one character, so a description of `MAX_DESCRIPTION_CHARS` characters always
fits in 512 tokens whatever its script (English averages ~4 characters a token: real captions, 100-300 characters,
are far below). Longer text is cut at a word boundary, with a warning naming where it came from.

Text files are read up to `MAX_TEXT_BYTES` (only the first non-empty line is used): UTF-8 (BOM tolerated), UTF-16
when it starts with a BOM, else Windows-1252 (cp1252, a superset of Latin-1 for letters), else Latin-1, which
decodes any byte. A fallback is always named in a warning.
"""

from __future__ import annotations

import codecs
import logging
import unicodedata
from pathlib import Path

logger = logging.getLogger(__name__)

# 512 T5 tokens minus the end-of-sequence token and the leading word marker, with a margin.
MAX_DESCRIPTION_CHARS = 500
# A description is one line; 16 KiB of a file is far more than any line we keep.
MAX_TEXT_BYTES = 16 * 1024
FALLBACK_ENCODINGS = ("cp1252", "latin-1")


def _decode(raw: bytes, complete: bool) -> tuple[str, str]:
    """`(text, encoding used)`. `complete=False`: `raw` is a prefix of the file, and a character cut at its end is
    dropped rather than taken as proof that the file is not UTF-8."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return codecs.getincrementaldecoder("utf-16")(errors="replace").decode(raw, final=complete), "utf-16"
    try:
        return codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=complete), "utf-8"
    except UnicodeDecodeError:
        pass
    for encoding in FALLBACK_ENCODINGS:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def _clean(line: str) -> str:
    """Whitespace runs become one space; control characters (a stray NUL, a bell) are dropped."""
    kept = "".join(ch for ch in line if ch.isspace() or unicodedata.category(ch) != "Cc")
    return " ".join(kept.split())


def shorten(text: str, limit: int = MAX_DESCRIPTION_CHARS) -> str:
    """`text` cut to at most `limit` characters, at the last word boundary when there is one in its second half."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-")


def read_text_description(path: Path, label: str) -> tuple[str | None, list[str]]:
    """The first non-empty line of a text file, bounded; `(None, ...)` when it has none. Returns the warnings too
    (already logged): a fallback encoding, a cut. `label` names the file in them (the name in the upload)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    complete = len(raw) <= MAX_TEXT_BYTES
    raw = raw[:MAX_TEXT_BYTES]
    text, encoding = _decode(raw, complete)
    warnings = []
    if encoding in FALLBACK_ENCODINGS:
        message = (
            f"{label} is not valid UTF-8: read as {'Windows-1252 (cp1252)' if encoding == 'cp1252' else 'Latin-1'}. "
            "Check its description in the report, and save the file as UTF-8 if it is wrong"
        )
        logger.warning(message)
        warnings.append(message)
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return None, warnings
    line = _clean(lines[first])
    # The line runs on past what was read: it is longer than the bound anyway.
    runs_on = not complete and first == len(lines) - 1
    if runs_on or len(line) > MAX_DESCRIPTION_CHARS:
        size = f"over {MAX_TEXT_BYTES // 1024} KiB" if runs_on else f"{len(line)} characters"
        line = shorten(line)
        message = (
            f"{label}: the description ({size}) is longer than the text encoder reads; cut to {len(line)} "
            f"characters (at most {MAX_DESCRIPTION_CHARS}: T5 reads 512 tokens)"
        )
        logger.warning(message)
        warnings.append(message)
    return line or None, warnings


def compose(description: str, trigger: str | None, origin: str) -> tuple[str, list[str]]:
    """The final text condition: `trigger, description`, at most `MAX_DESCRIPTION_CHARS` characters. The trigger
    is kept whole when it fits (it is what calls the style later); the description gives way. `origin` names
    where the description came from, for the warnings (returned, not logged: the caller logs each once)."""
    warnings = []
    trigger = (trigger or "").strip()  # as `captions.with_trigger`: training looks for exactly this text
    if len(trigger) > MAX_DESCRIPTION_CHARS:
        trigger = shorten(trigger)
        warnings.append(
            f"trigger: longer than the text encoder reads; cut to {len(trigger)} characters "
            f"(at most {MAX_DESCRIPTION_CHARS}: T5 reads 512 tokens). Use this cut trigger in prompts"
        )
    room = MAX_DESCRIPTION_CHARS - (len(trigger) + 2 if trigger else 0)
    if len(description) > room:
        cut = shorten(description, max(room, 0))
        with_trigger = ", with the trigger in front," if trigger else ""
        warnings.append(
            f"{origin}: the description ({len(description)} characters{with_trigger}) is longer than the text "
            f"encoder reads; cut to {len(cut)} characters (at most {MAX_DESCRIPTION_CHARS} in all: T5 reads 512 "
            "tokens)"
        )
        description = cut
    return ", ".join(part for part in (trigger, description) if part), warnings
