"""Benchmark: one training step with cached tokens (our trainer) vs re-encoding the audio every step (audiocraft's
solver, sakemin's trainer), in fp32 and bf16, and peak memory of full vs LoRA fine-tuning; the same model, data and
crops in the same run.

    .venv/bin/python bench/train_step.py [--arch small|small-melody|tiny|tiny-melody] [--segment 5] [--batch 2]

`small`: a random-weight MusicGen-small architecture (1024 dim, 24 layers, 2048 codes x 4 codebooks, LUT text
conditioner in place of T5, which cannot be downloaded offline) on a random-weight EnCodec 32 kHz architecture.
`small-melody`: the same LM with musicgen-melody's chroma condition (`self_wav`, chroma_stem, radix2_exp 14) whose
stem separation is a random-weight HTDemucs of htdemucs' size (41.5 M parameters), the default kind of model users
fine-tune (`stereo-melody`).
The re-encoding step reads each crop from its WAV file and encodes it, as a data loader feeding audiocraft's solver
does, and for melody models lets the chroma conditioner run demucs + chroma on the crop, as audiocraft does on every
step (its issue 261); the cached step crops codes encoded once and cuts chroma computed once per clip. Both then run
the same LM forward/backward/AdamW step.

Peak memory of full vs LoRA (rank 16, default targets) is measured in a fresh process per method (resident memory
on CPU is not returned to the system between configurations; on GPU the allocator's peak), cached codes, the first
precision.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    append_result,
    exact_rss_env,
    git_commit,
    load_average,
    machine_name,
    reset_peak_rss,
    status_mib,
)
from core import tiny  # noqa: E402
from core.audio import convert_channels  # noqa: E402
from training.data import ClipTokens, TokenDataset, clip_attributes, encode_clips  # noqa: E402
from training.dist import DistInfo  # noqa: E402
from training.loop import TrainStep, peak_memory_mb  # noqa: E402

GOAL = 1.5  # issue 6: cached tokens at least 1.5x faster per step
LORA_GOAL = 0.6  # issue 6: LoRA's peak memory at most 0.6x full fine-tuning's
LORA_TARGETS = "q,k,v,out_proj,linear1,linear2"  # the `lora_targets` default
LOAD_BEFORE = load_average()


HTDEMUCS_KWARGS = {  # htdemucs' architecture (41.5 M parameters); random weights
    "sources": ["drums", "bass", "other", "vocals"],
    "audio_channels": 2,
    "samplerate": 44100,
    "segment": 7.8,
    "bottom_channels": 512,
}


@contextlib.contextmanager
def random_htdemucs(arch: str, workdir: Path):
    """While a melody model is built, `get_model('htdemucs')` loads a random HTDemucs written into a local repo."""
    if not arch.endswith("melody"):
        yield
        return
    from demucs.htdemucs import HTDemucs

    repo = workdir / "model" / "htdemucs_repo"
    if not (repo / "htdemucs.yaml").is_file():
        repo.mkdir(parents=True, exist_ok=True)
        kwargs = HTDEMUCS_KWARGS if arch == "small-melody" else tiny.htdemucs_kwargs()
        torch.manual_seed(0)
        model = HTDemucs(**kwargs)
        package = {"klass": HTDemucs, "args": (), "kwargs": kwargs, "state": model.state_dict()}
        torch.save(package, repo / f"{tiny.HTDEMUCS_SIG}.th")
        (repo / "htdemucs.yaml").write_text(f"models: ['{tiny.HTDEMUCS_SIG}']\n")
    with tiny.tiny_demucs(workdir / "model"):
        yield


def build_model(arch: str, device: str, workdir: Path):
    """A random-weight MusicGen of the given architecture, built with audiocraft's own builders."""
    from audiocraft.models import MusicGen, builders
    from omegaconf import OmegaConf

    melody = arch.endswith("melody")
    lm_cfg, comp_cfg = tiny.lm_cfg("tiny-melody" if melody else "tiny"), tiny.compression_cfg()
    if arch.startswith("small"):
        card, dim = 2048, 1024
        lm_cfg["transformer_lm"].update(card=card, dim=dim, num_heads=16, num_layers=24)
        lm_cfg["conditioners"]["description"]["lut"]["dim"] = dim
        comp_cfg["seanet"].update(dimension=128, n_filters=64, lstm=2)
        comp_cfg["rvq"]["bins"] = card
        if melody:  # musicgen-melody's chroma settings
            lm_cfg["conditioners"]["self_wav"]["chroma_stem"]["radix2_exp"] = 14
    for cfg in (lm_cfg, comp_cfg):
        cfg["device"] = device
    torch.manual_seed(0)
    compression = builders.get_compression_model(OmegaConf.create(comp_cfg)).to(device).eval()
    with random_htdemucs(arch, workdir):
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
    """What a re-encoding trainer does per step: read each crop's audio, encode the batch, mask the padding; melody
    models get the crop's waveform as their `self_wav` condition (the conditioner then runs demucs + chroma)."""
    from audiocraft.modules.conditioners import WavCondition

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
    attributes = []
    for (item, start), n, wav in zip(plan, valid, wavs, strict=True):
        attrs = clip_attributes(
            dataset.clips[item],
            text_conditions=dataset.text_conditions,
            wav_conditions=dataset.wav_conditions,
            seek_time=start / dataset.frame_rate,
            segment_samples=seg_samples,
            valid_samples=n,
            sample_rate=sr,
        )
        for name, cond in attrs.wav.items():
            attrs.wav[name] = WavCondition(wav[None].to(device), cond.length, cond.sample_rate, [None], [None])
        attributes.append(attrs)
    return codes, mask, attributes


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return peak_memory_mb(device)
    return status_mib("VmHWM")


def run_config(model, initial_state, dataset, mode, precision, args, device, caches=None):
    """Median step time, codes time, mean loss and peak memory of `args.steps` steps (after `args.warmup`)."""
    from training.melody import melody_conditioners

    lm = model.lm
    if initial_state is not None:
        lm.load_state_dict(initial_state)
    lm.train()
    lm.cfg_dropout.rng.manual_seed(0)
    for name, cond in melody_conditioners(lm).items():  # re-encoding: the conditioner computes chroma per step
        cond.cache = caches[name] if mode == "cached" else None
    step_module = TrainStep(lm)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    times, data_times, losses = [], [], []
    reset_peak_memory(device)
    resident_mb = peak_mb(device)  # what the process holds before training: model, caches, libraries
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
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
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
        "step_runs": [round(t, 3) for t in times],
        "data_s": statistics.median(data_times),  # producing the batch's codes (+ chroma): cropping, or encoding
        "loss": statistics.mean(losses),
        "peak_mb": round(peak_mb(device), 1),
        "before_mb": round(resident_mb, 1),
        "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
    }


def setup(args, device: str, workdir: Path):
    """The model, its encoded dataset (cached under `workdir`, so a child process reuses it) and melody caches."""
    from training.families import prepare_conditions

    model = build_model(args.arch, device, workdir)
    clips = []
    for i in range(args.clips):
        path = workdir / f"clip{i}.wav"
        if not path.is_file():
            sf.write(str(path), music_like(30.0, model.sample_rate, seed=i), model.sample_rate, subtype="PCM_16")
        clips.append(Clip(path, f"clip {i} description"))
    t0 = time.perf_counter()
    tokens: list[ClipTokens] = encode_clips(model.compression_model, clips, workdir / "codes", DistInfo(), device)
    # as setup_training: each family's conditioners set up (melody: chroma once per clip, the ChromaCaches)
    caches = prepare_conditions(model.lm, tokens, workdir / "chroma", DistInfo(), f"random-{args.arch}", seed=0)
    encode_once_s = time.perf_counter() - t0
    dataset = TokenDataset(
        tokens,
        segment_frames=int(args.segment * model.frame_rate),
        special_token_id=model.lm.special_token_id,
        frame_rate=model.frame_rate,
        sample_rate=model.sample_rate,
        text_conditions=model.lm.condition_provider.text_conditions,
        wav_conditions=tuple(caches),
    )
    return model, dataset, caches, encode_once_s


def memory_row(args, device: str) -> dict:
    """(child process) One method's row: cached codes, the first precision, full fine-tuning or LoRA."""
    from core import adapters

    workdir = Path(args.workdir)
    model, dataset, caches, _ = setup(args, device, workdir)
    if args.memory_row == "lora":
        for p in model.lm.parameters():
            p.requires_grad_(False)
        targets = adapters.select_targets(model.lm, LORA_TARGETS)
        for p in adapters.add_lora(model.lm, targets, 16, 16.0):
            p.requires_grad_(True)
    # no copy of the initial weights here (the parent keeps one to reset between its rows): it would count
    row = run_config(model, None, dataset, "cached", args.precisions.split(",")[0], args, device, caches)
    row["method"] = args.memory_row
    row["weights_mb"] = round(sum(p.numel() * p.element_size() for p in model.lm.parameters()) / 2**20, 1)
    return row


def training_memory_mb(row: dict) -> float:
    """The LM's weights plus all a step adds (gradients, optimizer state, activations): what a GPU holds for training
    beyond the frozen parts, without the process' libraries and the frozen EnCodec/demucs the whole-process peak
    also counts."""
    return row["weights_mb"] + row["peak_mb"] - row["before_mb"]


def memory_rows(args, device: str, workdir: Path) -> list[dict]:
    """Each method in a fresh process: a process's resident memory does not shrink back between configurations."""
    rows = []
    for method in [m for m in args.memory_rows.split(",") if m]:
        argv = [sys.executable, __file__, "--memory-row", method, "--workdir", str(workdir)]
        for name in ("arch", "segment", "batch", "steps", "warmup", "clips", "precisions"):
            argv += [f"--{name}", str(getattr(args, name))]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env=exact_rss_env()).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["small", "small-melody", "tiny", "tiny-melody"], default="small")
    parser.add_argument("--segment", type=float, default=5.0, help="seconds per example")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clips", type=int, default=4, help="30 s stereo clips in the synthesized dataset")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--memory-rows", default="full,lora", help="methods whose peak memory is compared ('' = none)")
    parser.add_argument("--memory-row", choices=["full", "lora"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.jsonl"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_row:
        print(json.dumps(memory_row(args, device)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, dataset, caches, encode_once_s = setup(args, device, workdir)
        n_params = sum(p.numel() for p in model.lm.parameters())
        initial = copy.deepcopy(model.lm.state_dict())
        rows = []
        for precision in args.precisions.split(","):
            for mode in ("cached", "reencode"):
                row = run_config(model, initial, dataset, mode, precision, args, device, caches)
                rows.append(row)
                print(
                    f"{mode:9s} {precision}: {row['step_s']:.3f} s/step (codes {row['data_s']:.3f} s), "
                    f"loss {row['loss']:.4f}, peak {row['peak_mb']:.0f} MB",
                    flush=True,
                )
        del model, initial
        mem = memory_rows(args, device, workdir)
        for row in mem:
            print(
                f"{row['method']:9s} {row['precision']} (fresh process): peak {row['peak_mb']:.0f} MB "
                f"({row['before_mb']:.0f} MB before the first step), "
                f"{row['trainable_m']:.1f} M trainable, {row['step_s']:.3f} s/step",
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
    mem_by = {r["method"]: r for r in mem}
    if {"full", "lora"} <= set(mem_by):
        ratios["lora_peak_over_full"] = mem_by["lora"]["peak_mb"] / mem_by["full"]["peak_mb"]
        ratios["lora_training_memory_over_full"] = training_memory_mb(mem_by["lora"]) / training_memory_mb(
            mem_by["full"]
        )
    print(f"\n{args.arch} LM ({n_params / 1e6:.0f} M params), batch {args.batch} x {args.segment:g} s, {device}:")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    print(f"  encoding all {args.clips} clips once (codes + chroma): {encode_once_s:.2f} s")
    first = args.precisions.split(",")[0]
    speed = ratios[f"reencode_over_cached_{first}"]
    print(
        f"  goal (issue 6): cached >= {GOAL}x faster per step -> {'met' if speed >= GOAL else 'NOT met'} ({speed:.2f}x)"
    )
    if "lora_peak_over_full" in ratios:
        lora, tensors = ratios["lora_peak_over_full"], ratios["lora_training_memory_over_full"]
        print(
            f"  goal (issue 6): LoRA peak <= {LORA_GOAL}x full -> whole process {lora:.2f}x "
            f"({'met' if lora <= LORA_GOAL else 'NOT met'}); LM weights + what a step adds {tensors:.2f}x "
            f"({'met' if tensors <= LORA_GOAL else 'NOT met'})"
        )
    record = {
        "bench": "train_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine_name(),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "arch": args.arch,
        "lm_params_m": round(n_params / 1e6, 1),
        "batch": args.batch,
        "segment_s": args.segment,
        "steps": args.steps,
        "load_average_before": LOAD_BEFORE,
        "encode_once_s": round(encode_once_s, 3),
        "rows": rows,
        "memory_rows": mem,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    append_result(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
