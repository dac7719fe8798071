"""Low-rank adapters (LoRA) on audiocraft's MusicGen LM, shared by training (`training/methods/lora.py`) and
loading (`core/weights.py`).

Targets and their names (`lora_target_names`):

- `<attn>.q`, `<attn>.k`, `<attn>.v` for each attention (`transformer.layers.<i>.self_attn`, `...cross_attention`):
  audiocraft's `StreamingMultiheadAttention` (custom / memory-efficient, as MusicGen uses) keeps q, k and v as one
  bare `in_proj_weight` Parameter applied with `F.linear` (sliced for cross-attention), so wrapping an `nn.Linear`
  misses it. `LoRAInProj` gives the attention a class-level `in_proj_weight` property returning
  `W + scale * [B_q A_q; B_k A_k; B_v A_v]` on the adapted row blocks: every use of the weight sees the adapted one.
  This is the one class change left (`lora_attention_class`); why it is not `torch.nn.utils.parametrize` nor a
  wrapper module is said there.
- `<attn>.out_proj`, `transformer.layers.<i>.linear1` / `linear2`, `linears.<k>` (output heads): `nn.Linear`s,
  replaced by `LoRALinear`, which computes `x W^T + scale * (x A^T) B^T` without forming the weight delta.

Both keep the base parameters under their original state-dict keys (`...in_proj_weight`, `...linear1.weight`);
adapter tensors add keys holding `.lora_` (`lora_state_dict`). `scale = alpha / rank`; `B` starts at zero, so an
adapted model starts exactly equal to its base. `merge_lora_state` folds adapters into plain weights (by key).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import re
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_CONFIG_FILE",
    "fold_lora",
    "LoRALinear",
    "lora_attention_class",
    "base_parameters_exposed",
    "lora_target_names",
    "match_targets",
    "select_targets",
    "add_lora",
    "lora_state_dict",
    "is_adapter_key",
    "merge_lora_state",
    "apply_lora_files",
    "MergedLoRA",
    "set_lora_strength",
    "save_adapter",
    "add_t5_trigger",
    "T5TriggerMixin",
]

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
QKV = ("q", "k", "v")


def _qkv_rows(attn: nn.Module) -> dict[str, slice]:
    """Rows of `in_proj_weight` `[d + 2 * kv_dim, d]` holding q, k and v (kv_dim < d with kv_repeat)."""
    out_dim, dim = attn._parameters["in_proj_weight"].shape
    kv = (out_dim - dim) // 2
    return {"q": slice(0, dim), "k": slice(dim, dim + kv), "v": slice(dim + kv, out_dim)}


def _rows_from_shape(out_dim: int, dim: int, part: str) -> slice:
    kv = (out_dim - dim) // 2
    return {"q": slice(0, dim), "k": slice(dim, dim + kv), "v": slice(dim + kv, out_dim)}[part]


def fold_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """`W + scale * (B @ A)`: the weight an adapter makes of `weight` `[out, in]` (`A` `[rank, in]`, `B`
    `[out, rank]`), in `weight`'s dtype. A new tensor (differentiable: the adapted attention weight of every
    forward); the inputs are left as they are. Callers wanting the sum in another precision pass tensors in it."""
    return weight + scale * (lora_B @ lora_A).to(weight.dtype)


class _LoRAFactors(nn.Module):
    """`A` `[rank, in]` (Kaiming uniform, as LoRA's reference) and `B` `[out, rank]` (zeros)."""

    def __init__(self, in_features: int, out_features: int, rank: int, device: tp.Any, dtype: torch.dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """An `nn.Linear` plus a low-rank update; the base `weight`/`bias` keep their keys (frozen by the caller)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        factors = _LoRAFactors(base.in_features, base.out_features, rank, base.weight.device, base.weight.dtype)
        self.lora_A, self.lora_B = factors.lora_A, factors.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` holding `W + scale * B A` (the same Parameter objects' storage is not shared)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(fold_lora(self.weight, self.lora_A, self.lora_B, self.scale))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.weight.requires_grad_(self.weight.requires_grad)
        return out


class LoRAInProj:
    """Mixin put in front of an attention module's class: `in_proj_weight` becomes the adapted weight.

    The base Parameter stays in `_parameters['in_proj_weight']` (same state-dict key); the factors live in the
    `in_proj_lora` submodule (`q`/`k`/`v` -> `_LoRAFactors`) with scale `in_proj_lora_scale`. While
    `in_proj_lora_base_exposed` is true (`base_parameters_exposed`) the property answers with that Parameter itself.
    """

    in_proj_lora_base_exposed = False

    @property
    def in_proj_weight(self) -> torch.Tensor:  # type: ignore[override]
        weight = self._parameters["in_proj_weight"]
        if self.in_proj_lora_base_exposed:
            return weight
        adapters = self._modules["in_proj_lora"]
        rows = _qkv_rows(self)
        blocks = []
        for part in QKV:
            block = weight[rows[part]]
            if part in adapters:
                factors = adapters[part]
                block = fold_lora(block, factors.lora_A, factors.lora_B, self.in_proj_lora_scale)
            blocks.append(block)
        return torch.cat(blocks, dim=0)


_LORA_ATTENTION_CLASSES: dict[type, type] = {}


def lora_attention_class(cls: type) -> type:
    """`LoRA<cls>`: attention class `cls` with `LoRAInProj` in front (one per class, made on first use).

    Why a class change, and not `torch.nn.utils.parametrize` or a wrapper: audiocraft's attention applies the bare
    `in_proj_weight` Parameter with `F.linear(x, self.in_proj_weight)` inside its own forward (sliced for
    cross-attention) and fast generation reads it the same way, so only the attribute lookup itself can hand out
    the adapted weight, and Python looks data descriptors up on the type. `parametrize` does exactly this too (it
    puts a `Parametrized<cls>` class with a property in front), but it moves the Parameter to
    `parametrizations.in_proj_weight.original`: the base weight would leave `_parameters['in_proj_weight']` and
    the state-dict key `...in_proj_weight` that checkpoints, merges and the tests use. A wrapper module around the
    attention would hide it from audiocraft's streaming state and from the `isinstance` checks of the generation
    code. So the class changes, once per attention module, by `add_lora` only; nothing of audiocraft is patched.
    """
    if cls not in _LORA_ATTENTION_CLASSES:
        _LORA_ATTENTION_CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAInProj, cls), {})
    return _LORA_ATTENTION_CLASSES[cls]


@contextlib.contextmanager
def base_parameters_exposed(module: nn.Module) -> tp.Iterator[None]:
    """Within: every LoRA attention in `module` answers `in_proj_weight` with its base Parameter, as a plain
    attention does. For code that reads registered parameters back by name (FSDP2's lazy init, which would
    otherwise take the adapted weight for the parameter); the forward must not run meanwhile."""
    adapted = [m for m in module.modules() if isinstance(m, LoRAInProj)]
    for m in adapted:
        m.in_proj_lora_base_exposed = True
    try:
        yield
    finally:
        for m in adapted:
            del m.in_proj_lora_base_exposed  # back to the class default: the adapted weight


def _attention_modules(lm: nn.Module) -> dict[str, nn.Module]:
    from audiocraft.modules.transformer import StreamingMultiheadAttention

    return {n: m for n, m in lm.named_modules() if isinstance(m, StreamingMultiheadAttention)}


def lora_target_names(lm: nn.Module) -> list[str]:
    """Every module name LoRA can adapt in `lm`, in model order."""
    names = []
    attentions = _attention_modules(lm)
    for name, module in lm.named_modules():
        if name.startswith("condition_provider."):
            continue  # conditioners (LUT / T5 projection) are other methods' business
        if name in attentions:
            names.extend(f"{name}.{part}" for part in QKV)
        elif isinstance(module, nn.Linear | LoRALinear):
            adaptable = name.endswith(("out_proj", "linear1", "linear2")) or name.startswith("linears.")
            if adaptable and not name.rsplit(".", 1)[0].endswith(".mha"):
                names.append(name)
    return names


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def match_targets(names: tp.Sequence[str], patterns: str) -> list[str]:
    """The names among `names` (LoRA target names, in model order) that `patterns` select: comma-separated globs,
    each matched against the full name or its trailing components (`q` = every attention's q; `self_attn.*`;
    `layers.0.*`; `linears.*` = output heads). In `names`' order, each once.

    Raises ValueError when no pattern is given or one matches nothing, listing the valid names (compactly).
    """
    items = [p.strip() for p in patterns.split(",") if p.strip()]
    if not items:
        raise ValueError(f"no LoRA target given; valid targets: {describe_targets(names)}")
    for pattern in items:
        if not any(_matches(n, pattern) for n in names):
            raise ValueError(f"{pattern!r} matches no module; valid targets: {describe_targets(names)}")
    return [n for n in names if any(_matches(n, p) for p in items)]


def select_targets(lm: nn.Module, patterns: str) -> list[str]:
    """The target names of `lm` (`lora_target_names`) that `patterns` select (`match_targets`, which raises)."""
    return match_targets(lora_target_names(lm), patterns)


def describe_targets(names: tp.Sequence[str]) -> str:
    """`transformer.layers.<0-23>.self_attn.q, ...` : the valid names with layer numbers folded."""
    import re

    folded: dict[str, list[int]] = {}
    for name in names:
        match = re.match(r"^(.*?\.|)(\d+)(\..*|)$", name)
        key, index = (f"{match.group(1)}<i>{match.group(3)}", int(match.group(2))) if match else (name, -1)
        folded.setdefault(key, []).append(index)
    parts = []
    for key, indices in folded.items():
        indices = [i for i in indices if i >= 0]
        parts.append(key.replace("<i>", f"<{min(indices)}-{max(indices)}>") if indices else key)
    return ", ".join(parts) + " (patterns: comma-separated globs such as q,k,v,out_proj,linear1,linear2,linears.*)"


def add_lora(lm: nn.Module, targets: tp.Sequence[str], rank: int, alpha: float) -> list[nn.Parameter]:
    """Put adapters on `targets` (names from `lora_target_names`) in place; returns the new parameters.

    Base parameters are not touched (the caller decides what trains).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    attentions = _attention_modules(lm)
    modules = dict(lm.named_modules())
    new: list[nn.Parameter] = []
    for target in targets:
        parent_name, last = target.rsplit(".", 1) if "." in target else ("", target)
        if parent_name in attentions and last in QKV:
            attn = attentions[parent_name]
            if not getattr(attn, "custom", False):
                raise ValueError(f"{parent_name} is torch's nn.MultiheadAttention (custom=False): not supported")
            if "in_proj_lora" not in attn._modules:
                attn.add_module("in_proj_lora", nn.ModuleDict())
                attn.in_proj_lora_scale = alpha / rank
                attn.__class__ = lora_attention_class(type(attn))  # why a class change: lora_attention_class
            weight = attn._parameters["in_proj_weight"]
            rows = _qkv_rows(attn)[last]
            factors = _LoRAFactors(weight.shape[1], rows.stop - rows.start, rank, weight.device, weight.dtype)
            attn._modules["in_proj_lora"][last] = factors
            new.extend([factors.lora_A, factors.lora_B])
            continue
        module = modules.get(target)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{target} is not a LoRA target of this model")
        wrapped = LoRALinear(module, rank, alpha)
        parent = modules[parent_name] if parent_name else lm
        setattr(parent, last, wrapped)
        new.extend([wrapped.lora_A, wrapped.lora_B])
    return new


def is_adapter_key(key: str) -> bool:
    return ".lora_" in key or key.startswith("lora_")


def lora_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def merge_lora_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A plain LM state dict (the base's keys only) with every adapter in `state` folded into its weight."""
    out = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for key in state:
        if not key.endswith(".lora_A"):
            continue
        prefix = key[: -len(".lora_A")]
        lora_A, lora_B = state[key].float(), state[prefix + ".lora_B"].float()  # summed in fp32 (fp16 adapter files)
        if ".in_proj_lora." in prefix:  # <attn>.in_proj_lora.<q|k|v>
            attn, part = prefix.split(".in_proj_lora.")
            weight = out[attn + ".in_proj_weight"].clone()
            rows = _rows_from_shape(weight.shape[0], weight.shape[1], part)
            weight[rows] = fold_lora(weight[rows].float(), lora_A, lora_B, scale).to(weight.dtype)
            out[attn + ".in_proj_weight"] = weight
        else:
            weight = out[prefix + ".weight"]
            out[prefix + ".weight"] = fold_lora(weight.float(), lora_A, lora_B, scale).to(weight.dtype)
    return out


def save_adapter(state: dict[str, torch.Tensor], config: dict[str, tp.Any]) -> dict[str, bytes]:
    """`{adapter.safetensors: fp16 adapter tensors, adapter_config.json: config}` as bytes."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in lora_state_dict(state).items()}
    if not tensors:
        raise ValueError("no adapter tensors in the state dict")
    return {
        ADAPTER_FILE: save(tensors, metadata={"format": "musicgen-ft-lora"}),
        ADAPTER_CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
    }


def read_adapter(folder: tp.Any) -> tuple[dict[str, torch.Tensor], dict[str, tp.Any]]:
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    return load_file(str(folder / ADAPTER_FILE)), json.loads((folder / ADAPTER_CONFIG_FILE).read_text())


def _check_strength(strength: float) -> None:
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"LoRA strength must be a finite number >= 0, got {strength}")


def _folded_keys(tensors: tp.Mapping[str, torch.Tensor]) -> list[str]:
    """The base state-dict keys an adapter's tensors fold into (`merge_lora_state`), in its order, each once."""
    keys: dict[str, None] = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            if ".in_proj_lora." in prefix:
                keys[prefix.split(".in_proj_lora.")[0] + ".in_proj_weight"] = None
            else:
                keys[prefix + ".weight"] = None
    return list(keys)


class MergedLoRA:
    """A LoRA adapter folded into a loaded LM's weights, kept so that its strength can change in place.

    The base weights the adapter touches are set aside once (a copy of those tensors only: the attention
    projections and linears it targets); `set_scale(strength)` folds `W + strength * (alpha / rank) * B A` from them
    with `merge_lora_state`, the very computation a fresh load at that strength does, and writes the result into
    the LM's parameters. So a new `lora_scale` costs one fold of the targeted weights, not a reload of the base, and
    gives the same weights bit for bit. Strength 0 writes the base weights back: the base model exactly.
    """

    def __init__(self, lm: nn.Module, folder: tp.Any, strength: float = 1.0):
        _check_strength(strength)
        tensors, config = read_adapter(folder)
        self.folder, self.config = folder, config
        self.unit_scale = float(config["alpha"]) / int(config["rank"])
        state = lm.state_dict()  # tensors sharing storage with the parameters: writing them writes the LM
        keys = _folded_keys(tensors)
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"the adapter adapts {missing[0]}, which the base model does not have")
        device = state[keys[0]].device if keys else torch.device("cpu")
        self._tensors = {k: v.to(device) for k, v in tensors.items()}  # read on the CPU; folded where the LM is
        self._targets = {k: state[k] for k in keys}
        self._base = {k: v.detach().clone() for k, v in self._targets.items()}
        self.strength = 0.0  # the LM holds its base weights until the first fold below
        self.set_scale(strength)

    @torch.no_grad()
    def set_scale(self, strength: float) -> None:
        """Fold the adapter at `strength` (predict's `lora_scale`) into the LM, in place of the previous one."""
        _check_strength(strength)
        if strength == self.strength:
            return
        if strength == 0:
            merged = self._base
            logger.info("LoRA strength 0: the adapter in %s is not applied (the base model as it is)", self.folder)
        else:
            merged = merge_lora_state({**self._base, **self._tensors}, self.unit_scale * strength)
        for key, target in self._targets.items():
            if merged[key].shape != target.shape:
                raise ValueError(
                    f"{key}: the adapter makes {tuple(merged[key].shape)}, the base has {tuple(target.shape)}"
                )
            target.copy_(merged[key])
        self.strength = strength
        if strength:
            logger.info(
                "Applied LoRA adapter (rank %s, alpha %s, %d targets, strength %g) merged into the weights",
                self.config["rank"],
                self.config["alpha"],
                len(self.config["targets"]),
                strength,
            )


def apply_lora_files(lm: nn.Module, folder: tp.Any, merge: bool = True, strength: float = 1.0) -> dict[str, tp.Any]:
    """Apply the adapter in `folder` to a base `lm` (in place). `merge=True` folds it into the weights (plain
    modules, as fast as the base; `MergedLoRA` keeps it to change its strength later); `merge=False` keeps adapter
    modules (as during training). Returns the config.

    `strength` (predict's `lora_scale`) multiplies the adapter's update: the weight becomes
    `W + strength * (alpha / rank) * B A`. 0 leaves the base weights untouched (nothing is merged: the base model
    exactly), 1 is the adapter as trained.
    """
    if merge:
        return MergedLoRA(lm, folder, strength).config
    _check_strength(strength)
    tensors, config = read_adapter(folder)
    scale = float(config["alpha"]) / int(config["rank"]) * strength
    add_lora(lm, config["targets"], int(config["rank"]), float(config["alpha"]))
    missing = set(lora_state_dict(lm.state_dict())) - set(tensors)
    if missing:
        raise ValueError(f"the adapter lacks {sorted(missing)[:3]}")
    lm.load_state_dict(tensors, strict=False)
    if strength != 1.0:
        set_lora_strength(lm, scale)
    logger.info(
        "Applied LoRA adapter (rank %s, alpha %s, %d targets, strength %g)",
        config["rank"],
        config["alpha"],
        len(config["targets"]),
        strength,
    )
    return config


def set_lora_strength(lm: nn.Module, scale: float) -> None:
    """Set the update scale (`alpha / rank * strength`) of every unmerged adapter module of `lm`."""
    for module in lm.modules():
        if isinstance(module, LoRALinear):
            module.scale = scale
        elif isinstance(module, LoRAInProj):
            module.in_proj_lora_scale = scale


# ------------------------------------------------------------------------------------------- partial weights
# `embeddings.safetensors`: what textual inversion / text projection learned, applied on the base model's LM.
# Tensors keyed by LM state-dict key: `<key>` replaces the whole tensor; `<key>@rows` with `<key>@index` replaces
# only those rows (an embedding table's learned rows).

EMBEDDINGS_FILE = "embeddings.safetensors"


class RowTrainedEmbedding(nn.Module):
    """An `nn.Embedding` whose rows `index` come from the trainable `trained_rows` `[n, dim]`; the base table keeps
    its key (`weight`) and stays frozen."""

    def __init__(self, base: nn.Embedding, index: tp.Sequence[int]):
        super().__init__()
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.register_buffer("row_index", torch.tensor(list(index), dtype=torch.long), persistent=True)
        self.trained_rows = nn.Parameter(base.weight.detach()[self.row_index].clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.weight.index_put((self.row_index,), self.trained_rows.to(self.weight.dtype))
        return F.embedding(tokens, weight)


def save_partial(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """`tensors` and `metadata` as safetensors bytes, the same bytes for the same input: safetensors writes the
    metadata in its hash map's order, random per call, so the JSON header is written again with the metadata keys
    sorted (the tensors' entries and data are untouched; their offsets count from the end of the header)."""
    from safetensors.torch import save

    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to an 8-byte boundary
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def apply_partial_file(lm: nn.Module, folder: tp.Any) -> dict[str, str]:
    """Put the tensors of `folder/embeddings.safetensors` into `lm` (in place); returns the file's metadata."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(folder) / EMBEDDINGS_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    for key in tensors:  # a T5 trigger: its vocabulary must exist before its rows can be put in
        if key.endswith("." + T5_TRIGGER_PARAM):
            if "trigger_tokens" not in metadata or not metadata.get("trigger"):
                raise ValueError(f"{key} comes without its trigger and token strings in the file's metadata")
            conditioner = lm.get_submodule(key[: -len("." + T5_TRIGGER_PARAM)])
            add_t5_trigger(conditioner, metadata["trigger"], json.loads(metadata["trigger_tokens"]))
    state = lm.state_dict()
    for key, value in tensors.items():
        if key.endswith("@index"):
            continue
        if key.endswith("@rows"):
            name = key[: -len("@rows")]
            state[name][tensors[name + "@index"]] = value.to(state[name].dtype)
        elif key in state:
            if state[key].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit the base's {tuple(state[key].shape)}")
            state[key].copy_(value)
        else:
            raise ValueError(f"{key} is not a weight of the base model")
    logger.info("Applied %s (%s: %s)", EMBEDDINGS_FILE, metadata.get("method", "?"), ", ".join(sorted(tensors)))
    return metadata


# ------------------------------------------------------------------------------------- T5 textual inversion
# The facebook/musicgen-* models read prompts with a frozen T5 encoder (audiocraft's `T5Conditioner`). A trigger
# word becomes new T5 vocabulary: placeholder tokens (`<mgft_trigger_0>`, ...) added to the conditioner's tokenizer,
# one per sentencepiece piece of the trigger (any string splits into at least one piece, so any trigger works),
# whose input embeddings `trigger_embedding` `[n, d_model]` are a Parameter of the conditioner (so of the LM's module
# tree and state dict). Every whole-word occurrence of the trigger in a prompt (case-insensitive) is replaced by the
# placeholders before T5's tokenizer runs; the rows start as the embeddings of the trigger's own pieces, so before
# training a trigger prompt is encoded exactly as by the base model. Prompts without the trigger take audiocraft's
# own forward, unchanged.

T5_TRIGGER_PARAM = "trigger_embedding"
T5_TRIGGER_TOKEN = "<mgft_trigger_{}>"


class T5TriggerMixin:
    """Put in front of a `T5Conditioner`'s class (`add_t5_trigger`): the trigger's placeholder tokens take their
    input embeddings from `trigger_embedding`, and the frozen T5 runs with gradients reaching those rows."""

    def tokenize(self, x: list[str | None]) -> dict[str, torch.Tensor]:
        text = "".join(self.trigger_tokens)
        x = [xi if xi is None else self.trigger_pattern.sub(lambda _: text, xi) for xi in x]
        return super().tokenize(x)  # type: ignore[misc]

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        n = self.trigger_embedding.shape[0]
        learned = (ids >= self.trigger_first_id) & (ids < self.trigger_first_id + n)
        if not bool(learned.any()):
            embeds, mask = super().forward(inputs)  # type: ignore[misc]
            if self.training and torch.is_grad_enabled() and self.trigger_embedding.requires_grad:
                # a batch without the trigger (word or CFG dropout) still uses the rows, with a zero gradient:
                # DistributedDataParallel expects every trainable parameter in every step's graph
                embeds = embeds + 0.0 * self.trigger_embedding.sum()
            return embeds, mask
        t5 = self.t5
        with self.autocast:
            table = t5.get_input_embeddings()
            embeds = table(ids.masked_fill(learned, 0))
            rows = self.trigger_embedding[(ids - self.trigger_first_id).clamp(0, n - 1)].to(embeds.dtype)
            embeds = torch.where(learned[..., None], rows, embeds)
            # T5's own weights do not require grad (frozen, outside the LM's module tree): in grad mode only the
            # trigger rows get gradients through the encoder. audiocraft's forward disables grad altogether.
            hidden = t5(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        out = self.output_proj(hidden.to(self.output_proj.weight))
        return out * mask.unsqueeze(-1), mask


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive occurrences of `trigger` (which may hold spaces or punctuation)."""
    return re.compile(r"(?<!\w)" + re.escape(trigger.strip()) + r"(?!\w)", re.IGNORECASE)


def is_t5_conditioner(conditioner: nn.Module) -> bool:
    from audiocraft.modules.conditioners import T5Conditioner

    return isinstance(conditioner, T5Conditioner)


def add_t5_trigger(conditioner: nn.Module, trigger: str, tokens: tp.Sequence[str] | None = None) -> list[str]:
    """Give a `T5Conditioner` (in place) new vocabulary for `trigger`; returns the placeholder token strings.

    `tokens`: the placeholders to add (as stored in a weights tar); by default one per sentencepiece piece of the
    trigger. The new rows start as the embeddings of those pieces (or, for stored tokens, are overwritten by the
    stored rows right after). T5's own parameters are set not to require grad.
    """
    from transformers import AddedToken

    if not is_t5_conditioner(conditioner):
        raise TypeError(f"{type(conditioner).__name__} is not audiocraft's T5Conditioner")
    if isinstance(conditioner, T5TriggerMixin):
        raise ValueError(f"this T5 conditioner already has a trigger ({conditioner.trigger!r}): only one is supported")
    if conditioner.normalize_text:
        raise ValueError("T5 conditioners with normalize_text=True (lemmatized prompts) are not supported")
    trigger = trigger.strip()
    if not trigger:
        raise ValueError("the trigger is empty")
    tokenizer, t5 = conditioner.t5_tokenizer, conditioner.t5
    pieces = tokenizer(trigger, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
    tokens = list(tokens) if tokens is not None else [T5_TRIGGER_TOKEN.format(i) for i in range(len(pieces))]
    clashes = [t for t in tokens if t in tokenizer.get_vocab()]
    if clashes:
        raise ValueError(f"the tokenizer already knows {clashes}")
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise RuntimeError(f"the trigger's placeholder tokens got non-consecutive ids {ids}")
    if not conditioner.finetune:
        t5.requires_grad_(False)
    table = t5.get_input_embeddings().weight.detach()
    init = table[torch.tensor([pieces[min(i, len(pieces) - 1)] for i in range(len(tokens))], device=table.device)]
    conditioner.register_parameter(T5_TRIGGER_PARAM, nn.Parameter(init.float().clone()))
    conditioner.trigger = trigger
    conditioner.trigger_tokens = tokens
    conditioner.trigger_pieces = tokenizer.convert_ids_to_tokens(pieces)
    conditioner.trigger_first_id = ids[0]
    conditioner.trigger_pattern = trigger_pattern(trigger)
    cls = type(conditioner)
    conditioner.__class__ = type(f"Trigger{cls.__name__}", (T5TriggerMixin, cls), {})
    logger.info(
        "T5 trigger %r: %d new token(s) %s (ids %d-%d), initialized from its pieces %s",
        trigger,
        len(tokens),
        "".join(tokens),
        ids[0],
        ids[-1],
        conditioner.trigger_pieces,
    )
    return tokens
