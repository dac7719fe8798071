"""Shared vocabularies (data only).

`GENRES`: broad music genres, used to write prompts of *other* styles than a training set's (DreamBooth prior
preservation's dissimilar examples, `training/methods/prior.py`). Lower case, as essentia's and MusicCaps' labels.
"""

from __future__ import annotations

GENRES: tuple[str, ...] = (
    "ambient",
    "blues",
    "classical",
    "country",
    "disco",
    "drum and bass",
    "dubstep",
    "electronic",
    "folk",
    "funk",
    "gospel",
    "hip hop",
    "house",
    "jazz",
    "latin",
    "lofi",
    "metal",
    "orchestral",
    "pop",
    "punk",
    "reggae",
    "rnb",
    "rock",
    "soul",
    "techno",
    "trance",
    "world",
)
