"""The README's benchmark table, from the latest line of each `bench/results/*.jsonl`.

    .venv/bin/python bench/table.py          # print the table
    .venv/bin/python bench/table.py --write  # replace the table between the markers in README.md

tests/test_packaging.py checks that README.md shows what this prints, so the README always carries the latest
measured numbers and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def latest(name: str, **match: object) -> dict | None:
    """The newest record of `bench/results/<name>.jsonl` whose top-level fields equal `match`."""
    path = RESULTS / f"{name}.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return records[-1] if records else None


def _met(value: float, goal: float, higher: bool = True) -> str:
    return "yes" if (value >= goal if higher else value <= goal) else "**no**"


def _eval_cost(ev: dict) -> tuple[str, str]:
    """The evaluation-overhead row's measured cells: validation alone (older records), or validation plus the
    samples during training and their sum (issue 22's records)."""
    if "total_overhead" not in ev:
        return (
            f"evaluation {ev['eval_s']:.1f} s",
            f"{ev['overhead']:.1%} ({ev['overhead_at_100_steps_per_epoch']:.1%} at 100 steps/epoch)",
        )
    return (
        f"validation {ev['eval_s']:.1f} s + samples during training {ev['samples_s']:.1f} s",
        f"{ev['total_overhead']:.1%} (validation {ev['overhead']:.1%}, samples {ev['samples_overhead']:.1%})",
    )


def rows() -> list[tuple[str, ...]]:
    """(benchmark, what, baseline, ours, ratio, goal, met, machine, date)."""
    out = []
    gen = latest("generate")
    if gen:
        b1, b4 = gen["batch1"], gen.get("batch4")
        kl = gen.get("kl", {}).get("kl_mean")
        settings = gen["settings"]
        what = f"{settings['duration']:g} s, top-k {settings['top_k']}, cfg {settings['cfg_coef']:g}"
        what += f", {gen['threads']} threads; int8 KL {kl:.5f} nats/token" if kl is not None else ""
        out.append(
            (
                "generate (`bench/generate.py`)",
                f"musicgen-small arch, batch 1, {what}",
                f"audiocraft {b1['audiocraft']['steps_per_s']} steps/s",
                f"{b1['ours']['steps_per_s']} steps/s",
                f"{gen['ratio_batch1']:.2f}x",
                "≥ 3x, KL < 0.01",
                _met(gen["ratio_batch1"], 3.0) if kl is None or kl < 0.01 else "**no**",
                gen["machine"],
                gen["date"][:10],
            )
        )
        if b4:
            out.append(
                (
                    "generate, batch 4",
                    "4 samples in one call",
                    f"audiocraft {b4['audiocraft']['samples_per_s']} samples/s",
                    f"{b4['ours']['samples_per_s']} samples/s",
                    f"{gen['ratio_batch4']:.2f}x",
                    "–",
                    "–",
                    gen["machine"],
                    gen["date"][:10],
                )
            )
    for arch in ("small", "small-melody"):
        ts = latest("train_step", arch=arch)
        if not ts or "memory_rows" not in ts:
            continue
        by = {(r["mode"], r["precision"]): r for r in ts["rows"]}
        precisions = list(dict.fromkeys(r["precision"] for r in ts["rows"]))
        ratios = [ts["ratios"][f"reencode_over_cached_{p}"] for p in precisions]
        out.append(
            (
                "train step (`bench/train_step.py`)",
                f"{arch} arch, batch {ts['batch']} x {ts['segment_s']:g} s, cached codes"
                + (" + chroma" if "melody" in arch else "")
                + f" vs re-encoding each step, {' / '.join(precisions)}",
                " / ".join(f"{by[('reencode', p)]['step_s']:.1f}" for p in precisions) + " s/step",
                " / ".join(f"{by[('cached', p)]['step_s']:.1f}" for p in precisions) + " s/step",
                " / ".join(f"{r:.2f}x" for r in ratios),
                "≥ 1.5x",
                " / ".join(_met(r, 1.5) for r in ratios),
                ts["machine"] + f"; {ts['device']}",
                ts["date"][:10],
            )
        )
        mem = {r["method"]: r for r in ts["memory_rows"]}
        if {"full", "lora"} <= set(mem):
            weights_mb = ts["lm_params_m"] * 1e6 * 4 / 2**20  # fp32 LM weights

            def tensors(row: dict, weights_mb: float = weights_mb) -> float:
                """LM weights + what a step adds (`bench/train_step.training_memory_mb`)."""
                return row.get("weights_mb", weights_mb) + row["peak_mb"] - row["before_mb"]

            process = mem["lora"]["peak_mb"] / mem["full"]["peak_mb"]
            training = tensors(mem["lora"]) / tensors(mem["full"])
            out.append(
                (
                    "train step memory",
                    f"{arch} arch, LoRA r16 vs full fine-tuning: whole-process peak / LM weights + what a step adds",
                    f"full {mem['full']['peak_mb'] / 1024:.1f} / {tensors(mem['full']) / 1024:.1f} GiB",
                    f"LoRA {mem['lora']['peak_mb'] / 1024:.1f} / {tensors(mem['lora']) / 1024:.1f} GiB",
                    f"{process:.2f}x / {training:.2f}x",
                    "≤ 0.6x",
                    f"{_met(process, 0.6, higher=False)} / {_met(training, 0.6, higher=False)}",
                    ts["machine"] + f"; {ts['device']}",
                    ts["date"][:10],
                )
            )
    prep = latest("prepare", bench="prepare")
    if prep:
        out.append(
            (
                "prepare (`bench/prepare.py`)",
                f"{prep['tracks']} tracks, {prep['audio_seconds'] / 60:g} min, no demucs/tags",
                "real time",
                f"{prep['wall_seconds']:.1f} s",
                f"{prep['real_time_factor']:.1f}x real time",
                "≥ 50x",
                _met(prep["real_time_factor"], 50.0),
                prep["machine"],
                prep["date"][:10],
            )
        )
    demucs = latest("prepare", bench="prepare_demucs")
    if demucs:
        one, *more = demucs["runs"]
        best = max(more, key=lambda r: r["ratio"]) if more else one
        out.append(
            (
                "prepare with vocal removal (`bench/prepare.py --demucs`)",
                f"{demucs['tracks']} tracks, {demucs['audio_seconds'] / 60:g} min, random real-size htdemucs, "
                f"{best['processes']} processes on {demucs['device']}",
                f"1 process: {one['real_time_factor']:.3f}x real time",
                f"{best['real_time_factor']:.3f}x real time",
                f"{best['ratio']:.2f}x",
                "~N x on N GPUs (measured on a GPU machine)",
                "–" if demucs["device"] == "cpu" else _met(best["ratio"], 0.8 * best["processes"]),
                demucs["machine"],
                demucs["date"][:10],
            )
        )
    micro = latest("micro_speed")
    if micro:
        r = micro["rows"]
        out.append(
            (
                "micro model (`bench/micro_speed.py`)",
                f"micro ({r['micro']['params_m']:.0f} M) vs musicgen-small arch ({r['small']['params_m']:.0f} M), "
                "LM steps/s",
                f"{r['small']['lm_steps_per_s']} steps/s",
                f"{r['micro']['lm_steps_per_s']} steps/s",
                f"{micro['speed_ratio']:.2f}x",
                "–",
                "–",
                micro["machine"],
                micro["date"][:10],
            )
        )
    lm = latest("lora_memory", arch="medium", layers=48, checkpointing=True)
    if lm and lm.get("fit"):
        out.append(
            (
                "LoRA memory (`bench/lora_memory.py`)",
                "musicgen-medium arch (48 layers), LoRA r16, bf16, grad checkpointing, 30 s x batch 1 (fit)",
                "–",
                f"{lm['fit']['batch1_30s_mb'] / 1024:.1f} GiB CPU peak",
                "–",
                "fits 24 GB",
                _met(lm["fit"]["batch1_30s_mb"] / 1024, 24.0, higher=False),
                lm["machine"],
                lm["date"][:10],
            )
        )
    ev = latest("eval_overhead")
    if ev:
        out.append(
            (
                "evaluation overhead (`bench/eval_overhead.py`)",
                f"{ev['arch']} model, {ev['steps']} steps x batch {ev['batch']} x {ev['segment_s']:.0f} s, "
                f"{ev['validation_crops']} held-out crops, {ev['evaluations']} evaluations",
                f"training {ev['train_s']:.0f} s",
                *_eval_cost(ev),
                f"<= {ev['goal'] * 100:.0f} %",
                _met(ev.get("total_overhead", ev["overhead"]), ev["goal"], higher=False),
                ev["machine"],
                ev["date"][:10],
            )
        )
    out += gpu_check_rows()
    return out


def _find(record: dict, section: str, prefix: str) -> dict | None:
    """The first row of a gpu_check record in `section` whose check starts with `prefix`."""
    return next((r for r in record["rows"] if r["section"] == section and r["check"].startswith(prefix)), None)


def _status(row: dict) -> str:
    return {"PASS": "yes", "FAIL": "**no**"}.get(row["status"], row["status"].lower())


def gpu_check_rows() -> list[tuple[str, ...]]:
    """Rows of the latest CUDA run of `scripts/gpu_check.sh` (bench/gpu_check.py), when there is one."""
    gc = latest("gpu_check", device="cuda", smoke=False)
    if not gc:
        return []
    machine, date = f"{gc['gpu']}; torch {gc['torch']}, CUDA {gc['cuda']}", gc["date"][:10]
    rows = gc["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    failing = [f"{r['section']}: {r['check']}" for r in rows if r["status"] == "FAIL"]
    out = [
        (
            "GPU self-check (`scripts/gpu_check.sh`)",
            f"{len(rows)} checks: bf16/fp16 training, DDP/FSDP on NCCL, fp16 sampler, CUDA memory, Cog server"
            + (f"; failing: {'; '.join(failing)}" if failing else ""),
            "–",
            f"{counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skipped",
            "–",
            "no FAIL",
            "yes" if not failing else "**no**",
            machine,
            date,
        )
    ]
    kl = _find(gc, "sampler", "fp16 next-token KL")
    kl_text = f"; fp16 KL {kl['values']['kl_mean']:.5f} nats/token" if kl and "kl_mean" in kl["values"] else ""
    for batch in (1, 4):
        speed = _find(gc, "sampler", f"speed vs audiocraft, batch {batch}")
        if not speed or "ratio" not in speed["values"]:
            continue
        v = speed["values"]
        unit, key = ("steps/s", "steps_per_s") if batch == 1 else ("samples/s", "samples_per_s")
        out.append(
            (
                "GPU generate (gpu_check)",
                f"musicgen-small arch, fp16, batch {batch}, {v['duration']:g} s; RTF "
                f"{v['ours']['real_time_factor']:.2f} vs {v['audiocraft']['real_time_factor']:.2f}"
                + (kl_text if batch == 1 else ""),
                f"audiocraft {v['audiocraft'][key]} {unit}",
                f"{v['ours'][key]} {unit}",
                f"{v['ratio']:.2f}x",
                "≥ 1x" + (", KL < 0.01" if batch == 1 else ""),
                _status(speed) if batch != 1 or not kl or kl["status"] != "FAIL" else "**no**",
                machine,
                date,
            )
        )
    lora = _find(gc, "memory", "small LoRA r16 vs full")
    if lora and "ratio" in lora["values"]:
        v = lora["values"]
        full_mb = v["lora_peak_allocated_mb"] / v["ratio"]
        out.append(
            (
                "GPU train memory (gpu_check)",
                f"small arch, LoRA r16 vs full, bf16, {v['lora_seconds']:g} s x batch 1: CUDA peak allocated",
                f"full {full_mb / 1024:.1f} GiB",
                f"LoRA {v['lora_peak_allocated_mb'] / 1024:.1f} GiB",
                f"{v['ratio']:.2f}x",
                "≤ 0.6x",
                _status(lora),
                machine,
                date,
            )
        )
    medium = _find(gc, "memory", "medium LoRA")
    if medium and "peak_allocated_mb" in medium["values"]:
        v = medium["values"]
        out.append(
            (
                "GPU LoRA memory (gpu_check)",
                f"musicgen-medium arch, LoRA r16, bf16, grad checkpointing, {v['seconds']:g} s x batch 1",
                "–",
                f"{v['peak_reserved_mb'] / 1024:.1f} GiB CUDA peak reserved",
                "–",
                "fits 24 GB",
                _status(medium),
                machine,
                date,
            )
        )
    sharded = _find(gc, "memory", "medium full fine-tuning per-GPU peak: FSDP vs DDP,")
    if sharded and "ddp" in sharded["values"]:
        v = sharded["values"]
        ddp, fsdp = v["ddp"]["max_peak_mb"], v["fsdp"]["max_peak_mb"]
        out.append(
            (
                "GPU FSDP memory (gpu_check)",
                f"musicgen-medium arch, full fine-tuning, {len(v['ddp']['ranks'])} GPUs: per-GPU peak allocated",
                f"DDP {ddp / 1024:.1f} GiB",
                f"FSDP {fsdp / 1024:.1f} GiB",
                f"{fsdp / ddp:.2f}x",
                "FSDP < DDP",
                _status(sharded),
                machine,
                date,
            )
        )
    return out


def render() -> str:
    head = ("benchmark", "what", "baseline", "ours", "ratio", "goal", "met", "machine", "date")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines)


def write_readme(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{BEGIN}\n{render()}\n{END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    if args.write:
        write_readme()
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
