"""scripts/gpu_check.sh (bench/gpu_check.py): what can be checked without a GPU — the no-CUDA exit, the pure
helpers (judgements, KL, the table), the per-section time budget, README's rows from a GPU record, and one
section's logic on tiny CPU models (`--device cpu --smoke`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check as gc
from bench import table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_without_cuda_it_exits_at_once_saying_nothing_was_checked():
    t0 = time.monotonic()
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == gc.NO_CUDA_EXIT == 77, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "nothing was checked" in proc.stdout
    assert elapsed < 60  # import torch, check, exit: no model is built


def test_judgements():
    assert gc.loss_falls([7.6, 7.4, 7.0]) and not gc.loss_falls([7.6, 7.59])  # < 1% lower is not falling
    assert not gc.loss_falls([7.6, math.nan, 5.0]) and not gc.loss_falls([7.6])
    assert gc.all_finite([1.0, 2.0]) and not gc.all_finite([1.0, math.inf])
    assert gc.rel_diff(1.03, 1.0) == pytest.approx(0.03)
    assert gc.max_abs_diff([1.0, 2.0], [1.0, 2.5]) == 0.5 and gc.max_abs_diff([1.0], [1.0, 2.0]) == math.inf
    assert gc.kl_status(0.009) == "PASS" and gc.kl_status(0.01) == "FAIL" and gc.kl_status(math.nan) == "FAIL"
    assert gc.exit_code([gc.make_row("a", "b", "PASS", ""), gc.make_row("a", "c", "SKIP", "")]) == 0
    assert gc.exit_code([gc.make_row("a", "b", "PASS", ""), gc.make_row("a", "c", "FAIL", "")]) == 1
    with pytest.raises(ValueError):
        gc.make_row("a", "b", "OK", "")


def test_kl_divergence_matches_the_closed_form():
    logits = torch.randn(3, 4, 16)
    assert gc.kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert gc.kl_divergence(logits, logits + 5.0) == pytest.approx(0.0, abs=1e-9)  # a shift changes nothing
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    expected = float((p * (p / q).log()).sum())
    assert gc.kl_divergence(p.log(), q.log()) == pytest.approx(expected, rel=1e-6)
    assert gc.kl_divergence(p.log(), q.log()) != pytest.approx(gc.kl_divergence(q.log(), p.log()))


def test_table_formats_every_status_and_escapes_pipes():
    rows = [
        gc.make_row("train", "bf16: finite, loss falls", "PASS", "7.6 -> 7.0", "finite"),
        gc.make_row("dist", "DDP", "SKIP", "skipped: one GPU"),
        gc.failure_row("cog", "exited with code 1; log: a | b\nc"),
    ]
    text = gc.format_table(rows)
    lines = text.splitlines()
    assert lines[0] == "| section | check | status | result | goal |"
    assert "| train | bf16: finite, loss falls | PASS | 7.6 -> 7.0 | finite |" in lines
    assert "| dist | DDP | SKIP | skipped: one GPU | – |" in lines
    assert any("**FAIL**" in line and "a \\| b c" in line for line in lines)
    assert lines[-1] == "1 PASS, 1 FAIL, 1 SKIP, 0 INFO"


def test_a_section_past_its_budget_is_a_fail_row_and_keeps_its_finished_rows(tmp_path):
    rows_path, log_path = tmp_path / "rows.jsonl", tmp_path / "log.txt"
    script = (
        "import json, sys, time\n"
        f"open({str(rows_path)!r}, 'a').write(json.dumps({gc.make_row('x', 'first', 'PASS', 'ok')!r}) + '\\n')\n"
        "print('working', flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    rows = gc.run_child("x", [sys.executable, "-c", script], 3.0, rows_path, log_path)
    assert time.monotonic() - t0 < 30
    assert [r["status"] for r in rows] == ["PASS", "FAIL"]
    assert "timed out after its budget of 3 s (1 rows above finished)" in rows[1]["result"]
    assert "working" in rows[1]["result"]


def test_a_crashed_or_silent_section_is_a_fail_row(tmp_path):
    crashed = gc.run_child(
        "y", [sys.executable, "-c", "raise SystemExit('boom')"], 30, tmp_path / "a.jsonl", tmp_path / "a.log"
    )
    assert len(crashed) == 1 and crashed[0]["status"] == "FAIL" and "exited with code 1" in crashed[0]["result"]
    assert "boom" in crashed[0]["result"]
    silent = gc.run_child("z", [sys.executable, "-c", "pass"], 30, tmp_path / "b.jsonl", tmp_path / "b.log")
    assert silent[0]["status"] == "FAIL" and "reported nothing" in silent[0]["result"]
    (tmp_path / "c.jsonl").write_text('{"status": "PASS", "section": "s", "check": "c"}\n{"status": "PA')  # cut off
    assert len(gc.read_rows(tmp_path / "c.jsonl")) == 1


def test_a_failing_check_is_reported_and_the_section_goes_on(tmp_path):
    ctx = gc.Context("s", "cpu", True, tmp_path / "rows.jsonl", tmp_path)
    with ctx.guard("first"):
        raise RuntimeError("CUDA out of memory")
    ctx.add("second", "PASS", "fine")
    rows = gc.read_rows(tmp_path / "rows.jsonl")
    assert [(r["check"], r["status"]) for r in rows] == [("first", "FAIL"), ("second", "PASS")]
    assert rows[0]["result"] == "RuntimeError: CUDA out of memory"


def _gpu_record() -> dict:
    row = gc.make_row
    return {
        "bench": "gpu_check",
        "date": "2026-12-02T00:00:00+00:00",
        "device": "cuda",
        "smoke": False,
        "gpu": "1x NVIDIA H200 (140 GiB)",
        "torch": "2.11.0",
        "cuda": "13.0",
        "rows": [
            row("train", "bf16: finite, loss falls", "PASS", "..."),
            row("dist", "DDP / FSDP on NCCL vs one process", "SKIP", "skipped: one GPU"),
            row("sampler", "fp16 next-token KL vs fp32", "PASS", "...", kl_mean=0.0004),
            row(
                "sampler",
                "speed vs audiocraft, batch 1",
                "PASS",
                "...",
                batch=1,
                ratio=2.5,
                duration=10.0,
                ours={"steps_per_s": 150.0, "samples_per_s": 0.3, "real_time_factor": 3.0},
                audiocraft={"steps_per_s": 60.0, "samples_per_s": 0.12, "real_time_factor": 1.2},
            ),
            row(
                "sampler",
                "speed vs audiocraft, batch 4",
                "FAIL",
                "...",
                batch=4,
                ratio=0.9,
                duration=10.0,
                ours={"steps_per_s": 50.0, "samples_per_s": 0.4, "real_time_factor": 4.0},
                audiocraft={"steps_per_s": 55.0, "samples_per_s": 0.44, "real_time_factor": 4.4},
            ),
            row(
                "memory",
                "small LoRA r16 vs full, bf16, 30 s x 1",
                "PASS",
                "...",
                ratio=0.4,
                lora_peak_allocated_mb=4096.0,
                lora_seconds=30.0,
            ),
            row(
                "memory",
                "medium LoRA r16 + grad checkpointing, bf16, 30 s x 1",
                "PASS",
                "...",
                peak_allocated_mb=9000.0,
                peak_reserved_mb=10240.0,
                seconds=30.0,
            ),
            row("memory", "medium full fine-tuning per-GPU peak: FSDP vs DDP", "SKIP", "skipped: one GPU"),
        ],
    }


def test_readme_rows_from_a_gpu_record(tmp_path, monkeypatch):
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    assert table.gpu_check_rows() == []
    smoke = {**_gpu_record(), "device": "cpu", "smoke": True}
    (tmp_path / "gpu_check.jsonl").write_text(json.dumps(_gpu_record()) + "\n" + json.dumps(smoke) + "\n")
    rows = table.gpu_check_rows()  # the smoke line (newer) is not a GPU result: the CUDA one is shown
    assert all(len(r) == 9 for r in rows)
    by_name = {}
    for r in rows:
        by_name.setdefault(r[0], []).append(r)
    summary = by_name["GPU self-check (`scripts/gpu_check.sh`)"][0]
    assert summary[3] == "5 pass, 1 fail, 2 skipped" and summary[6] == "**no**"
    assert "failing: sampler: speed vs audiocraft, batch 4" in summary[1]
    b1, b4 = by_name["GPU generate (gpu_check)"]
    assert b1[2:7] == ("audiocraft 60.0 steps/s", "150.0 steps/s", "2.50x", "≥ 1x, KL < 0.01", "yes")
    assert "fp16 KL 0.00040" in b1[1] and b4[4:7] == ("0.90x", "≥ 1x", "**no**")
    lora = by_name["GPU train memory (gpu_check)"][0]
    assert lora[2:5] == ("full 10.0 GiB", "LoRA 4.0 GiB", "0.40x")
    assert by_name["GPU LoRA memory (gpu_check)"][0][3] == "10.0 GiB CUDA peak reserved"
    assert "GPU FSDP memory (gpu_check)" not in by_name  # skipped on one GPU
    assert summary[7].startswith("1x NVIDIA H200")


@pytest.mark.slow
def test_cpu_smoke_of_the_training_section(tmp_path):
    """The train section's real logic (train_loop in fp32/bf16, checkpointing) on the tiny architecture."""
    out = tmp_path / "gpu_check.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke", "--sections", "train"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    statuses = {r["check"]: r["status"] for r in record["rows"]}
    assert statuses["fp32: finite, loss falls"] == statuses["bf16: finite, loss falls"] == "PASS", statuses
    assert statuses["fp16: finite, loss falls (GradScaler)"] == "SKIP"  # CUDA only
    assert statuses["gradient checkpointing on vs off, fp32"] == "PASS"
    assert record["device"] == "cpu" and record["smoke"] is True
    assert "| train | bf16 vs fp32 after 6 steps | PASS |" in proc.stdout


def test_run_comparison_and_speed_summary():
    single = {"history": [{"loss": 5.0}, {"loss": 4.0}], "model": {"w": torch.ones(3), "b": torch.zeros(2)}}
    run = {"history": [{"loss": 5.0}, {"loss": 4.0001}], "model": {"w": torch.ones(3) + 1e-6, "b": torch.zeros(2)}}
    loss_d, weight_d = gc.compare_runs(run, single)
    assert loss_d == pytest.approx(1e-4, rel=1e-3) and weight_d == pytest.approx(1e-6, rel=0.1)
    assert gc.compare_runs({**run, "model": {"w": torch.ones(3)}}, single)[1] == math.inf  # a missing weight
    s = gc.speed_summary([2.0, 1.0, 4.0], steps=100, duration=8.0, batch=4)
    assert s["seconds"] == 2.0 and s["steps_per_s"] == 50.0 and s["real_time_factor"] == 16.0
    assert s["samples_per_s"] == 2.0 and s["runs"] == [2.0, 1.0, 4.0]


# ------------------------------------------------------------------ the first GPU run: device command and Cog rows
def _wheel(folder: Path, name: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding `files` (what pip --target installs), RECORD with real hashes."""
    import base64
    import hashlib
    import zipfile

    dist_info = f"{name}-1.0.dist-info"
    files = {
        **files,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _device_env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "OUT", "GPU_CHECK_PYTHON", "MGFT_CACHE")}
    return {**env, **extra}


def test_device_command_without_wheels_stops_at_once_saying_what_to_carry(tmp_path):
    proc = subprocess.run(
        [str(ROOT / "bench" / "gpu_device.sh"), "--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_device_env(),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"gpu_device: no wheels in {tmp_path / 'none'}/ (was it carried?): run bench/gpu_env.sh on the build machine,"
        " then carry '.whl' with the device command"
    ]
    assert not (tmp_path / "out" / "gpu_check.txt").exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_device_command_installs_the_wheels_and_keeps_the_checks_exit_status(tmp_path):
    """The device command as on the lent machine (no HOME in the environment, a wheel that ships a top-level `tests`
    package as flashy's does): the wheels land in the target without that package, and gpu_check's own exit
    status (77 here: no CUDA) comes back with its output in the out folder."""
    wheels = tmp_path / "wheels"
    _wheel(wheels, "stray", {"stray_mod.py": "X = 1\n", "tests/__init__.py": "", "tests/test_x.py": "X = 2\n"})
    target, out = tmp_path / "site", tmp_path / "out"
    cmd = [str(ROOT / "bench" / "gpu_device.sh"), "--wheels", str(wheels), "--target", str(target)]
    cmd += ["--python", sys.executable, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_device_env())
    assert proc.returncode == gc.NO_CUDA_EXIT, proc.stdout + proc.stderr
    assert (target / "stray_mod.py").is_file() and not (target / "tests").exists()
    assert "nothing was checked" in (out / "gpu_check.txt").read_text()


def test_the_python_wrapper_is_this_interpreter_with_its_packages(tmp_path):
    """coglet starts its worker as a bare `python`: the wrapper must be the same interpreter with the same packages
    (a symlink to a venv's python starts the base interpreter, without the venv)."""
    folder = gc.python_wrapper(tmp_path / "bin", sys.executable)
    proc = subprocess.run(
        ["python", "-c", "import sys, torch; print(sys.prefix, sys.executable)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(folder)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [sys.prefix, sys.executable]


def test_a_cog_server_that_cannot_start_fails_within_the_budget_with_coglets_error_line(tmp_path):
    """The real coglet server: its worker `python` missing (SETUP_FAILED at once), then a `python` without coglet
    (never ready): each is a one-line reason without colour codes, the second within the section's budget."""
    from tests.helpers import CogServer

    empty = tmp_path / "empty"
    empty.mkdir()
    ctx = gc.Context("cog", "cpu", True, None, tmp_path, budget_s=10.0)
    server = CogServer(tmp_path, env={"PATH": str(empty), "CUDA_VISIBLE_DEVICES": ""})
    try:
        with pytest.raises(RuntimeError) as missing:
            gc.wait_for_cog(ctx, server)
    finally:
        server.stop()
    reason = str(missing.value)
    assert reason.startswith("setup failed: coglet: Worker initialization failed"), reason
    assert "No such file or directory" in reason and "\x1b" not in reason and "INFO" not in reason
    # `python` is an interpreter without coglet: the worker dies at import, the server never answers READY
    bare = gc.python_wrapper(tmp_path / "bare", "/usr/bin/python3")
    ctx = gc.Context("cog", "cpu", True, None, tmp_path, budget_s=10.0)
    server = CogServer(tmp_path, env={"PATH": f"{bare}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as never:
            gc.wait_for_cog(ctx, server)
    finally:
        server.stop()
    assert time.monotonic() - t0 < ctx.budget_s
    assert str(never.value).startswith("Cog server not ready after 5 s: ")
    assert "No module named 'coglet'" in str(never.value) and "\x1b" not in str(never.value)


# ------------------------------------------------------------------------------------ training throughput rows
def test_training_flops_count_every_weight_multiplied_per_position():
    """The model FLOPs behind MFU, against a count made from the modules (Linear weights, attention in-projections:
    self-attention whole, cross-attention's query third) on the tiny LM."""
    from audiocraft.modules.transformer import StreamingMultiheadAttention

    lm = gc.build_lm("tiny", "cpu")
    n = 0
    for name, module in lm.named_modules():
        if name.startswith("condition_provider"):
            continue
        if isinstance(module, torch.nn.Linear):
            n += module.weight.numel()
        elif isinstance(module, StreamingMultiheadAttention) and getattr(module, "in_proj_weight", None) is not None:
            n += module.in_proj_weight.numel() // (3 if module.cross_attention else 1)
    layers, dim, frames = len(lm.transformer.layers), lm.dim, 50
    attention = 4 * layers * frames * dim  # QK^T and AV per position, forward
    assert gc.train_flops(lm, 3, frames, lora=False) == pytest.approx(3 * frames * (6 * n + 3 * attention))
    assert gc.train_flops(lm, 3, frames, lora=True) == pytest.approx(3 * frames * (4 * n + 3 * attention))


def test_fitting_batch_and_the_projection_of_the_default_run():
    # 10 GiB fixed + 4 GiB per sample on 80 GiB: (0.85 x 80 - 10) / 4 = 14.5 -> 14; capped at 16; at least 1
    assert gc.fitting_batch(14.0, 18.0, 80.0, cap=16) == 14
    assert gc.fitting_batch(14.0, 18.0, 800.0, cap=16) == 16
    assert gc.fitting_batch(70.0, 130.0, 80.0, cap=16) == 1
    assert gc.DEFAULT_RUN == {"updates": 300, "batch": 16, "seconds": 30.0, "tracks": 10}
    assert gc.projected_run_s(0.5, 16) == 150.0  # 300 updates of one micro-batch
    assert gc.projected_run_s(0.5, 5) == 300 * 4 * 0.5  # 16 = 4 micro-batches of at most 5


def test_adamw_is_fused_on_cuda_only():
    """fused AdamW is a CUDA speed-up: on CPU the optimizer is torch's default one, so CPU results stay as they
    were (the training tests' expected losses)."""
    from training.loop import build_optimizer

    weights = [torch.nn.Parameter(torch.randn(4, 4))]
    optimizer = build_optimizer(gc.train_params(optimizer="adamw"), weights)
    assert optimizer.defaults["fused"] is None


@pytest.mark.slow
def test_cpu_smoke_of_the_throughput_rows(tmp_path):
    """The throughput section's real code (train_loop at batch 1, 2 and the batch that fits, the FLOPs, the
    projection) on the tiny LM: a typo cannot wait for the GPU to show up."""
    out = tmp_path / "gpu_check.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke", "--sections"]
        + ["throughput", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text().splitlines()[-1])["rows"]
    assert [(r["check"], r["status"]) for r in rows] == [
        ("tiny full throughput, bf16, 1 s x batch that fits", "INFO"),
        ("tiny LoRA r16 throughput, bf16, 1 s x batch that fits", "INFO"),
    ]
    full, lora = (r["values"] for r in rows)
    for v in (full, lora):
        assert v["batch"] == 2 and v["step_s"] > 0 and v["tokens_per_s"] == pytest.approx(2 * 50 / v["step_s"], 0.01)
        assert v["step_tflop"] > 0 and v["projected_here_s"] == pytest.approx(300 * 8 * v["step_s"], 0.01)
        assert v["mfu"] is None and "MFU: no CPU peak" in rows[0]["result"]
    assert lora["trainable_m"] < full["trainable_m"] and lora["step_tflop"] < full["step_tflop"]
    assert "default fine-tune (300 updates of 16 x 30 s)" in rows[0]["result"]
