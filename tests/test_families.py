"""Model families as hooks: every family of the catalogue has its hooks in every room (core, generation, training),
and the hooks answer for the real tiny models what their catalogue records say."""

from __future__ import annotations

import pytest
import torch

from core.catalogue import SPECS, spec
from core.families import CORE_HOOKS
from core.versions import load_musicgen
from generation.families import GENERATION_HOOKS, family_of
from tests.helpers import write_wav
from training.data import ClipTokens
from training.dist import DistInfo
from training.families import TRAINING_HOOKS, prepare_conditions, training_hooks
from training.melody import ChromaCache

ROOMS = {"core": CORE_HOOKS, "generation": GENERATION_HOOKS, "training": TRAINING_HOOKS}


def test_every_family_of_the_catalogue_has_its_hooks_in_every_room():
    families = {s.family for s in SPECS}
    for room, registry in ROOMS.items():
        assert set(registry) == families, f"{room}: hooks for {sorted(registry)}, catalogue families {sorted(families)}"
        for name, hooks in registry.items():
            assert hooks.family == name, f"{room}: {name!r} registered with the hooks of {hooks.family!r}"
    for s in SPECS:  # a version's training hooks are its family's
        assert training_hooks(s.name) is TRAINING_HOOKS[s.family]


@pytest.mark.parametrize("name", ["tiny", "tiny-stereo", "tiny-melody", "tiny-style"])
def test_a_loaded_models_family_and_conditioner_set_up_follow_its_record(name, tmp_path):
    """The generation family read from the loaded model's conditioners is its record's family, and training sets up
    exactly the conditioners of that family: chroma caches for melody, the frozen style conditioner for style,
    nothing for text."""
    model = load_musicgen(name, "cpu").musicgen
    assert family_of(model).family == spec(name).family
    wav = write_wav(tmp_path / "clip.wav", 2.0)
    clip = ClipTokens(str(wav), torch.zeros(model.lm.num_codebooks, 100, dtype=torch.int16), "a clip", n_samples=64000)
    conditions = prepare_conditions(model.lm, [clip], tmp_path / "cache", DistInfo(), model_key=name, seed=0)
    kinds = {type(c).__name__ for c in conditions.values()}
    expected = {"melody": {ChromaCache.__name__}, "style": {"StyleConditioner"}, "text": set()}[spec(name).family]
    assert kinds == expected
    assert list(conditions) == (["self_wav"] if expected else [])
