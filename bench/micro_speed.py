"""Benchmark: parameter count and generation speed of a `micro` LM (trained from scratch, unconditional; the
micro-musicgen config: 2048 dims, 2 heads, 2 layers) against the musicgen-small architecture, random weights, on
this machine, LM sampling only (the same EnCodec decodes both).

    .venv/bin/python bench/micro_speed.py [--seconds 2]

Appends a JSON line to bench/results/micro_speed.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import append_result, machine_name  # noqa: E402
from core import tiny  # noqa: E402


def build(kind: str):
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    from core.params import from_kwargs
    from training.methods.scratch import scratch_lm_cfg
    from training.params import TrainParams

    if kind == "micro":
        cfg = scratch_lm_cfg(from_kwargs(TrainParams, dataset_path="x", model_version="micro"), n_q=4, card=2048)
    else:  # musicgen-small's LM (a LUT in place of T5's projection: same cross-attention cost)
        cfg = tiny.lm_cfg("tiny")
        cfg["transformer_lm"].update(card=2048, dim=1024, num_heads=16, num_layers=24)
        cfg["conditioners"]["description"]["lut"]["dim"] = 1024
    torch.manual_seed(0)
    return builders.get_lm_model(OmegaConf.create(cfg)).eval()


@torch.no_grad()
def steps_per_second(lm, seconds: float, cfg_coef: float) -> float:
    from audiocraft.modules.conditioners import ConditioningAttributes

    text = {"description": "lofi beat"} if lm.condition_provider.conditioners else {}
    attributes = [ConditioningAttributes(text=text)]
    frames = int(seconds * 50)
    lm.generate(None, attributes, max_gen_len=5, use_sampling=True, top_k=250, cfg_coef=cfg_coef)  # warm-up
    t0 = time.perf_counter()
    lm.generate(None, attributes, max_gen_len=frames, use_sampling=True, top_k=250, cfg_coef=cfg_coef)
    return frames / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "micro_speed.jsonl"))
    args = parser.parse_args(argv)
    rows = {}
    for kind, cfg_coef in (("micro", 1.0), ("small", 3.0)):  # micro is unconditional: no CFG batch doubling
        lm = build(kind)
        params = sum(p.numel() for p in lm.parameters())
        speed = steps_per_second(lm, args.seconds, cfg_coef)
        rows[kind] = {"params_m": round(params / 1e6, 1), "lm_steps_per_s": round(speed, 2), "cfg_coef": cfg_coef}
        print(f"{kind}: {params / 1e6:.1f} M parameters, {speed:.1f} LM steps/s ({speed / 50:.2f}x real time)")
        del lm
    ratio = rows["micro"]["lm_steps_per_s"] / rows["small"]["lm_steps_per_s"]
    print(f"micro / small: {rows['micro']['params_m'] / rows['small']['params_m']:.2f}x parameters, {ratio:.1f}x speed")
    record = {
        "bench": "micro_speed",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_name(),
        "device": f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "seconds": args.seconds,
        "rows": rows,
        "speed_ratio": round(ratio, 2),
    }
    append_result(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
