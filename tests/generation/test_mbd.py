"""MultiBand Diffusion decoding of stereo tokens: each channel's codebooks decoded on their own."""

from __future__ import annotations

import torch
from audiocraft.models.multibanddiffusion import DiffusionProcess, MultiBandDiffusion
from audiocraft.models.unet import DiffusionUnet
from audiocraft.modules.diffusion_schedule import NoiseSchedule

from core.versions import load_musicgen
from generation.generate import decode


def tiny_mbd(codec) -> MultiBandDiffusion:
    """Two small random diffusion bands on the tiny EnCodec (the real MBD has 4 bands on EnCodec 32 kHz)."""
    torch.manual_seed(0)
    processes = []
    for _ in range(2):
        unet = DiffusionUnet(chin=1, hidden=8, depth=2, num_steps=1000, codec_dim=32, emb_all_layers=True)
        processes.append(DiffusionProcess(unet, NoiseSchedule(device="cpu")))
    return MultiBandDiffusion(processes, codec)


def test_stereo_tokens_decode_per_channel():
    model = load_musicgen("tiny-stereo", device="cpu").musicgen
    mbd = tiny_mbd(model.compression_model.model)  # the mono EnCodec inside the stereo wrapper
    tokens = torch.randint(0, 256, (1, 8, 25), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    stereo = decode(model, tokens, mbd)
    assert stereo.shape == (1, 2, 16000) and torch.isfinite(stereo).all()
    left, right = model.compression_model.get_left_right_codes(tokens)
    torch.manual_seed(3)
    expected_left = mbd.tokens_to_wav(left)
    expected_right = mbd.tokens_to_wav(right)
    torch.testing.assert_close(stereo[:, :1], expected_left)
    torch.testing.assert_close(stereo[:, 1:], expected_right)
    assert not torch.allclose(stereo[:, 0], stereo[:, 1])


def test_mono_tokens_decode_directly():
    model = load_musicgen("tiny", device="cpu").musicgen
    mbd = tiny_mbd(model.compression_model)
    tokens = torch.randint(0, 256, (1, 4, 25), generator=torch.Generator().manual_seed(1))
    assert decode(model, tokens, mbd).shape == (1, 1, 16000)
