"""Behaviour snapshot: the bytes our entry points produce on the tiny models, for a before/after comparison.

    .venv/bin/python scripts/behaviour_snapshot.py --out bench/results/behaviour-<commit>.json
    .venv/bin/python scripts/behaviour_snapshot.py --compare A.json B.json

Snapshot mode runs a fixed set of trainings (`train.py`'s CLI, in this process: full, lora, lora merged,
textual_inversion, text_projection, prior preservation, validation, on tiny, tiny-melody, tiny-stereo,
tiny-style, tiny-micro; a few steps each) and predictions (`predict.py`'s CLI: fixed seeds, sampler_precision
`none` and `auto`; text, melody, continuation, stereo, style, and the trained tars as weights, LoRA at two scales),
and writes one JSON holding:

- per trained tar: the sha256 of every member; for `.bin`/`.safetensors` members the sha256 of every decoded
  tensor (dtype, shape, bytes); for JSON members the parsed content with the VOLATILE fields (below) replaced by
  "<volatile>"; for report.html the sha256 of the page with those fields' rows masked; the sha256 of the model
  card (`training.publish.model_card`) rendered from the masked finetune.json.
- per prediction: the sha256 of the output wav.

VOLATILE are the only fields that legitimately differ between two runs of the same commit (wall-clock time,
memory, throughput, temporary paths): listed in `VOLATILE_KEYS`. Everything else must be bitwise equal; a
member whose raw sha256 differs only because of them is reported as such, not as a difference.

Deterministic by construction: one torch thread (`OMP_NUM_THREADS=1` before torch loads), fixed seeds, offline,
tiny models from the per-machine cache (`MGFT_CACHE`, as the tests). Run it twice on one commit and `--compare`
the two files: no difference. Heavy (torch for a few minutes): on a shared machine run it via the heavy lock.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SR = 32000

# Fields whose values depend on the clock, the machine's memory/speed, or the temporary folder of the run.
VOLATILE_KEYS = (
    "seconds",  # finetune.json training.seconds (wall clock)
    "tokens_per_s",  # finetune.json training, metrics.json per step (throughput)
    "step_s",  # metrics.json per step (wall clock)
    "peak_memory_mb",  # finetune.json training, metrics.json per step (allocator state)
    "dataset_path",  # finetune.json training_inputs (a temporary path)
    "validation_path",
    "resume_from",
    "eval_s",  # finetune.json / metrics.json validation.evaluations[*] (wall clock of one evaluation)
)
# safetensors writes its header's `__metadata__` from a Rust HashMap: with two keys or more their order (and so the
# file's bytes and its sha256 in finetune.json's `integrity`) changes from process to process. Such members are
# compared by their tensors and their parsed metadata; their integrity digests are masked. (`core.adapters.save_partial`
# now writes its metadata sorted, so its files are the same bytes; baselines taken before that are not.)
NONCANONICAL_SUFFIXES = (".safetensors",)

TRAININGS: dict[str, dict] = {
    "tiny-full": {"model_version": "tiny"},
    "tiny-lora": {"model_version": "tiny", "method": "lora", "optimizer": "adamw", "lr": 1e-3},
    "tiny-lora-merged": {
        "model_version": "tiny",
        "method": "lora",
        "lora_merge": True,
        "optimizer": "adamw",
        "lr": 1e-3,
    },
    "tiny-textual-inversion": {
        "model_version": "tiny",
        "method": "textual_inversion",
        "trigger": "zzq",
        "optimizer": "adamw",
        "lr": 0.05,
    },
    "tiny-text-projection": {"model_version": "tiny", "method": "text_projection", "optimizer": "adamw", "lr": 1e-3},
    "tiny-prior": {
        "model_version": "tiny",
        "prior_preservation": True,
        "class_prompt": "music",
        "class_samples": 2,
        "optimizer": "adamw",
        "lr": 1e-3,
    },
    "tiny-validation": {"model_version": "tiny", "validation_split": 0.4, "eval_every": 2, "dataset": "five"},
    "tiny-melody-full": {"model_version": "tiny-melody"},
    "tiny-stereo-full": {"model_version": "tiny-stereo", "dataset": "stereo"},
    "tiny-style-full": {
        "model_version": "tiny-style",
        "segment_duration": 5.0,
        "dataset": "long",
        "lr": 1e-3,
        "optimizer": "adamw",
    },
    "tiny-micro-scratch": {
        "model_version": "tiny-micro",
        "lm_dim": 64,
        "lm_heads": 2,
        "lm_layers": 2,
        "optimizer": "adamw",
        "lr": 3e-3,
        "warmup": 2,
    },
}

COMMON_TRAIN = {
    "auto_labeling": False,
    "drop_vocals": False,
    "epochs": 1,
    "updates_per_epoch": 4,
    "batch_size": 2,
    "segment_duration": 2.0,
    "sample_duration": 0.5,
    "save_every": 0,
    "seed": 42,
}


def _predictions() -> dict[str, dict]:
    """name -> predict inputs (and "weights": a training's name, given as replicate_weights)."""
    out: dict[str, dict] = {}
    for precision in ("none", "auto"):
        base = {"duration": 1, "seed": 7, "sampler_precision": precision, "top_k": 50}
        out[f"tiny-text-{precision}"] = {**base, "model_version": "tiny", "prompt": "lofi beat"}
        out[f"tiny-uncond-{precision}"] = {**base, "model_version": "tiny", "prompt": ""}
        out[f"tiny-continuation-{precision}"] = {
            **base,
            "model_version": "tiny",
            "prompt": "lofi beat",
            "input_audio": "melody.wav",
            "continuation": True,
            "continuation_end": 1,
            "duration": 2,
        }
        out[f"tiny-stereo-text-{precision}"] = {**base, "model_version": "tiny-stereo", "prompt": "lofi beat"}
        out[f"tiny-melody-melody-{precision}"] = {
            **base,
            "model_version": "tiny-melody",
            "prompt": "lofi beat",
            "input_audio": "melody.wav",
        }
        out[f"tiny-melody-text-{precision}"] = {**base, "model_version": "tiny-melody", "prompt": "lofi beat"}
        out[f"tiny-style-style-{precision}"] = {
            **base,
            "model_version": "tiny-style",
            "prompt": "lofi beat",
            "style_audio": "long.wav",
        }
    base = {"duration": 1, "seed": 7, "top_k": 50, "model_version": "fine-tuned"}
    for training in TRAININGS:
        prompt = "zzq lofi beat" if "textual" in training else "calm piano"
        extra = {"input_audio": "melody.wav"} if "melody" in training else {}
        extra = {"style_audio": "long.wav"} if "style" in training else extra
        out[f"weights-{training}"] = {**base, "prompt": prompt, "weights": training, **extra}
    out["weights-tiny-lora-scale-0.5"] = {**base, "prompt": "calm piano", "weights": "tiny-lora", "lora_scale": 0.5}
    out["weights-tiny-lora-scale-0"] = {**base, "prompt": "calm piano", "weights": "tiny-lora", "lora_scale": 0.0}
    return out


# ----------------------------------------------------------------------------------------------------- inputs


def _tone(seconds: float, freq: float, channels: int, seed: int):
    import numpy as np

    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    notes = freq * np.array([1.0, 1.25, 1.5, 2.0])
    step = np.floor(t * 2).astype(int) % len(notes)
    sig = 0.3 * np.sin(2 * np.pi * notes[step] * t) + 0.1 * np.sin(4 * np.pi * notes[step] * t)
    sig = sig + 0.01 * rng.standard_normal(len(t))
    return np.stack([sig * (1.0 - 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


def _prepared(folder: Path, specs: list[dict]) -> Path:
    """A prepared dataset (preprocessing's contract: clips, data.jsonl, one MusicInfo sidecar per clip)."""
    import soundfile as sf

    (folder / "clips").mkdir(parents=True)
    lines = []
    for i, spec in enumerate(specs):
        path = folder / "clips" / f"track{i:02d}_000.wav"
        data = _tone(spec["seconds"], spec["freq"], spec.get("channels", 1), seed=i)
        sf.write(str(path), data, SR, subtype="PCM_16")
        info = {"title": f"track{i:02d}", "artist": None, "key": None, "bpm": None, "genre": spec.get("genre"),
                "moods": None, "keywords": None, "description": spec["description"], "name": path.stem,
                "instrument": None, "source": f"track{i:02d}.wav", "channels": spec.get("channels", 1)}  # fmt: skip
        path.with_suffix(".json").write_text(json.dumps(info))
        meta = {"path": str(path.resolve()), "duration": len(data) / SR, "sample_rate": SR, "amplitude": None,
                "weight": None, "info_path": None}  # fmt: skip
        lines.append(json.dumps(meta))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _datasets(work: Path) -> dict[str, Path]:
    two = [
        {"seconds": 2.5, "freq": 220.0, "description": "calm piano", "genre": "jazz"},
        {"seconds": 2.0, "freq": 330.0, "description": "fast drums", "genre": "rock"},
    ]
    words = ("calm piano", "fast drums", "warm bass", "bright synth", "slow strings")
    five = [{"seconds": 2.5, "freq": 200.0 + 40 * i, "description": w} for i, w in enumerate(words)]
    return {
        "two": _prepared(work / "data-two", two),
        "five": _prepared(work / "data-five", five),
        "stereo": _prepared(work / "data-stereo", [{**s, "channels": 2} for s in two]),
        "long": _prepared(work / "data-long", [{**s, "seconds": 6.0} for s in two]),
    }


# ----------------------------------------------------------------------------------------------------- hashing


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mask(value, key: str | None = None):
    """`value` with every VOLATILE_KEYS field (at any depth) replaced by "<volatile>", and the integrity digests of
    members whose bytes are not canonical (NONCANONICAL_SUFFIXES). Applied again by --compare, so a key added to
    VOLATILE_KEYS later applies to older snapshots too."""
    if key in VOLATILE_KEYS and value is not None:
        return "<volatile>"
    if isinstance(value, dict):
        if key == "sha256":  # finetune.json integrity.sha256: {member: digest}
            return {k: "<volatile>" if k.endswith(NONCANONICAL_SUFFIXES) else v for k, v in value.items()}
        return {k: _mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def _tensor_hashes(name: str, data: bytes) -> dict[str, str]:
    """sha256 of every tensor (dtype, shape, bytes) in a torch pickle or a safetensors file, by its key path."""
    import torch

    if name.endswith(".safetensors"):
        from safetensors.torch import load

        tree = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        tree = {**tree, "__metadata__": dict(sorted((header.get("__metadata__") or {}).items()))}
    else:
        tree = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().reshape(-1).contiguous()  # 0-dim tensors cannot be viewed as bytes
            head = f"{t.dtype}|{tuple(t.shape)}|".encode()
            out[prefix] = _sha(head + t.view(torch.uint8).numpy().tobytes() if t.numel() else head)
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{prefix}.{k}" if prefix else str(k), value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            out[prefix] = _sha(repr(value).encode())

    walk("", tree)
    return out


_ROW = re.compile(r"(<tr><th>(?:" + "|".join(VOLATILE_KEYS) + r")</th><td(?: class='[^']*')?>)[^<]*(</td>)")


def _snapshot_tar(tar_path: Path) -> dict:
    from training.publish import model_card

    members: dict[str, dict] = {}
    finetune = None
    with tarfile.open(tar_path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            entry: dict = {"sha256": _sha(data), "size": len(data)}
            if member.name.endswith((".bin", ".safetensors", ".pt")):
                entry["tensors"] = _tensor_hashes(member.name, data)
            elif member.name.endswith(".json"):
                parsed = json.loads(data)
                entry["content"] = _mask(parsed)
                if member.name == "finetune.json":
                    finetune = parsed
            elif member.name.endswith(".html"):
                entry["masked_sha256"] = _sha(_ROW.sub(r"\1<volatile>\2", data.decode()).encode())
            members[member.name] = entry
    card = None
    if finetune is not None:
        fixed = json.loads(json.dumps(_mask(finetune)).replace('"<volatile>"', "0"))
        card = _sha(model_card(fixed, "someone/my-musicgen", sorted(members)).encode())
    return {"members": members, "model_card_sha256": card}


# ----------------------------------------------------------------------------------------------------- run


def _flags(values: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in values.items()]


def snapshot(out_path: Path, only: str | None = None) -> dict:
    import predict
    import train

    started = time.monotonic()
    result: dict = {"trainings": {}, "predictions": {}, "volatile_keys": list(VOLATILE_KEYS)}
    with tempfile.TemporaryDirectory(prefix="behaviour-") as tmp:
        work = Path(tmp)
        data = _datasets(work)
        clip = "clips/track00_000.wav"
        audio = {"melody.wav": data["two"] / clip, "long.wav": data["long"] / clip}
        tars: dict[str, Path] = {}
        for name, spec in TRAININGS.items():
            if only and not re.search(only, name):
                continue
            spec = dict(spec)
            dataset = data[spec.pop("dataset", "two")]
            values = {**COMMON_TRAIN, **spec, "dataset_path": dataset}
            out = work / "train" / name
            t0 = time.monotonic()
            code = train.main([*_flags(values), f"--output_dir={out}"])
            if code != 0:  # recorded (a difference for --compare), and the rest still runs
                result["trainings"][name] = {"exit": code}
                print(f"training {name} FAILED (exit {code})", flush=True)
                continue
            tars[name] = out / "trained_model.tar"
            result["trainings"][name] = _snapshot_tar(tars[name])
            print(f"trained {name} in {time.monotonic() - t0:.0f} s", flush=True)
        for name, spec in _predictions().items():
            if only and not re.search(only, name):
                continue
            spec = dict(spec)
            weights = spec.pop("weights", None)
            if weights is not None and weights not in tars:
                continue
            for key in ("input_audio", "style_audio"):
                if key in spec:
                    spec[key] = audio[spec[key]]
            target = work / "predict" / f"{name}.wav"
            target.parent.mkdir(parents=True, exist_ok=True)
            argv = [*_flags(spec), f"--output={target}"]
            if weights is not None:
                argv.append(f"--replicate_weights={tars[weights]}")
            code = predict.main(argv)
            if code != 0:
                result["predictions"][name] = {"exit": code}
                print(f"prediction {name} FAILED (exit {code})", flush=True)
                continue
            result["predictions"][name] = {"sha256": _sha(target.read_bytes())}
    failed = [
        f"{section}/{n}" for section in ("trainings", "predictions") for n, v in result[section].items() if "exit" in v
    ]
    print(f"snapshot took {time.monotonic() - started:.0f} s; failed: {', '.join(failed) or 'none'}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_name(out_path.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tmp_out.replace(out_path)
    return result


# ----------------------------------------------------------------------------------------------------- compare


def compare(a: dict, b: dict) -> list[str]:
    """Human-readable lines for every difference between two snapshots (empty: identical behaviour)."""
    lines: list[str] = []
    for section in ("trainings", "predictions"):
        for name in sorted(set(a[section]) | set(b[section])):
            if name not in a[section] or name not in b[section]:
                lines.append(f"{section}/{name}: only in {'B' if name not in a[section] else 'A'}")
                continue
            if section == "predictions":
                if a[section][name] != b[section][name]:
                    lines.append(f"predictions/{name}: output wav differs")
                continue
            ta, tb = a[section][name], b[section][name]
            if "exit" in ta or "exit" in tb:
                if ta != tb:
                    lines.append(f"trainings/{name}: exit {ta.get('exit', 0)} != {tb.get('exit', 0)}")
                continue
            if ta["model_card_sha256"] != tb["model_card_sha256"]:
                lines.append(f"trainings/{name}: model card differs")
            for member in sorted(set(ta["members"]) | set(tb["members"])):
                ma, mb = ta["members"].get(member), tb["members"].get(member)
                where = f"trainings/{name}/{member}"
                if ma is None or mb is None:
                    lines.append(f"{where}: only in {'B' if ma is None else 'A'}")
                elif "tensors" in ma:
                    ta_, tb_ = ma["tensors"], mb.get("tensors", {})
                    # a safetensors header's metadata: recorded since the first baseline; compared where both have it
                    both = any(k.startswith("__metadata__") for k in ta_) and any(
                        k.startswith("__metadata__") for k in tb_
                    )
                    names = {k for k in set(ta_) | set(tb_) if both or not k.startswith("__metadata__")}
                    keys = sorted(k for k in names if ta_.get(k) != tb_.get(k))
                    if keys:
                        lines.append(f"{where}: {len(keys)} tensors differ: {', '.join(keys[:8])}")
                    elif ma["sha256"] != mb["sha256"] and not member.endswith(NONCANONICAL_SUFFIXES):
                        lines.append(f"{where}: same tensors, file bytes differ (serialization)")
                elif "content" in ma:
                    ca, cb = _mask(ma["content"]), _mask(mb.get("content"))
                    if ca != cb:
                        lines.extend(f"{where}: {d}" for d in _json_diff(ca, cb))
                elif "masked_sha256" in ma:
                    if ma["masked_sha256"] != mb.get("masked_sha256"):
                        lines.append(f"{where}: differs (beyond the volatile rows)")
                elif ma["sha256"] != mb["sha256"]:
                    lines.append(f"{where}: bytes differ")
    return lines


def _json_diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'B' if k not in a else 'A'}")
            else:
                out.extend(_json_diff(a[k], b[k], f"{path}.{k}"))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _json_diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path or '.'}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="snapshot mode: the JSON to write")
    parser.add_argument("--only", default=None, help="snapshot mode: a regex on the training/prediction names")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="print what differs from A to B")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        lines = compare(a, b)
        for line in lines:
            print(line)
        n_a = len(a["trainings"]) + len(a["predictions"])
        print(f"{len(lines)} difference(s) over {n_a} trainings+predictions" if lines else
              f"identical: {len(a['trainings'])} trainings, {len(a['predictions'])} predictions")  # fmt: skip
        return 1 if lines else 0
    if args.out is None:
        parser.error("give --out FILE (snapshot) or --compare A B")
    snapshot(args.out, args.only)
    return 0


if __name__ == "__main__":
    # Before torch loads: one thread, so float reductions run in one order on every machine; offline hubs.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MGFT_CACHE", str(Path.home() / ".cache" / "musicgen-ft"))
    sys.path.insert(0, str(ROOT))
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(1)
    sys.exit(main())
