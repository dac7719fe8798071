"""Benchmark: what writing a fine-tune in transformers' format adds to an export, on musicgen-small's architecture.

    .venv/bin/python bench/transformers_export.py

Random weights in the real shapes, no download: the LM (1024 dims, 16 heads, 24 layers, 4 x 2048 codes) with
audiocraft's T5 conditioner over a random `t5-base`-shaped encoder (768 dims, 12 layers, 32128 tokens; the tiny
sentencepiece tokenizer stands in for T5's), and facebook/encodec_32khz's EnCodec (128 dims, 64 filters, a 2-layer
LSTM, 4 x 2048 codes). In the same run it times the existing tar export of a full fine-tune
(`core.weights.write_trained_model`: the LM in fp16, EnCodec by reference) and the transformers export
(`to_transformers` + `save_transformers`: T5, LM and EnCodec in fp32, the tokenizer and processor files), and prints
the ratio of the two times and both sizes. Appends a JSON line to bench/results/transformers_export.jsonl.
"""

from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import append_result, git_commit, machine_name  # noqa: E402
from core import tiny  # noqa: E402
from core.weights import transformers_format as tf  # noqa: E402
from core.weights.format import write_trained_model  # noqa: E402

SMALL = {"dim": 1024, "num_heads": 16, "num_layers": 24, "card": 2048, "n_q": 4}
T5_BASE = {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "vocab_size": 32128}


def save_t5_base_hub(hub: Path) -> None:
    """A random encoder in t5-base's shapes as `t5-base` in Hugging Face cache layout (what T5Conditioner loads)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    config = {**tiny.t5_encoder_cfg(), **T5_BASE}
    repo = hub / "models--t5-base"
    snapshot = repo / "snapshots" / "bench"
    snapshot.mkdir(parents=True)
    T5EncoderModel(T5Config(**config)).save_pretrained(snapshot)
    T5Tokenizer(vocab=tiny._t5_vocab()).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bench")


def build_small(work: Path):
    """(LM, EnCodec) in musicgen-small's architecture, random weights."""
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    cfg = tiny.lm_cfg("tiny-t5")
    cfg["transformer_lm"].update(SMALL)
    cfg["codebooks_pattern"]["delay"]["delays"] = list(range(SMALL["n_q"]))
    ccfg = tiny.compression_cfg()
    ccfg["seanet"].update({"dimension": 128, "n_filters": 64, "lstm": 2})
    ccfg["rvq"].update({"n_q": 4, "bins": 2048})
    save_t5_base_hub(work / "hf_hub")
    torch.manual_seed(0)
    compression = builders.get_compression_model(OmegaConf.create(ccfg))
    with tiny.tiny_t5_hub(work):
        lm = builders.get_lm_model(OmegaConf.create(cfg))
    lm.cfg = OmegaConf.create(cfg)
    return lm.eval(), compression.eval()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bench-tf-export-") as tmp:
        work = Path(tmp)
        lm, compression = build_small(work)
        params = sum(p.numel() for p in lm.parameters())

        start = time.perf_counter()
        tar = write_trained_model(
            work / "trained_model.tar",
            state_dict=lm.state_dict(),
            cfg=lm.cfg,
            base_model="small",
            finetune={"method": "full"},
        )
        tar_s, tar_bytes = time.perf_counter() - start, tar.stat().st_size

        start = time.perf_counter()
        model = tf.to_transformers(lm, compression)
        convert_s = time.perf_counter() - start
        folder = tf.save_transformers(model, work / "transformers", tokenizer=tf.text_tokenizer(lm))
        hf_s, hf_bytes = time.perf_counter() - start, folder_bytes(folder)

    line = (
        f"transformers export, musicgen-small arch ({params / 1e6:.0f} M LM params, random): "
        f"{hf_s:.1f} s (convert {convert_s:.1f} s + save {hf_s - convert_s:.1f} s) vs tar export {tar_s:.1f} s "
        f"= {hf_s / tar_s:.2f}x; folder {hf_bytes / 1e6:.0f} MB (fp32, T5 + LM + EnCodec) "
        f"vs tar {tar_bytes / 1e6:.0f} MB"
    )
    print(line)
    append_result(
        ROOT / "bench" / "results" / "transformers_export.jsonl",
        {
            "bench": "transformers_export",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "machine": machine_name(),
            "lm_params": params,
            "tar_s": round(tar_s, 2),
            "tar_bytes": tar_bytes,
            "transformers_s": round(hf_s, 2),
            "convert_s": round(convert_s, 2),
            "transformers_bytes": hf_bytes,
            "ratio_time": round(hf_s / tar_s, 2),
            "line": line,
        },
    )


if __name__ == "__main__":
    main()
