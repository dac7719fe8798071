"""Cached tokens: each clip encoded once, random crops on the codes, padding masked, plans shared by ranks."""

from __future__ import annotations

import pytest
import torch

from core.audio import convert_channels, load_audio
from core.versions import load_musicgen
from preprocessing import load_prepared
from tests.training.conftest import make_prepared
from training.data import TokenDataset, encode_clips
from training.dist import DistInfo


@pytest.fixture(scope="module")
def tiny():
    return load_musicgen("tiny", "cpu").musicgen


@pytest.fixture(scope="module")
def tiny_stereo():
    return load_musicgen("tiny-stereo", "cpu").musicgen


class CountingEncoder:
    """Counts calls to the real compression model's encode (the model itself is untouched)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, wav):
        self.calls += 1
        return self.model.encode(wav)


def test_clips_are_encoded_once_and_converted_to_the_model_channels(tiny, tiny_stereo, tmp_path):
    folder = make_prepared(tmp_path / "prep", [{"seconds": 2.5, "channels": 2}, {"seconds": 1.3, "channels": 1}])
    clips = load_prepared(folder).clips
    mono = CountingEncoder(tiny.compression_model)
    tokens = encode_clips(mono, clips, tmp_path / "codes", DistInfo(), "cpu")
    assert mono.calls == 2
    assert [tuple(t.codes.shape) for t in tokens] == [(4, 125), (4, 65)]
    assert tokens[0].codes.dtype == torch.int16 and tokens[0].n_samples == 80000
    # the codes are exactly what the compression model gives for the (downmixed) audio
    wav, _ = load_audio(clips[0].path)
    with torch.no_grad():
        expected, _ = tiny.compression_model.encode(convert_channels(wav, 1)[None])
    assert torch.equal(tokens[0].codes.long(), expected[0])
    # a second run reads the cache instead of encoding again
    again = encode_clips(mono, clips, tmp_path / "codes", DistInfo(), "cpu")
    assert mono.calls == 2 and all(torch.equal(a.codes, b.codes) for a, b in zip(tokens, again, strict=True))
    # the stereo model gets 2 channels (a mono clip duplicated): 2 x 4 interleaved codebooks
    stereo = encode_clips(tiny_stereo.compression_model, clips, tmp_path / "codes", DistInfo(), "cpu")
    assert [tuple(t.codes.shape) for t in stereo] == [(8, 125), (8, 65)]


def make_dataset(tiny, tmp_path, seconds=(2.5, 1.3, 3.0), segment_frames=100):
    folder = make_prepared(
        tmp_path / "prep", [{"seconds": s, "description": f"clip {i}"} for i, s in enumerate(seconds)]
    )
    clips = encode_clips(tiny.compression_model, load_prepared(folder).clips, tmp_path / "codes", DistInfo(), "cpu")
    return TokenDataset(
        clips,
        segment_frames=segment_frames,
        special_token_id=tiny.lm.special_token_id,
        frame_rate=50,
        sample_rate=32000,
        text_conditions=tiny.lm.condition_provider.text_conditions,
    )


def test_crops_padding_and_conditions(tiny, tmp_path):
    data = make_dataset(tiny, tmp_path)
    plan = data.plan(3, global_batch=6, steps_per_epoch=10, seed=7)
    assert plan == data.plan(3, global_batch=6, steps_per_epoch=10, seed=7)  # pure in (seed, step)
    assert plan != data.plan(4, global_batch=6, steps_per_epoch=10, seed=7)
    batch = data.make_batch(plan)
    assert batch.codes.shape == (6, 4, 100) and batch.mask.shape == (6, 4, 100)
    for b, (item, start) in enumerate(plan):
        clip = data.clips[item]
        assert 0 <= start <= max(0, clip.n_frames - 100)
        n = min(100, clip.n_frames - start)
        assert torch.equal(batch.codes[b, :, :n], clip.codes[:, start : start + n].long())
        assert batch.mask[b, :, :n].all() and not batch.mask[b, :, n:].any()
        assert (batch.codes[b, :, n:] == tiny.lm.special_token_id).all()
        assert batch.attributes[b].text["description"] == f"clip {item}"
    # the 1.3 s clip (65 frames) is shorter than the crop: padded and masked
    short = [b for b, (item, _) in enumerate(plan) if data.clips[item].n_frames == 65]
    assert short and all(int(batch.mask[b, 0].sum()) == 65 for b in short)


def test_epochs_visit_every_clip_and_ranks_split_the_same_global_batch(tiny, tmp_path):
    data = make_dataset(tiny, tmp_path)
    # one pass per epoch (updates_per_epoch=None): 3 clips, batch 3 -> each clip once per epoch
    for epoch in range(3):
        items = [item for item, _ in data.plan(epoch, global_batch=3, steps_per_epoch=1, seed=1)]
        assert sorted(items) == [0, 1, 2]
    plan = data.plan(5, global_batch=4, steps_per_epoch=10, seed=1)
    shares = []
    for rank in range(2):
        micro = data.rank_micro_batches(
            5,
            global_batch=4,
            steps_per_epoch=10,
            seed=1,
            dist=DistInfo(rank=rank, world_size=2),
            grad_accumulation=2,
        )
        assert [len(m.items) for m in micro] == [1, 1]
        shares += [(m.items[0], m.offsets[0]) for m in micro]
    assert shares == plan
