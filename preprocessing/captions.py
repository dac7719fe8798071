"""From analysis results to MusicInfo fields and a caption that reads like a description:
"jazz, bossa nova, relaxing, piano, guitar, in C major, 120 bpm"."""

from __future__ import annotations

# MTG-Jamendo instrument classes are written without spaces; the caption uses words a prompt would use.
READABLE = {
    "acousticbassguitar": "acoustic bass guitar",
    "acousticguitar": "acoustic guitar",
    "classicalguitar": "classical guitar",
    "doublebass": "double bass",
    "drummachine": "drum machine",
    "electricguitar": "electric guitar",
    "electricpiano": "electric piano",
    "pipeorgan": "pipe organ",
}


def readable(label: str) -> str:
    text = label.strip()
    return READABLE.get(text.lower(), text).lower()


def split_genre(label: str) -> list[str]:
    """Discogs styles are `Parent---Style` ("Electronic---Deep House"): both words are useful prompts."""
    return [part.strip().lower() for part in label.split("---") if part.strip()]


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def label_fields(analysis: dict | None) -> dict:
    """MusicInfo fields (key, bpm, genre, moods, instrument, keywords) from one worker result (None -> Nones)."""
    analysis = analysis or {}
    tags = analysis.get("tags") or {}
    genres = _dedupe([g for label, _ in tags.get("genre", []) for g in split_genre(label)])
    moods = _dedupe([readable(label) for label, _ in tags.get("moods", [])])
    instruments = _dedupe([readable(label) for label, _ in tags.get("instruments", [])])
    bpm = analysis.get("bpm")
    return {
        "key": analysis.get("key") or None,
        "bpm": float(bpm) if bpm else None,
        "genre": ", ".join(genres) or None,
        "moods": moods or None,
        "instrument": ", ".join(instruments) or None,
        "keywords": _dedupe(genres + moods + instruments) or None,
    }


def caption(fields: dict) -> str:
    """The description made from labels; "" when there is nothing to say."""
    parts: list[str] = []
    if fields.get("genre"):
        parts += fields["genre"].split(", ")
    parts += fields.get("moods") or []
    if fields.get("instrument"):
        parts += fields["instrument"].split(", ")
    if fields.get("key"):
        parts.append(f"in {fields['key']}")
    if fields.get("bpm"):
        parts.append(f"{round(fields['bpm'])} bpm")
    return ", ".join(_dedupe(parts))


def with_trigger(description: str, trigger: str | None) -> str:
    trigger = (trigger or "").strip()
    if not trigger:
        return description
    return f"{trigger}, {description}" if description else trigger
