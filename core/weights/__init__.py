"""`trained_model.tar`: the weights a fine-tune produces and predict.py loads, by job:

- `core.weights.format`: the tar's members, `finetune.json` (read, typed and bounded), the one tar writer;
- `core.weights.cache`: where weights come from (path, URL, `data:` URI, Hugging Face repo), download, unpack,
  the least-recently-used cache;
- `core.weights.integrity`: members against their checksums, an LM config against its base's architecture;
- `core.weights.load`: `open_weights` (no model built) and `load_trained_model` (a `core.loaded.LoadedModel`);
- `core.weights.transformers_format`, `core.weights.peft_format`: the same weights in Hugging Face transformers'
  format (a MusicGen, or a PEFT adapter on one), written beside the tar and converted on load.

The names callers use are re-exported here (`from core import weights; weights.unpack(...)`).
"""

from core.errors import WeightsError
from core.weights.cache import (
    DEFAULT_MIN_FREE_BYTES,
    DOWNLOAD_DEADLINE,
    DOWNLOAD_TIMEOUT,
    HF_REPO_ID,
    FreeBytes,
    WeightsSource,
    cache_dir,
    classify,
    evict,
    fetch,
    unpack,
)
from core.weights.format import (
    FINETUNE_FILE,
    FORMAT_VERSION,
    INTEGRITY_MEMBERS,
    KNOWN_FILES,
    OPTIONAL_FILES,
    TRANSFORMERS_FOLDER,
    architecture_fingerprint,
    check_finetune_info,
    compression_package,
    lm_package,
    read_finetune_info,
    weights_members,
    write_tar,
    write_trained_model,
)
from core.weights.integrity import base_architecture, check_lm_config, verify_architecture, verify_members
from core.weights.load import OpenedWeights, load_trained_model, open_weights

__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
    "DOWNLOAD_DEADLINE",
    "DOWNLOAD_TIMEOUT",
    "FINETUNE_FILE",
    "FORMAT_VERSION",
    "HF_REPO_ID",
    "INTEGRITY_MEMBERS",
    "KNOWN_FILES",
    "OPTIONAL_FILES",
    "TRANSFORMERS_FOLDER",
    "FreeBytes",
    "OpenedWeights",
    "WeightsError",
    "WeightsSource",
    "architecture_fingerprint",
    "base_architecture",
    "cache_dir",
    "check_finetune_info",
    "check_lm_config",
    "classify",
    "compression_package",
    "evict",
    "fetch",
    "lm_package",
    "load_trained_model",
    "open_weights",
    "read_finetune_info",
    "unpack",
    "verify_architecture",
    "verify_members",
    "weights_members",
    "write_tar",
    "write_trained_model",
]
