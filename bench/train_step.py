"""Benchmark: one training step with cached tokens (our trainer) vs re-encoding the audio every step (audiocraft's
solver, sakemin's trainer), in fp32 and bf16, with peak memory; the same model, data and crops in the same run.

    .venv/bin/python bench/train_step.py [--arch small|tiny] [--segment 5] [--batch 2] [--steps 3]

`small`: a random-weight MusicGen-small architecture (1024 dim, 24 layers, 2048 codes x 4 codebooks, LUT text
conditioner in place of T5, which cannot be downloaded offline) on a random-weight EnCodec 32 kHz architecture.
The re-encoding step reads each crop from its WAV file and encodes it, as a data loader feeding audiocraft's solver
does; the cached step crops codes encoded once. Both then run the same LM forward/backward/AdamW step.

Prints the median step times, the ratios measured in this run, peak memory per configuration, and appends one JSON
line to bench/results/train_step.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from core import tiny  # noqa: E402
from core.audio import convert_channels  # noqa: E402
from training.data import ClipTokens, TokenDataset, clip_attributes, encode_clips  # noqa: E402
from training.dist import DistInfo  # noqa: E402
from training.loop import TrainStep, peak_memory_mb  # noqa: E402

GOAL = 1.5  # issue 6: cached tokens at least 1.5x faster per step


def build_model(arch: str, device: str):
    """A random-weight MusicGen of the given architecture, built with audiocraft's own builders."""
    from audiocraft.models import MusicGen, builders
    from omegaconf import OmegaConf

    lm_cfg, comp_cfg = tiny.lm_cfg("tiny"), tiny.compression_cfg()
    if arch == "small":
        card, dim = 2048, 1024
        lm_cfg["transformer_lm"].update(card=card, dim=dim, num_heads=16, num_layers=24)
        lm_cfg["conditioners"]["description"]["lut"]["dim"] = dim
        comp_cfg["seanet"].update(dimension=128, n_filters=64, lstm=2)
        comp_cfg["rvq"]["bins"] = card
    for cfg in (lm_cfg, comp_cfg):
        cfg["device"] = device
    torch.manual_seed(0)
    compression = builders.get_compression_model(OmegaConf.create(comp_cfg)).to(device).eval()
    lm = builders.get_lm_model(OmegaConf.create(lm_cfg)).to(device)
    return MusicGen(f"random-{arch}", compression, lm, max_duration=30.0)


def music_like(seconds: float, sr: int, seed: int) -> np.ndarray:
    """`[T, 2]` float32: changing chords, a noisy beat and hiss (real work for the encoder)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    beat = 60.0 / (90 + 10 * (seed % 5))
    chord = 110.0 * 2 ** (rng.integers(0, 12) / 12) * np.array([1.0, 1.26, 1.5, 1.68])[(t // beat).astype(int) % 4]
    sig = 0.2 * np.sin(2 * np.pi * chord * t) + 0.3 * np.exp(-(t % beat) / 0.02) * rng.standard_normal(len(t))
    return (0.5 * np.stack([sig, np.roll(sig, 200)], axis=1)).astype(np.float32)


class Clip:
    def __init__(self, path: Path, description: str):
        self.path, self.description, self.info = path, description, {}


def reencoded_batch(model, dataset: TokenDataset, plan, device: str):
    """What a re-encoding trainer does per step: read each crop's audio, encode the batch, mask the padding."""
    sr, channels, hop = model.sample_rate, model.audio_channels, model.sample_rate / model.frame_rate
    seg_samples = int(round(dataset.segment_frames * hop))
    wavs, valid = [], []
    for item, start in plan:
        clip = dataset.clips[item]
        data, _ = sf.read(clip.path, start=int(round(start * hop)), frames=seg_samples, dtype="float32", always_2d=True)
        wav = convert_channels(torch.from_numpy(data.T.copy()), channels)
        valid.append(wav.shape[-1])
        wavs.append(torch.nn.functional.pad(wav, (0, seg_samples - wav.shape[-1])))
    with torch.no_grad():
        codes, _ = model.compression_model.encode(torch.stack(wavs).to(device))
    mask = torch.ones_like(codes, dtype=torch.bool)
    for b, n in enumerate(valid):
        frames = int(n / hop)
        codes[b, :, frames:] = dataset.special_token_id
        mask[b, :, frames:] = False
    attributes = [
        clip_attributes(
            dataset.clips[item],
            text_conditions=dataset.text_conditions,
            wav_conditions=(),
            seek_time=start / dataset.frame_rate,
            segment_samples=seg_samples,
            valid_samples=n,
            sample_rate=sr,
        )
        for (item, start), n in zip(plan, valid, strict=True)
    ]
    return codes, mask, attributes


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: writing 5 resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return peak_memory_mb(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return peak_memory_mb(device)


def run_config(model, initial_state, dataset, mode, precision, args, device):
    lm = model.lm
    lm.load_state_dict(initial_state)
    lm.train()
    lm.cfg_dropout.rng.manual_seed(0)
    step_module = TrainStep(lm)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    times, data_times, losses = [], [], []
    reset_peak_memory(device)
    for step in range(args.warmup + args.steps):
        plan = dataset.plan(step, global_batch=args.batch, steps_per_epoch=1000, seed=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if mode == "cached":
            batch = dataset.make_batch(plan)
            codes, mask, attributes = batch.codes.to(device), batch.mask.to(device), batch.attributes
        else:
            codes, mask, attributes = reencoded_batch(model, dataset, plan, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_data = time.perf_counter() - t0
        autocast = (
            torch.autocast(device_type=device.split(":")[0], dtype=dtype)
            if dtype
            else torch.autocast("cpu", enabled=False)
        )
        with autocast:
            loss = step_module(codes, mask, attributes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            data_times.append(t_data)
            losses.append(float(loss.detach()))
    return {
        "mode": mode,
        "precision": precision,
        "step_s": statistics.median(times),
        "data_s": statistics.median(data_times),  # producing the batch's codes: cropping, or reading + encoding
        "loss": statistics.mean(losses),
        "peak_mb": round(peak_mb(device), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["small", "tiny"], default="small")
    parser.add_argument("--segment", type=float, default=5.0, help="seconds per example")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clips", type=int, default=4, help="30 s stereo clips in the synthesized dataset")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.jsonl"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.arch, device)
    n_params = sum(p.numel() for p in model.lm.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        clips = []
        for i in range(args.clips):
            path = Path(tmp) / f"clip{i}.wav"
            sf.write(str(path), music_like(30.0, model.sample_rate, seed=i), model.sample_rate, subtype="PCM_16")
            clips.append(Clip(path, f"clip {i} description"))
        t0 = time.perf_counter()
        tokens: list[ClipTokens] = encode_clips(model.compression_model, clips, Path(tmp) / "codes", DistInfo(), device)
        encode_once_s = time.perf_counter() - t0
        dataset = TokenDataset(
            tokens,
            segment_frames=int(args.segment * model.frame_rate),
            special_token_id=model.lm.special_token_id,
            frame_rate=model.frame_rate,
            sample_rate=model.sample_rate,
            text_conditions=model.lm.condition_provider.text_conditions,
        )
        initial = copy.deepcopy(model.lm.state_dict())
        rows = []
        for precision in args.precisions.split(","):
            for mode in ("cached", "reencode"):
                row = run_config(model, initial, dataset, mode, precision, args, device)
                rows.append(row)
                print(
                    f"{mode:9s} {precision}: {row['step_s']:.3f} s/step (codes {row['data_s']:.3f} s), "
                    f"loss {row['loss']:.4f}, "
                    f"peak {row['peak_mb']:.0f} MB",
                    flush=True,
                )
    by = {(r["mode"], r["precision"]): r for r in rows}
    ratios = {}
    for precision in args.precisions.split(","):
        ratios[f"reencode_over_cached_{precision}"] = (
            by[("reencode", precision)]["step_s"] / by[("cached", precision)]["step_s"]
        )
    if "fp32" in args.precisions and "bf16" in args.precisions:
        ratios["fp32_over_bf16_cached"] = by[("cached", "fp32")]["step_s"] / by[("cached", "bf16")]["step_s"]
    print(f"\n{args.arch} LM ({n_params / 1e6:.0f} M params), batch {args.batch} x {args.segment:g} s, {device}:")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    print(f"  encoding all {args.clips} clips once: {encode_once_s:.2f} s")
    goal = ratios[f"reencode_over_cached_{args.precisions.split(',')[0]}"]
    print(
        f"  goal (issue 6): cached >= {GOAL}x faster per step -> {'met' if goal >= GOAL else 'NOT met'} ({goal:.2f}x)"
    )
    record = {
        "bench": "train_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "arch": args.arch,
        "lm_params_m": round(n_params / 1e6, 1),
        "batch": args.batch,
        "segment_s": args.segment,
        "steps": args.steps,
        "encode_once_s": round(encode_once_s, 3),
        "rows": rows,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
