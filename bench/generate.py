"""Benchmark: our token generation path (`generation.fast`) vs audiocraft's `MusicGen.generate`.

Both run the same random-weight model with musicgen-small's LM architecture (dim 1024, 24 layers, 16 heads, n_q 4,
card 2048, delay pattern, cross-attention to the text condition; a LUT conditioner stands in for T5, which cannot
be downloaded here) and the same settings (2 s, top_k 250, cfg 3, sampling). What is timed is everything
`MusicGen.generate` does for a list of descriptions: conditions, token generation, decoding (a small random EnCodec
with musicgen's 32 kHz/50 Hz shape: its decode takes milliseconds, so the numbers are about token generation).

    .venv/bin/python bench/generate.py [--duration 2] [--runs 3] [--batch 4] [--threads N] [--kl-steps 300]

The CPU may be shared: every run times audiocraft and ours back to back, alternating which goes first, so load
from other processes hits both; ratios are taken per run and the median reported. Peak RSS is measured in a fresh
subprocess per path (same model build). The KL divergence of the next-token distributions (quantized vs fp32,
teacher-forced on the same sequence) is measured over `--kl-steps` frames. Prints a table with the ratios and
appends one JSON line to bench/results/generate.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import append_result, git_commit, machine_name, reset_peak_rss, status_mib  # noqa: E402

GOAL_RATIO = 3.0
GOAL_KL = 0.01
SEED = 1234
DESCRIPTION = "lofi hip hop beat with warm piano chords, 90 bpm"


def small_lm_cfg() -> dict:
    """musicgen-small's LM architecture (random weights), LUT text conditioner cross-attended like T5's output."""
    from core.tiny import lm_cfg

    cfg = lm_cfg("tiny")
    cfg["transformer_lm"].update(dim=1024, num_heads=16, num_layers=24, hidden_scale=4, n_q=4, card=2048)
    cfg["conditioners"]["description"]["lut"].update(n_bins=1024, dim=1024)
    return cfg


def build_model():
    """An audiocraft `MusicGen` with the small LM architecture and a small 2048-bin EnCodec, random weights."""
    from audiocraft.models import MusicGen, builders
    from omegaconf import OmegaConf

    from core.tiny import compression_cfg

    torch.manual_seed(SEED)
    ccfg = compression_cfg()
    ccfg["rvq"]["bins"] = 2048
    compression = builders.get_compression_model(OmegaConf.create(ccfg)).eval()
    lm = builders.get_lm_model(OmegaConf.create(small_lm_cfg())).eval()
    model = MusicGen("bench-musicgen-small-arch", compression, lm, max_duration=30.0)
    return model


def run_audiocraft(model, batch: int) -> float:
    t0 = time.perf_counter()
    model.generate([DESCRIPTION] * batch)
    return time.perf_counter() - t0


def run_fast(model, fast, batch: int, static: bool | None = None) -> float:
    """`static`: as `generate_tokens`' (None: CUDA-graph steps on CUDA in half precision, today's steps elsewhere)."""
    from generation.fast import generate_tokens

    t0 = time.perf_counter()
    attributes, _ = model._prepare_tokens_and_attributes([DESCRIPTION] * batch, None)
    p = model.generation_params
    tokens = generate_tokens(
        fast,
        attributes,
        None,
        int(model.duration * model.frame_rate),
        use_sampling=p["use_sampling"],
        temp=p["temp"],
        top_k=p["top_k"],
        top_p=p["top_p"],
        cfg_coef=p["cfg_coef"],
        static=static,
    )
    model.generate_audio(tokens)
    return time.perf_counter() - t0


def time_interleaved(
    paths: dict[str, tp.Callable[[], tp.Any]], runs: int, sync: tp.Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds per run of each path, runs interleaved (the order reversed every other run) and seeded alike, after
    one untimed warm-up call each (kernel choices, allocator, CUDA graph capture of the first buckets)."""

    def timed(fn: tp.Callable[[], tp.Any]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for fn in paths.values():
        timed(fn)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for run in range(runs):
        order = list(paths) if run % 2 == 0 else list(paths)[::-1]
        for name in order:
            torch.manual_seed(SEED + run)
            times[name].append(timed(paths[name]))
    return times


def measure_rss(path: str, duration: float, threads: int, quantize: str) -> dict:
    """Child process: build the model, then generate once with `path` (our side includes preparing its weights).

    Reports the RSS after the build, and the peak RSS while generating (VmHWM reset after the build; where that is
    not possible, the process's lifetime peak, build included).
    """
    torch.set_num_threads(threads)
    model = build_model()
    model.set_generation_params(duration=duration, top_k=250, cfg_coef=3.0, use_sampling=True)
    after_build = status_mib("VmRSS")
    reset = reset_peak_rss()
    if path == "audiocraft":
        run_audiocraft(model, 1)
    else:
        from generation.fast import FastLM

        run_fast(model, FastLM(model.lm, None if quantize == "none" else quantize), 1)
    peak = status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rss_after_build_mib": round(after_build, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_is_generation_only": reset,
    }


def child_rss(path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", path, "--duration", str(args.duration)]
    cmd += ["--threads", str(args.threads), "--quantize", args.quantize]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of audio per sample")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--batch", type=int, default=4, help="samples per call for the batch measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--quantize", default="int8", choices=["int8", "none", "bf16"], help="our path's weights")
    parser.add_argument("--kl-steps", type=int, default=300, help="frames compared for the KL divergence (0: skip)")
    parser.add_argument("--no-fp32", action="store_true", help="skip timing our path in fp32 (exact mode)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate.jsonl")
    parser.add_argument("--rss-child", choices=["audiocraft", "fast"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.rss_child:
        print(json.dumps(measure_rss(args.rss_child, args.duration, args.threads, args.quantize)))
        return

    from bench.kl import next_token_kl
    from generation.fast import FastLM

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(
        f"machine: {machine_name()}; torch {torch.__version__}, {args.threads} threads "
        f"(OMP_WAIT_POLICY {policy}); load {load_before:.1f}"
    )
    t0 = time.perf_counter()
    model = build_model()
    print(f"built the model in {time.perf_counter() - t0:.1f} s")
    model.set_generation_params(duration=args.duration, top_k=250, cfg_coef=3.0, use_sampling=True)
    quantize = None if args.quantize == "none" else args.quantize
    t0 = time.perf_counter()
    fast = FastLM(model.lm, quantize)
    prepare_s = time.perf_counter() - t0
    fast_fp32 = FastLM(model.lm, None)
    steps = int(args.duration * model.frame_rate) + max(model.lm.pattern_provider.get_pattern(1).max_delay, 0)

    # Warm-up (first calls allocate and pick kernels) for every path, not timed.
    run_audiocraft(model, 1)
    run_fast(model, fast, 1)

    configs = [("audiocraft", 1), ("ours", 1)]
    if not args.no_fp32 and quantize is not None:
        configs.append(("ours_fp32", 1))
    if args.batch > 1:
        configs += [("audiocraft", args.batch), ("ours", args.batch)]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for run in range(args.runs):
        for batch in sorted({b for _, b in configs}):
            group = [c for c in configs if c[1] == batch]
            if run % 2:
                group = group[::-1]  # alternate the order so a load change does not favour one side
            for name, b in group:
                torch.manual_seed(SEED + run)
                if name == "audiocraft":
                    dt = run_audiocraft(model, b)
                else:
                    dt = run_fast(model, fast if name == "ours" else fast_fp32, b)
                times[(name, b)].append(dt)
                print(f"  run {run + 1}/{args.runs} {name:10s} batch {b}: {dt:6.2f} s ({steps * 1 / dt:5.1f} steps/s)")

    def ratios(batch: int, name: str = "ours") -> list[float]:
        return [a / o for a, o in zip(times[("audiocraft", batch)], times[(name, batch)], strict=True)]

    def summary(name: str, batch: int) -> dict:
        med = median(times[(name, batch)])
        return {
            "seconds": round(med, 3),
            "steps_per_s": round(steps / med, 2),
            "real_time_factor": round(args.duration * batch / med, 3),  # seconds of audio per second
            "samples_per_s": round(batch / med, 3),
            "runs": [round(t, 3) for t in times[(name, batch)]],
        }

    result: dict = {
        "bench": "generate",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine_name(),
        "torch": torch.__version__,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before": round(load_before, 2),
        "model": "random-weight musicgen-small LM architecture (dim 1024, 24 layers, n_q 4, card 2048), LUT text",
        "settings": {"duration": args.duration, "top_k": 250, "cfg_coef": 3.0, "steps": steps},
        "quantize": args.quantize,
        "prepare_seconds": round(prepare_s, 2),
        "batch1": {"audiocraft": summary("audiocraft", 1), "ours": summary("ours", 1)},
        "ratio_batch1": round(median(ratios(1)), 2),
        "runs": args.runs,
        "interleaved": True,
    }
    if ("ours_fp32", 1) in times:
        result["batch1"]["ours_fp32"] = summary("ours_fp32", 1)
        result["ratio_batch1_fp32"] = round(median(ratios(1, "ours_fp32")), 2)
    if args.batch > 1:
        result[f"batch{args.batch}"] = {
            "audiocraft": summary("audiocraft", args.batch),
            "ours": summary("ours", args.batch),
        }
        result[f"ratio_batch{args.batch}"] = round(median(ratios(args.batch)), 2)
    if args.kl_steps and quantize is not None:
        print(f"KL divergence over {args.kl_steps} frames ({args.quantize} vs fp32, teacher-forced)...")
        attributes, _ = model._prepare_tokens_and_attributes([DESCRIPTION], None)
        torch.manual_seed(SEED)
        gap = next_token_kl(model.lm, attributes, args.kl_steps, fast, reference=fast_fp32)
        result["kl"] = gap.as_dict()
    if not args.no_rss:
        print("peak RSS (one fresh process per path)...")
        result["rss"] = {"audiocraft": child_rss("audiocraft", args), "ours": child_rss("fast", args)}
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    kl_ok = "kl" not in result or result["kl"]["kl_mean"] < GOAL_KL
    result["goal"] = {"ratio": GOAL_RATIO, "kl": GOAL_KL}
    result["meets_goal"] = bool(result["ratio_batch1"] >= GOAL_RATIO and kl_ok)

    print_table(result, args)
    append_result(args.out, result)


def print_table(result: dict, args) -> None:
    print()
    real_time_steps = result["settings"]["steps"] / args.duration  # steps per second that keep up with playback
    print(f"{'':24s}{'s/call':>9s}{'steps/s':>9s}{'RTF':>8s}{'samples/s':>11s}")
    rows = [("batch1", "audiocraft"), ("batch1", "ours"), ("batch1", "ours_fp32")]
    if args.batch > 1:
        rows += [(f"batch{args.batch}", "audiocraft"), (f"batch{args.batch}", "ours")]
    for group, name in rows:
        r = result.get(group, {}).get(name)
        if r is None:
            continue
        label = f"{name} ({group})"
        print(
            f"{label:24s}{r['seconds']:9.2f}{r['steps_per_s']:9.1f}{r['real_time_factor']:8.2f}{r['samples_per_s']:11.2f}"
        )
    ours1 = result["batch1"]["ours"]
    print(
        f"ratio ours/audiocraft, batch 1 ({args.quantize}): {result['ratio_batch1']:.2f}x (goal >= {GOAL_RATIO}x); "
        f"real-time factor {ours1['real_time_factor']:.2f} ({ours1['steps_per_s']:.1f} steps/s; 1.0 = real time, "
        f"{real_time_steps:.1f} steps/s at {args.duration:g} s)"
    )
    if "ratio_batch1_fp32" in result:
        print(f"ratio ours/audiocraft, batch 1 (fp32, identical tokens): {result['ratio_batch1_fp32']:.2f}x")
    if args.batch > 1:
        print(f"ratio ours/audiocraft, batch {args.batch}: {result[f'ratio_batch{args.batch}']:.2f}x")
    if "kl" in result:
        kl = result["kl"]
        print(
            f"KL {kl['quantize']} vs fp32: mean {kl['kl_mean']:.5f} nats/token (p99 {kl['kl_p99']:.5f}, max "
            f"{kl['kl_max']:.5f}) over {kl['tokens']} tokens / {kl['steps']} steps; top-1 agreement "
            f"{kl['top1_agreement']:.3f}; reference entropy {kl['ref_entropy']:.2f} nats (goal KL < {GOAL_KL})"
        )
    if "rss" in result:
        a, o = result["rss"]["audiocraft"], result["rss"]["ours"]
        print(
            f"peak RSS: audiocraft {a['peak_rss_mib']:.0f} MiB, ours {o['peak_rss_mib']:.0f} MiB "
            f"while generating (RSS after the model build: {a['rss_after_build_mib']:.0f} / "
            f"{o['rss_after_build_mib']:.0f} MiB; ours includes its int8 copy of the weights)"
        )
    print(f"prepare (int8 packing, once per model): {result['prepare_seconds']:.1f} s")
    print(
        f"load average {result['load_average_before']} -> {result['load_average_after']}; meets goal: "
        f"{result['meets_goal']}"
    )


if __name__ == "__main__":
    main()
