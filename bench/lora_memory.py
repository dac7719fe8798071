"""Benchmark: peak memory of one LoRA training step on a real-size random-weight MusicGen LM (CPU measurement), to
estimate what a GPU needs (docs/methods.md: musicgen-medium LoRA on a 24 GB GPU).

    .venv/bin/python bench/lora_memory.py [--arch medium] [--segments 1,2] [--precision bf16] [--checkpointing]

The LM has the real architecture (`medium`: 1536 dims, 24 heads, 48 layers, 4 x 2048 codes; a LUT text
conditioner stands in for T5, which is frozen and outside the LM anyway), fp32 weights as our trainer keeps them,
LoRA (rank 16, the default targets) with only the adapters trainable, the trainer's own `TrainStep` (conditions,
pattern, loss) under autocast, and AdamW on the adapters. For each segment length it measures the process's peak
resident memory (VmHWM, reset between runs) of a forward/backward/optimizer step with batch 1, then fits
`peak = fixed + per_second x seconds` and extrapolates to 30 s crops and larger batches. Appends a JSON line to
bench/results/lora_memory.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import append_result, machine_name, reexec_for_exact_rss, reset_peak_rss, status_mib  # noqa: E402
from core import adapters, tiny  # noqa: E402
from training.loop import TrainStep  # noqa: E402

ARCHS = {
    "medium": {"dim": 1536, "num_heads": 24, "num_layers": 48, "card": 2048},
    "small": {"dim": 1024, "num_heads": 16, "num_layers": 24, "card": 2048},
    "tiny": {},
}
TARGETS = "q,k,v,out_proj,linear1,linear2"


def build_lm(arch: str, layers: int | None = None):
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    cfg = tiny.lm_cfg("tiny")
    dims = ARCHS[arch]
    if dims:
        cfg["transformer_lm"].update(dims)
        cfg["conditioners"]["description"]["lut"]["dim"] = dims["dim"]
    if layers:
        cfg["transformer_lm"]["num_layers"] = layers
    torch.manual_seed(0)
    return builders.get_lm_model(OmegaConf.create(cfg))


def one_step(lm, seconds: float, precision: str) -> tuple[float, float, float]:
    """(peak MB, step seconds, loss) of one batch-1 LoRA step on `seconds` of random codes."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    frames = int(seconds * 50)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, frames))
    mask = torch.ones_like(codes, dtype=torch.bool)
    attributes = [ConditioningAttributes(text={"description": "lofi hip hop beat"})]
    trainable = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    )
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # what autograd keeps for the backward pass (activations), counted once per storage: allocator-independent
        if not (isinstance(t, torch.nn.Parameter) or t.requires_grad and t.is_leaf):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    reset_peak_rss()
    t0 = time.perf_counter()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = TrainStep(lm)(codes, mask, attributes)
    one_step.saved_mb = sum(saved.values()) / 2**20
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return status_mib("VmHWM"), time.perf_counter() - t0, float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=list(ARCHS), default="medium")
    parser.add_argument("--segments", default="1,2", help="seconds per example, comma-separated (batch 1)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (per layer)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--layers", type=int, default=None, help="override the layer count (measure fewer layers, scale linearly)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_memory.jsonl"))
    args = parser.parse_args(argv)
    reexec_for_exact_rss()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    before = status_mib("VmRSS")
    t0 = time.perf_counter()
    lm = build_lm(args.arch, args.layers)
    build_s = time.perf_counter() - t0
    lm.float().train()
    lm.cfg_dropout.p = 0.0
    weights_mb = sum(p.numel() * p.element_size() for p in lm.parameters()) / 2**20
    for p in lm.parameters():
        p.requires_grad_(False)
    targets = adapters.select_targets(lm, TARGETS)
    for p in adapters.add_lora(lm, targets, args.rank, float(args.rank)):
        p.requires_grad_(True)
    if args.checkpointing:
        lm.transformer.checkpointing = "torch"
    n_params = sum(p.numel() for p in lm.parameters())
    n_adapter = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    loaded = status_mib("VmRSS")
    print(
        f"{args.arch}: {n_params / 1e6:.0f} M parameters ({weights_mb:.0f} MB fp32), LoRA r{args.rank} "
        f"{n_adapter / 1e6:.1f} M; process {loaded:.0f} MB after building ({build_s:.0f} s; {before:.0f} MB before)",
        flush=True,
    )
    rows = []
    for seconds in [float(s) for s in args.segments.split(",")]:
        peak, step_s, loss = one_step(lm, seconds, args.precision)
        saved_mb = one_step.saved_mb
        rows.append(
            {
                "seconds": seconds,
                "peak_mb": round(peak, 1),
                "saved_activations_mb": round(saved_mb, 1),
                "step_s": round(step_s, 2),
                "loss": loss,
            }
        )
        print(
            f"  {seconds:g} s: peak RSS {peak:.0f} MB, activations kept for backward {saved_mb:.0f} MB, "
            f"step {step_s:.1f} s, loss {loss:.3f}",
            flush=True,
        )
    fit = {}
    if len(rows) >= 2:
        (s0, p0), (s1, p1) = (rows[0]["seconds"], rows[0]["peak_mb"]), (rows[-1]["seconds"], rows[-1]["peak_mb"])
        per_second = (p1 - p0) / (s1 - s0)
        fixed = p0 - per_second * s0
        fit = {
            "fixed_mb": round(fixed, 1),
            "per_second_mb": round(per_second, 1),
            "batch1_30s_mb": round(fixed + 30 * per_second, 1),
            "batch4_30s_mb": round(fixed + 4 * 30 * per_second, 1),
        }
        print(
            f"  fit: {fixed:.0f} MB + {per_second:.1f} MB per second of audio -> 30 s x batch 1: "
            f"{fit['batch1_30s_mb'] / 1024:.1f} GB, x batch 4: {fit['batch4_30s_mb'] / 1024:.1f} GB",
            flush=True,
        )
    record = {
        "bench": "lora_memory",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_name(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "device": f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "arch": args.arch,
        "layers": len(lm.transformer.layers),
        "params_m": round(n_params / 1e6, 1),
        "adapter_params_m": round(n_adapter / 1e6, 2),
        "weights_fp32_mb": round(weights_mb, 1),
        "rss_after_build_mb": round(loaded, 1),
        "precision": args.precision,
        "checkpointing": args.checkpointing,
        "rank": args.rank,
        "rows": rows,
        "fit": fit,
    }
    append_result(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
