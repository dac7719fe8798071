"""What a training leaves to find and compare: the report, the curves and the samples as files beside
`trained_model.tar` (the held-out prompts' base and fine-tuned samples side by side), at predict's loudness."""

from __future__ import annotations

import tarfile

import pytest
import soundfile as sf
import torch

from core.params import from_kwargs
from generation.generate import Generator
from generation.params import PredictParams
from tests.training.conftest import make_prepared, tiny_params
from training.run import run_training

SECONDS = 1.0


def loudness(path) -> float:
    """Integrated loudness (LUFS, ITU-R BS.1770, as audiocraft's loudness normalization measures it)."""
    import torchaudio

    data, sr = sf.read(str(path), always_2d=True)
    return float(torchaudio.transforms.Loudness(sr)(torch.from_numpy(data.T).float()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    specs = [{"seconds": 2.5, "freq": 200.0 + 50 * i, "description": f"tone {i}"} for i in range(3)]
    train = make_prepared(root / "train", specs)
    held = make_prepared(root / "held", [{"seconds": 2.0, "freq": 290.0, "description": "tone 9"}])
    params = tiny_params(
        train, validation_path=str(held), epochs=1, updates_per_epoch=4, sample_duration=SECONDS, save_every=0
    )
    out = root / "out"
    return {"out": out, "tar": run_training(params, out)}


def test_the_report_curves_and_samples_lie_beside_the_tar(trained):
    out, tar = trained["out"], trained["tar"]
    with tarfile.open(tar) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    for name in ("loss.png", "report.html", "metrics.json", "samples/sample_0.wav", "samples/sample_1.wav"):
        assert (out / name).read_bytes() == members[name], name  # the same files as inside the tar
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # the report compares base and fine-tuned on the held-out prompts: both, side by side, as files
    for i in range(2):
        base, tuned = out / f"samples/heldout_{i}_base.wav", out / f"samples/heldout_{i}_finetuned.wav"
        a, b = sf.info(str(base)), sf.info(str(tuned))
        assert a.samplerate == b.samplerate == 32000 and a.frames == b.frames == int(SECONDS * 32000)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary leftovers


def test_report_samples_are_as_loud_as_predicts_output(trained, keep_global_random_state):
    """predict normalizes its outputs (loudness, -14 LUFS); the report's samples are heard at the same level (a raw
    decode of the tiny model is ~10 dB quieter)."""
    out = trained["out"]
    generator = Generator(device="cpu")
    params = from_kwargs(PredictParams, prompt="tone 1", duration=1, seed=3, replicate_weights=str(trained["tar"]))
    predicted = out.parent / "predicted.wav"
    sf.write(str(predicted), generator.generate(params, progress=False).wav.numpy().T, 32000)
    reference = loudness(predicted)
    inside = out.parent / "inside"
    with tarfile.open(trained["tar"]) as archive:  # the tar's own samples, then the side-by-side ones beside it
        archive.extractall(
            inside, filter="data", members=[m for m in archive.getmembers() if m.name.startswith("samples/")]
        )
    samples = sorted((inside / "samples").glob("*.wav")) + sorted((out / "samples").glob("heldout_*.wav"))
    for path in samples:
        assert loudness(path) == pytest.approx(reference, abs=1.5), path.name
    assert len(samples) == 6
