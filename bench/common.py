"""What every benchmark records beside its numbers: the machine (CPU model, cores), the commit, the load."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISA_FEATURES = (("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"), ("amx_int8", "AMX"))


def machine_name() -> str:
    """e.g. `AMD EPYC (AVX-512 VNNI, AVX-512 BF16), 2 cores, 23 GiB, Linux x86_64`: the CPU model and the vector
    extensions the int8/bf16 kernels depend on, from /proc where there is one."""
    model, features, mem_gib = platform.processor() or platform.machine(), [], None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                features = [name for flag, name in ISA_FEATURES if flag in flags]
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20)
    except OSError:
        pass
    isa = f" ({', '.join(features)})" if features else ""
    mem = f", {mem_gib} GiB" if mem_gib else ""
    return f"{model}{isa}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.machine()}"


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def load_average() -> float:
    """The 1-minute load average: other work on the machine slows every configuration of a run."""
    return round(os.getloadavg()[0], 2)


# glibc raises its mmap threshold after the first large free (up to 32 MB), after which tensors of up to 32 MB come
# from heap arenas that fragment and are not given back: resident memory then grows step after step far beyond the
# live tensors (measured: +1.7 GB instead of +0.2 GB over one LoRA step of 6 medium layers). A fixed threshold keeps
# every large tensor in its own mapping, returned on free, so peak RSS tracks what is really allocated.
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def exact_rss_env() -> dict[str, str]:
    """The environment for a child process whose peak resident memory is measured."""
    return {**os.environ, **EXACT_RSS_ENV}


def reexec_for_exact_rss() -> None:
    """Restart this script with `EXACT_RSS_ENV` (glibc reads it at start only) unless it is already set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], exact_rss_env())


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`: the peak) in MiB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, Linux >= 4.0) so a later peak is that of the work since; False
    where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def append_result(path: str | Path, record: dict) -> Path:
    """Append one benchmark record as a JSON line to `path` (bench/results/<name>.jsonl) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {path}")
    return path
