"""A fast token generation path for audiocraft's `LMModel`, with the same semantics as `LMModel.generate`.

`generate_tokens(lm, attributes, prompt_tokens, max_gen_len, ...)` returns `[B, K, max_gen_len]` codes (prompt
included), exactly like `lm.generate(prompt_tokens, attributes, max_gen_len=...)`. In fp32 with the same torch seed
the tokens are identical: the same conditions (the LM's own condition provider and fuser), the same
conditional + unconditional batch, the same transformer math on the same shapes, and the same sampling calls, so the
random stream is consumed identically.

Where the time goes in audiocraft, and what is done here instead:
- its streaming state grows the KV cache with `torch.cat` each step; here it is preallocated for the whole sequence
  and written in place;
- its cross-attention re-projects the (constant) condition into keys/values in every layer at every step; here they
  are projected once per call;
- per step it rebuilds masks, einops layouts, streaming-state dicts and logits for every codebook/position; here all
  of that is hoisted out of the step loop (only the last position goes through the output heads);
- `quantize='int8'` (CPU): every linear read per step (attention in/out projections including the bare
  `in_proj_weight` audiocraft applies with `F.linear`, feed-forward, output heads) runs on int8 weights, per output
  channel symmetric, with dynamically quantized activations (fbgemm/oneDNN `quantized::linear_dynamic`). Decoding
  at batch 2 is bound by reading weights, and int8 reads 4x fewer bytes;
- `quantize='bf16'` / `'fp16'`: weights and activations in half precision (for GPUs);
- on CUDA in half precision the steps after the first are `_StaticStep`s: fixed shapes and addresses (attention over
  whole cache buckets with a length mask, the position a tensor), each bucket captured once as a CUDA graph and
  replayed, so a step costs one graph launch instead of hundreds of kernel launches from Python.

A prepared model (`FastLM.from_lm(lm, quantize=...)`) can be kept and reused across calls; building the int8 copy of
musicgen-small takes about a second. The fp32 path holds references to the LM's own parameters (no copy), so it sees
later in-place updates (training); the int8 / half copies are snapshots: rebuild them after the weights change.
LoRA-wrapped LMs (`core.adapters`: `LoRALinear` modules, attentions whose `in_proj_weight` is the adapted weight)
are read through their adapters: each adapted weight is folded once into a new tensor (`W + scale * B A`), so a
prepared model of a LoRA LM is a snapshot in every precision, and the LM's own weights are never modified.
Configurations the fast path does not implement (two-step CFG, rotary embeddings, a finite `past_context`,
`kv_repeat`, qk layer norm, post-norm layers, `sum`/`input_interpolate` fusing) fall back to `lm.generate`, logged.
"""

from __future__ import annotations

import logging
import typing as tp
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.adapters import fold_lora
from core.sampling import sample_next_token

if tp.TYPE_CHECKING:
    from audiocraft.models.lm import LMModel
    from audiocraft.modules.conditioners import ConditioningAttributes

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "int8", "bf16", "fp16")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SUPPORTED_FUSE = {"cross", "prepend"}


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags or " amx_int8" in flags


# Activations are quantized per call to 8 bits where the CPU multiplies u8 x s8 in 32-bit (VNNI): 3-4x lower KL
# than 7 bits. Without VNNI, fbgemm sums pairs of products in int16, which 8-bit activations can saturate.
INT8_REDUCE_RANGE = not _cpu_has_vnni()

Callback = tp.Callable[[int, int], None]


def default_quantize(device: torch.device | str) -> str | None:
    """The quantization used when a caller asks for `'auto'`: int8 on CPU, fp16 on CUDA (audiocraft's own GPU
    precision: its loader puts the LM in fp16 there).

    int8 on CPU is the default because its next-token distributions stay within KL < 0.01 nats/token of fp32
    (measured by `bench/kl.py: next_token_kl`, see docs/speed.md).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "int8"
    if device.type == "cuda":
        return "fp16"
    return None


# --------------------------------------------------------------------------------------------------------- linears
class DenseLinear:
    """`F.linear` on (possibly shared) weight tensors; `[*, in] -> [*, out]`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    """int8 weights (symmetric, one scale per output channel), activations quantized on the fly per call.

    Built from any fp32 weight tensor, including audiocraft's bare `in_proj_weight` that is used through `F.linear`
    and so is invisible to `torch.ao.quantization.quantize_dynamic` (which only swaps `nn.Linear` modules).
    `[*, in] fp32 -> [*, out] fp32`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        weight = weight.detach().float().contiguous().cpu()
        scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127.0
        zero_point = torch.zeros(weight.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(weight, scale.double(), zero_point, 0, torch.qint8)
        self.out_features, self.in_features = weight.shape
        b = None if bias is None else bias.detach().float().contiguous().cpu()
        self.packed = torch.ops.quantized.linear_prepack(qweight, b)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, INT8_REDUCE_RANGE)

    def dequantized_weight(self) -> torch.Tensor:
        """The `[out, in]` fp32 weight the kernel effectively multiplies with (for tests and error reports)."""
        qweight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qweight.dequantize()


Linear = DenseLinear | Int8Linear


def _make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantize: str | None) -> Linear:
    if quantize == "int8":
        return Int8Linear(weight, bias)
    if quantize in _HALF:
        dtype = _HALF[quantize]
        return DenseLinear(weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
    return DenseLinear(weight, bias)


# ---------------------------------------------------------------------------------------------------- the model
@dataclass
class _Norm:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, module: torch.nn.LayerNorm, dtype: torch.dtype | None) -> _Norm:
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or dtype is None else t.detach().to(dtype)

        return cls(cast(module.weight), cast(module.bias), module.eps)


@dataclass
class _Block:
    """One pre-norm transformer layer: self-attention, optional cross-attention, feed-forward."""

    norm1: _Norm
    in_proj: Linear  # [D] -> [3D] (q, k, v packed as audiocraft's `(p h d)`)
    out_proj: Linear
    scale1: torch.Tensor | None  # LayerScale, or None for identity
    norm_cross: _Norm | None
    cross_q: Linear | None
    cross_kv_weight: tuple[torch.Tensor, torch.Tensor | None] | None  # full-precision [2D, D] (k then v), bias
    cross_out: Linear | None
    scale_cross: torch.Tensor | None
    norm2: _Norm
    ff1: Linear
    ff2: Linear
    scale2: torch.Tensor | None
    activation: tp.Callable[[torch.Tensor], torch.Tensor]


def _attn_params(attn) -> tuple[torch.Tensor, torch.Tensor | None, torch.nn.Linear]:
    """(in_proj_weight, in_proj_bias, out_proj) of an audiocraft StreamingMultiheadAttention, custom or not."""
    if attn.custom:
        return attn.in_proj_weight, attn.in_proj_bias, attn.out_proj
    return attn.mha.in_proj_weight, attn.mha.in_proj_bias, attn.mha.out_proj


def _linear_weights(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) that a linear module applies, its LoRA adapter included.

    `core.adapters.LoRALinear` keeps the base `weight` and adds `scale * (x A^T) B^T` in its forward: reading only
    `.weight` would silently drop what LoRA training learned. The adapter is folded into a new tensor (the
    module's own parameters are left as they are), by the one fold formula (`core.adapters.fold_lora`).
    """
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None:
        return module.weight, module.bias
    weight = module.weight
    with torch.no_grad():
        folded = fold_lora(weight, lora_a, module.lora_B, module.scale)
    return folded, module.bias


def _layer_scale(module, dtype: torch.dtype | None) -> torch.Tensor | None:
    scale = getattr(module, "scale", None)
    if scale is None:
        return None
    return scale if dtype is None else scale.detach().to(dtype)


def unsupported_reason(lm: LMModel) -> str | None:
    """Why the fast path cannot run this LM (then `generate_tokens` falls back to `lm.generate`), or None."""
    from audiocraft.models.lm import LMModel

    for method in ("generate", "_sample_next_token", "forward"):
        if getattr(type(lm), method) is not getattr(LMModel, method):
            # e.g. MusicGen-Style's double classifier-free guidance: its own generation semantics.
            return f"{type(lm).__name__} overrides LMModel.{method}"
    if lm.two_step_cfg:
        return "two_step_cfg"
    tr = lm.transformer
    if tr.positional_embedding != "sin":
        return f"positional_embedding={tr.positional_embedding!r}"
    if tr.checkpointing != "none":
        pass  # checkpointing only matters for training
    if lm.out_norm is None:
        return "no out_norm (post-norm model)"
    for layer in tr.layers:
        attn = layer.self_attn
        if not layer.norm_first:
            return "post-norm layers"
        if attn.past_context is not None:
            return "finite past_context"
        if attn.kv_repeat != 1:
            return "kv_repeat > 1"
        if attn.qk_layer_norm or (layer.cross_attention is not None and layer.cross_attention.qk_layer_norm):
            return "qk_layer_norm"
        if attn.rope is not None:
            return "rotary embeddings"
        if not attn.causal:
            return "non-causal self-attention"
    for op, names in lm.fuser.fuse2cond.items():
        if names and op not in _SUPPORTED_FUSE:
            return f"fuse method {op!r}"
    if lm.fuser.cross_attention_pos_emb:
        # Handled by the fuser itself (called once per generation), so it is supported.
        pass
    return None


class FastLM:
    """A decode-only view of an audiocraft `LMModel`'s weights (see the module docstring)."""

    def __init__(self, lm: LMModel, quantize: str | None = None):
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        reason = unsupported_reason(lm)
        if reason is not None:
            raise NotImplementedError(f"the fast generation path does not support this model: {reason}")
        device = next(iter(lm.parameters())).device
        if quantize == "int8" and device.type != "cpu":
            raise ValueError(f"quantize='int8' runs on CPU only (model is on {device}); use 'bf16' or 'fp16' there")
        self._lm_ref = weakref.ref(lm)
        self.quantize = quantize
        self.device = device
        half = _HALF.get(quantize)  # type: ignore[arg-type]
        # Activations / KV cache dtype: the LM's own dtype unless casting to half precision.
        self.dtype: torch.dtype = half if half is not None else next(iter(lm.parameters())).dtype
        norm_dtype = half
        tr = lm.transformer
        self.dim: int = lm.dim
        self.n_q: int = lm.n_q
        self.card: int = lm.card
        first_attn = tr.layers[0].self_attn
        self.num_heads: int = first_attn.num_heads
        self.head_dim = self.dim // self.num_heads
        self.max_period = tr.max_period
        self.positional_scale = tr.positional_scale
        # The exact path keeps audiocraft's attention kernel (SDPA); quantized CPU paths use the faster one-step form.
        exact = quantize is None or device.type != "cpu"
        self.attend: tp.Callable[..., torch.Tensor] = F.scaled_dot_product_attention if exact else _attend_small
        self.emb = [e.weight if half is None else e.weight.detach().to(half) for e in lm.emb]
        with torch.no_grad():
            self.blocks = [self._block(layer, quantize, norm_dtype) for layer in tr.layers]
            self.out_norm = _Norm.of(lm.out_norm, norm_dtype)
            if quantize == "int8":
                # One fused [K*card, D] int8 head: one weight read and one kernel call for all codebooks.
                heads = [_linear_weights(lin) for lin in lm.linears]
                weight = torch.cat([w for w, _ in heads], dim=0)
                biases = [b for _, b in heads]
                bias = None if biases[0] is None else torch.cat(biases, dim=0)
                self.heads: list[Linear] = [Int8Linear(weight, bias)]
            else:
                self.heads = [_make_linear(*_linear_weights(lin), quantize) for lin in lm.linears]

    @classmethod
    def from_lm(cls, lm: LMModel, quantize: str | None = None) -> FastLM:
        return cls(lm, quantize)

    @property
    def lm(self) -> LMModel:
        lm = self._lm_ref()
        if lm is None:
            raise RuntimeError("the LMModel this FastLM was built from has been freed")
        return lm

    @staticmethod
    def _block(layer, quantize: str | None, norm_dtype: torch.dtype | None) -> _Block:
        w, b, out = _attn_params(layer.self_attn)
        cross = layer.cross_attention
        if cross is not None:
            cw, cb, cout = _attn_params(cross)
            dim = cw.shape[0] // 3
            cross_q = _make_linear(cw[:dim], None if cb is None else cb[:dim], quantize)
            cross_kv = (cw[dim:], None if cb is None else cb[dim:])
            cross_out = _make_linear(*_linear_weights(cout), quantize)
            norm_cross = _Norm.of(layer.norm_cross, norm_dtype)
            scale_cross = _layer_scale(layer.layer_scale_cross, norm_dtype)
        else:
            cross_q = cross_kv = cross_out = norm_cross = scale_cross = None
        return _Block(
            norm1=_Norm.of(layer.norm1, norm_dtype),
            in_proj=_make_linear(w, b, quantize),
            out_proj=_make_linear(*_linear_weights(out), quantize),
            scale1=_layer_scale(layer.layer_scale_1, norm_dtype),
            norm_cross=norm_cross,
            cross_q=cross_q,
            cross_kv_weight=cross_kv,
            cross_out=cross_out,
            scale_cross=scale_cross,
            norm2=_Norm.of(layer.norm2, norm_dtype),
            ff1=_make_linear(*_linear_weights(layer.linear1), quantize),
            ff2=_make_linear(*_linear_weights(layer.linear2), quantize),
            scale2=_layer_scale(layer.layer_scale_2, norm_dtype),
            activation=layer.activation,
        )

    # ---------------------------------------------------------------------------------------------- pieces
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """`[B, K, T]` codes -> `[B, T, D]`: the sum of the K codebook embeddings (audiocraft's order)."""
        x = F.embedding(codes[:, 0], self.emb[0])
        for k in range(1, self.n_q):
            x = x + F.embedding(codes[:, k], self.emb[k])
        return x

    def positional_table(self, length: int) -> torch.Tensor:
        """`[1, length, D]` scaled sinusoidal embeddings, computed like audiocraft's `create_sin_embedding`."""
        from audiocraft.modules.transformer import create_sin_embedding

        positions = torch.arange(length, device=self.device).view(1, -1, 1)
        # Always in fp32: bf16 cannot even represent the positions past 256 (a melody prepends ~940 frames).
        table = create_sin_embedding(positions, self.dim, max_period=self.max_period, dtype=torch.float32)
        return (self.positional_scale * table).to(self.dtype)

    def cross_kv(self, src: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer `(k, v)`, each `[N, H, T_cond, d]`, projected once from the cross-attention source."""
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        N, T, _ = src.shape
        for block in self.blocks:
            if block.cross_kv_weight is None:
                out.append(None)
                continue
            weight, bias = block.cross_kv_weight
            dim = self.dim
            wk, wv = weight[:dim], weight[dim:]
            bk, bv = (None, None) if bias is None else (bias[:dim], bias[dim:])
            src_ = src.to(weight.dtype)
            k = F.linear(src_, wk, bk).view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
            v = F.linear(src_, wv, bv).view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
            out.append((k.to(self.dtype), v.to(self.dtype)))
        return out


@dataclass
class _State:
    """Per-call decoding state: the preallocated KV cache, positions, cross-attention keys/values."""

    k_cache: list[torch.Tensor]  # per layer [N, H, S_max, d]
    v_cache: list[torch.Tensor]
    cross: list[tuple[torch.Tensor, torch.Tensor] | None]
    pos_table: torch.Tensor  # [1, S_max, D]
    pos: int = 0


def _new_state(fast: FastLM, n: int, max_len: int, cross_src: torch.Tensor | None, zeroed: bool = False) -> _State:
    """`zeroed`: the static step attends over cache entries not written yet (masked out): they must hold finite
    values, since a masked weight of exactly 0 times a NaN left in uninitialised memory is still NaN."""
    shape = (n, fast.num_heads, max_len, fast.head_dim)
    alloc = torch.zeros if zeroed else torch.empty
    k_cache = [alloc(shape, dtype=fast.dtype, device=fast.device) for _ in fast.blocks]
    v_cache = [alloc(shape, dtype=fast.dtype, device=fast.device) for _ in fast.blocks]
    if cross_src is None:
        if any(b.cross_q is not None for b in fast.blocks):
            raise ValueError("this model cross-attends to its conditions: pass `attributes` (one per sample)")
        cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(fast.blocks)
    else:
        cross = fast.cross_kv(cross_src)
    return _State(k_cache, v_cache, cross, fast.positional_table(max_len))


def _attend_small(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """Attention for a single query step on CPU: `[N, H, 1, d]` x `[N, H, L, d]` -> `[N, H, 1, d]`.

    Two batched matmuls and a softmax: at one query step this is ~2x faster than the CPU flash-attention kernel
    (whose blocking and buffers are sized for long queries). Mathematically the same as SDPA, not bitwise, so the
    exact (`quantize=None`) path keeps SDPA.
    """
    if is_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _forward(fast: FastLM, state: _State, x: torch.Tensor) -> torch.Tensor:
    """Run `[N, T, D]` fused inputs through the transformer, extending the cache; returns the `[N, D]` last output."""
    T = x.shape[1]
    start, end = state.pos, state.pos + T
    x = x.to(fast.dtype) + state.pos_table[:, start:end]
    # audiocraft's causal mask only exists when several steps go through at once (the first call).
    causal = T > 1
    attend = fast.attend

    def self_attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = state.k_cache[i], state.v_cache[i]
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        return attend(q, k_cache[:, :, :end], v_cache[:, :, :end], is_causal=causal)

    x = _layers(fast, state, x, self_attention)
    state.pos = end
    return x[:, -1]


def _layers(
    fast: FastLM,
    state: _State,
    x: torch.Tensor,
    self_attention: tp.Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The transformer layers on `[N, T, D]` inputs (positions already added) -> `[N, T, D]`.

    `self_attention(layer, q, k, v)` (each `[N, H, T, d]`) stores the new keys/values in that layer's cache and
    returns the attention output `[N, H, T, d]`: the one thing the dynamic and the static step do differently.
    """
    N, T, D = x.shape
    H, d = fast.num_heads, fast.head_dim
    shape = (D,)
    attend = fast.attend
    for i, blk in enumerate(fast.blocks):
        n1 = blk.norm1
        qkv = blk.in_proj(F.layer_norm(x, shape, n1.weight, n1.bias, n1.eps)).view(N, T, 3, H, d)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = self_attention(i, q, k, v)
        h = blk.out_proj(att.transpose(1, 2).reshape(N, T, D))
        x = x + (h if blk.scale1 is None else blk.scale1 * h)
        cross = state.cross[i]
        if cross is not None:
            nc = blk.norm_cross
            q = blk.cross_q(F.layer_norm(x, shape, nc.weight, nc.bias, nc.eps)).view(N, T, H, d).transpose(1, 2)
            att = attend(q, cross[0], cross[1])
            h = blk.cross_out(att.transpose(1, 2).reshape(N, T, D))
            x = x + (h if blk.scale_cross is None else blk.scale_cross * h)
        n2 = blk.norm2
        h = blk.ff2(blk.activation(blk.ff1(F.layer_norm(x, shape, n2.weight, n2.bias, n2.eps))))
        x = x + (h if blk.scale2 is None else blk.scale2 * h)
    return x


STATIC_BUCKET = 128  # cache entries per length bucket of the static step: one CUDA graph per bucket


def _bucket_end(pos: int, bucket: int) -> int:
    """The attended cache length for a step at position `pos`: `pos + 1` rounded up to a multiple of `bucket`."""
    return (pos // bucket + 1) * bucket


class _StaticStep:
    """One single-token decode step with fixed shapes and addresses, replayable as a CUDA graph.

    Inputs are buffers written before each step: `tokens` `[B, K, 1]` (the last column of the sequence) and `pos`
    `[1]` long (its position). The step embeds the column (twice with guidance: conditional, then unconditional),
    adds the positional embedding of `pos`, writes every layer's keys/values at `pos` of the preallocated cache,
    attends over the first `length` cache entries with the mask `key_position <= pos`, and writes the guided
    `[B, K, card]` fp32 logits into `logits`. `length` is the step's bucket (`_bucket_end`), so within a bucket
    every step runs the same kernels on the same addresses: on CUDA each bucket is captured once as a graph and
    replayed; elsewhere the same step runs eagerly. The step is idempotent (it rewrites position `pos` with the
    same values), which makes the capture's warm-up run harmless.
    """

    def __init__(self, fast: FastLM, state: _State, batch: int, guided: bool, cfg_coef: float, bucket: int):
        n_rows = state.k_cache[0].shape[0]
        capacity = state.k_cache[0].shape[2]
        if capacity % bucket:
            raise ValueError(f"internal error: cache length {capacity} is not a multiple of the bucket {bucket}")
        self.fast, self.state, self.batch, self.guided, self.cfg_coef = fast, state, batch, guided, cfg_coef
        self.bucket = bucket
        device = fast.device
        self.tokens = torch.zeros(batch, fast.n_q, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.key_positions = torch.arange(capacity, device=device)
        self.logits = torch.zeros(batch, fast.n_q, fast.card, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        self.use_graphs = device.type == "cuda"
        assert n_rows == (2 * batch if guided else batch)

    def _step(self, length: int) -> None:
        fast, state, pos = self.fast, self.state, self.pos
        x = fast.embed(self.tokens)
        if self.guided:
            x = torch.cat([x, x], dim=0)
        x = x.to(fast.dtype) + state.pos_table.index_select(1, pos)
        visible = (self.key_positions[:length] <= pos).view(1, 1, 1, length)

        def self_attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = state.k_cache[i], state.v_cache[i]
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            return F.scaled_dot_product_attention(q, k_cache[:, :, :length], v_cache[:, :, :length], visible)

        logits = _logits(fast, _layers(fast, state, x, self_attention)[:, -1])
        if self.guided:
            cond_logits, uncond_logits = logits.split(self.batch, dim=0)
            logits = uncond_logits + (cond_logits - uncond_logits) * self.cfg_coef
        self.logits.copy_(logits)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """`[B, K, 1]` codes at sequence position `pos` -> the guided `[B, K, card]` logits of the next step."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        length = _bucket_end(pos, self.bucket)
        if not self.use_graphs:
            self._step(length)
        else:
            graph = self.graphs.get(length)
            if graph is None:
                graph = self.graphs[length] = self._capture(length)
            if graph is not None:
                graph.replay()
            else:
                self._step(length)
        self.state.pos = pos + 1
        # A copy: the next step overwrites `logits` while a chooser may still hold this step's.
        return self.logits.clone()

    def _capture(self, length: int) -> torch.cuda.CUDAGraph | None:
        """The step over `length` cache entries as a CUDA graph, or None (logged) where this GPU / torch cannot
        capture it: then the same step runs eagerly, slower but with the same results."""
        try:
            return self._try_capture(length)
        except RuntimeError as err:
            logger.warning("CUDA graph capture failed (%s): decoding without graphs", err)
            self.use_graphs = False
            return None

    def _try_capture(self, length: int) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream first (cuBLAS handles, lazy kernel choices), as torch.cuda.graphs asks; it
        # runs this very step, so the replay that follows recomputes the same values.
        side = torch.cuda.Stream(self.fast.device)
        side.wait_stream(torch.cuda.current_stream(self.fast.device))
        with torch.cuda.stream(side):
            self._step(length)
        torch.cuda.current_stream(self.fast.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(length)
        return graph


def _logits(fast: FastLM, out: torch.Tensor) -> torch.Tensor:
    """`[N, D]` last transformer outputs -> `[N, K, card]` fp32 logits."""
    no = fast.out_norm
    h = F.layer_norm(out, (fast.dim,), no.weight, no.bias, no.eps)
    if len(fast.heads) == 1 and fast.n_q > 1:
        logits = fast.heads[0](h).view(h.shape[0], fast.n_q, fast.card)
    else:
        logits = torch.stack([head(h) for head in fast.heads], dim=1)
    return logits.float()


# ---------------------------------------------------------------------------------------------- generation
def _condition_tensors(lm: LMModel, attributes: list[ConditioningAttributes]) -> dict:
    """Conditional + unconditional condition tensors, batched `[2B, ...]` exactly as `LMModel.generate` does."""
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

    if not attributes:
        return {}
    # Identical conditions (the `num_outputs` copies of one request) are computed once and repeated: for a melody
    # that is one demucs + chroma pass instead of one per output.
    firsts, rows = _unique_rows(attributes)
    unique = [attributes[i] for i in firsts]
    null_attributes = ClassifierFreeGuidanceDropout(p=1.0)(unique)
    tokenized = lm.condition_provider.tokenize(list(unique) + list(null_attributes))
    tensors = lm.condition_provider(tokenized)
    if len(unique) == len(attributes):
        return tensors
    index = torch.tensor(rows + [len(unique) + r for r in rows])
    return {name: (emb[index.to(emb.device)], mask[index.to(mask.device)]) for name, (emb, mask) in tensors.items()}


def _unique_rows(attributes: list[ConditioningAttributes]) -> tuple[list[int], list[int]]:
    """(index of each distinct condition's first occurrence, the distinct condition of every row)."""
    firsts: list[int] = []
    rows: list[int] = []
    for i, attr in enumerate(attributes):
        match = next((u for u, f in enumerate(firsts) if _same_condition(attributes[f], attr)), None)
        if match is None:
            firsts.append(i)
            match = len(firsts) - 1
        rows.append(match)
    return firsts, rows


def _same_condition(a: ConditioningAttributes, b: ConditioningAttributes) -> bool:
    if a.text != b.text or a.wav.keys() != b.wav.keys() or a.joint_embed.keys() != b.joint_embed.keys():
        return False
    if a.joint_embed:  # not compared element-wise: treat as distinct
        return False
    for name, x in a.wav.items():
        y = b.wav[name]
        if x.sample_rate != y.sample_rate or x.path != y.path or x.seek_time != y.seek_time:
            return False
        if not (torch.equal(x.length, y.length) and x.wav.shape == y.wav.shape and torch.equal(x.wav, y.wav)):
            return False
    return True


def _check_inputs(
    lm: LMModel,
    attributes: list,
    prompt_tokens: torch.Tensor | None,
    max_gen_len: int,
    top_k: int,
    top_p: float,
    temp: float,
) -> int:
    if prompt_tokens is not None:
        if prompt_tokens.dim() != 3 or prompt_tokens.shape[1] != lm.num_codebooks:
            raise ValueError(
                f"prompt_tokens must be [B, K={lm.num_codebooks}, T], got shape {tuple(prompt_tokens.shape)}"
            )
        batch = prompt_tokens.shape[0]
        if attributes and len(attributes) != batch:
            raise ValueError(f"{len(attributes)} attributes for {batch} prompts: pass one per prompt")
        if prompt_tokens.shape[-1] >= max_gen_len:
            raise ValueError(
                f"the prompt ({prompt_tokens.shape[-1]} steps) must be shorter than max_gen_len ({max_gen_len})"
            )
    else:
        batch = len(attributes) if attributes else 1
    if max_gen_len < 1:
        raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
    if top_k < 0 or top_k > lm.card:
        raise ValueError(f"top_k must be in [0, card={lm.card}], got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if temp < 0:
        raise ValueError(f"temp must be >= 0, got {temp}")
    return batch


@dataclass
class _Plan:
    """Everything about the pattern that the step loop needs, computed once."""

    gen_sequence: torch.Tensor  # [B, K, S] prompt / special tokens filled, -1 elsewhere
    invalid: torch.Tensor  # [K, S] bool: positions the pattern leaves empty (special token)
    start: int  # first sequence step to sample


def _plan(lm: LMModel, prompt_tokens: torch.Tensor | None, batch: int, max_gen_len: int, device) -> _Plan:
    pattern = lm.pattern_provider.get_pattern(max_gen_len)
    codes = torch.full((batch, lm.num_codebooks, max_gen_len), -1, dtype=torch.long, device=device)
    prompt_len = 0
    if prompt_tokens is not None:
        prompt_len = prompt_tokens.shape[-1]
        codes[..., :prompt_len] = prompt_tokens.to(device)
    gen_sequence, _, mask = pattern.build_pattern_sequence(codes, lm.special_token_id)
    start = pattern.get_first_step_with_timesteps(prompt_len)
    assert start is not None
    return _Plan(gen_sequence, ~mask.bool(), start)


def _finish(lm: LMModel, plan: _Plan, max_gen_len: int) -> torch.Tensor:
    pattern = lm.pattern_provider.get_pattern(max_gen_len)
    seq = plan.gen_sequence
    if (seq == -1).any():
        raise RuntimeError("internal error: the generated sequence has unfilled steps")
    out_codes, _, _ = pattern.revert_pattern_sequence(seq, special_token=-1)
    out_codes = out_codes[..., :max_gen_len]
    if not ((out_codes >= 0) & (out_codes <= lm.card)).all():
        raise RuntimeError("internal error: generated codes out of range")
    return out_codes


def _decode(
    fast: FastLM,
    lm: LMModel,
    attributes: list,
    plan: _Plan,
    *,
    cfg_coef: float,
    choose: tp.Callable[[int, torch.Tensor], torch.Tensor],
    callback: Callback | None,
    static: bool | None = None,
    bucket: int | None = None,
) -> None:
    """The step loop. `choose(offset, logits [B, K, card]) -> [B, K, 1]` picks each step's tokens.

    `static`: run the steps after the first as `_StaticStep`s (CUDA graphs on CUDA); None: where they pay, on CUDA in
    half precision (the exact `quantize=None` path keeps audiocraft's shapes, hence its kernels, everywhere).
    """
    if static is None:
        static = fast.device.type == "cuda" and fast.quantize in _HALF
    bucket = STATIC_BUCKET if bucket is None else bucket
    seq = plan.gen_sequence
    B = seq.shape[0]
    cond = _condition_tensors(lm, attributes)
    guided = bool(cond)
    special = lm.special_token_id
    S = seq.shape[-1]

    x = fast.embed(seq[..., : plan.start])
    # Conditions come out of the LM's own modules in its dtype; a half-precision copy computes in its own.
    cond = {name: (c.to(x.dtype), mask) for name, (c, mask) in cond.items()}
    if guided:
        x = torch.cat([x, x], dim=0)
    # The LM's own fuser prepends conditions (melody chroma) and builds the cross-attention source.
    x, cross_src = lm.fuser(x, cond)
    prepend = x.shape[1] - plan.start
    capacity = prepend + S
    if static:
        capacity = _bucket_end(capacity - 1, bucket)  # whole buckets: every step's attended length exists
    state = _new_state(fast, x.shape[0], capacity, cross_src, zeroed=static)
    step = _StaticStep(fast, state, B, guided, cfg_coef, bucket) if static else None

    invalid = [plan.invalid[:, t] for t in range(S)]
    any_invalid = [bool(m.any()) for m in invalid]
    total = S - plan.start
    for offset in range(plan.start, S):
        if step is not None and offset > plan.start:
            logits = step(seq[..., offset - 1 : offset], state.pos)
        else:
            logits = _logits(fast, _forward(fast, state, x))
            if guided:
                cond_logits, uncond_logits = logits.split(B, dim=0)
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_coef
        next_token = choose(offset, logits)
        if any_invalid[offset]:
            next_token[:, invalid[offset]] = special
        column = seq[..., offset : offset + 1]
        column.copy_(torch.where(column == -1, next_token, column))
        if callback is not None:
            callback(1 + offset - plan.start, total)
        if step is None and offset + 1 < S:
            x = fast.embed(column)
            if guided:
                x = torch.cat([x, x], dim=0)


def _resolve(lm_or_fast: LMModel | FastLM, quantize: str | None) -> tuple[LMModel, FastLM | None]:
    """(lm, prepared fast model or None when the fast path cannot run this LM)."""
    if isinstance(lm_or_fast, FastLM):
        if quantize not in (None, "auto", lm_or_fast.quantize):
            raise ValueError(
                f"this FastLM was prepared with quantize={lm_or_fast.quantize!r}, called with quantize={quantize!r}"
            )
        return lm_or_fast.lm, lm_or_fast
    lm = lm_or_fast
    if quantize == "auto":
        quantize = default_quantize(next(iter(lm.parameters())).device)
    reason = unsupported_reason(lm)
    if reason is not None:
        logger.warning("Fast generation path unavailable (%s): using audiocraft's LMModel.generate", reason)
        return lm, None
    return lm, FastLM(lm, quantize)


@torch.inference_mode()
def generate_tokens(
    lm: LMModel | FastLM,
    attributes: list[ConditioningAttributes],
    prompt_tokens: torch.Tensor | None,
    max_gen_len: int,
    use_sampling: bool = True,
    temp: float = 1.0,
    top_k: int = 250,
    top_p: float = 0.0,
    cfg_coef: float | None = 3.0,
    callback: Callback | None = None,
    quantize: str | None = None,
    static: bool | None = None,
) -> torch.Tensor:
    """Sample `[B, K, max_gen_len]` codes (prompt included), like `lm.generate(prompt_tokens, attributes, ...)`.

    Args:
        lm: an audiocraft `LMModel` (in eval mode), or a `FastLM` prepared from one (reused across calls).
        attributes: one `ConditioningAttributes` per sample (text, and `self_wav` for melody models), exactly as
            `LMModel.generate` takes them; classifier-free guidance batches them with their nulled copies.
            May be empty for an unconditional model (then no guidance).
        prompt_tokens: `[B, K, T_prompt]` codes to continue, or None.
        max_gen_len: total length in frames, prompt included.
        use_sampling, temp, top_k, top_p: as in audiocraft (`top_p > 0` wins over `top_k`; greedy when
            `use_sampling` is False or `temp == 0`).
        cfg_coef: classifier-free guidance coefficient (None: the LM's own `cfg_coef`).
        callback: `callback(steps_done, steps_total)` after each step, as audiocraft calls it.
        quantize: None (the LM's dtype: identical tokens to audiocraft in fp32), `'int8'` (CPU), `'bf16'`,
            `'fp16'`, or `'auto'` (`default_quantize(device)`). When `lm` is a `FastLM` its own setting is used
            (None / 'auto' accepted, another value is an error).
        static: decode with fixed-shape steps (`_StaticStep`: attention over whole cache buckets with a length mask,
            positions as a tensor), captured as CUDA graphs on CUDA; None: on CUDA in half precision only.
    Returns:
        `[B, K, max_gen_len]` long tensor of codes in `[0, card)`.
    """
    lm_model, fast = _resolve(lm, quantize)
    attributes = list(attributes or [])
    batch = _check_inputs(lm_model, attributes, prompt_tokens, max_gen_len, top_k, top_p, temp)
    cfg = lm_model.cfg_coef if cfg_coef is None else cfg_coef
    if lm_model.training:
        raise RuntimeError("generation needs the LM in eval mode: call lm.eval() first")
    if fast is None:
        return lm_model.generate(
            prompt_tokens,
            attributes,
            num_samples=None if prompt_tokens is not None or attributes else batch,
            max_gen_len=max_gen_len,
            use_sampling=use_sampling,
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            cfg_coef=cfg,
            callback=callback,
        )
    plan = _plan(lm_model, prompt_tokens, batch, max_gen_len, fast.device)

    def choose(_offset: int, logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, use_sampling, temp, top_k, top_p)

    with torch.autocast(fast.device.type, enabled=False):
        _decode(fast, lm_model, attributes, plan, cfg_coef=cfg, choose=choose, callback=callback, static=static)
    return _finish(lm_model, plan, max_gen_len)


class FastSampler:
    """`lm.generate` replacement with the call shape `(lm, prompt_tokens, attributes, *, max_gen_len, callback,
    **gen_params)`; keeps one prepared `FastLM` per LM (weakly: it goes away with the LM).

    For long-lived quantized copies (`'int8'`, `'bf16'`, `'fp16'`) and for LoRA-wrapped LMs (adapters are folded
    into snapshots) call `forget(lm)` after changing the LM's weights; the exact path (`quantize=None`) of a plain LM
    reads the LM's own parameters and never goes stale.
    """

    def __init__(self, quantize: str | None = "auto"):
        if quantize not in (*QUANTIZE_CHOICES, "auto"):
            raise ValueError(f"quantize must be one of {(*QUANTIZE_CHOICES, 'auto')}, got {quantize!r}")
        self.quantize = quantize
        self._prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def prepare(self, lm: LMModel) -> FastLM | None:
        """The prepared model for `lm` (built on first use), or None when the fast path cannot run it."""
        if lm not in self._prepared:
            _, fast = _resolve(lm, self.quantize)
            self._prepared[lm] = fast
        return self._prepared[lm]

    def forget(self, lm: LMModel) -> None:
        self._prepared.pop(lm, None)

    def __call__(
        self,
        lm: LMModel,
        prompt_tokens: torch.Tensor | None,
        attributes: list[ConditioningAttributes],
        *,
        max_gen_len: int,
        callback: Callback | None = None,
        use_sampling: bool = True,
        temp: float = 1.0,
        top_k: int = 250,
        top_p: float = 0.0,
        cfg_coef: float | None = None,
        two_step_cfg: bool | None = None,
    ) -> torch.Tensor:
        if two_step_cfg:
            logger.warning("two_step_cfg=True is not implemented by the fast path: using LMModel.generate")
            return lm.generate(
                prompt_tokens,
                attributes,
                max_gen_len=max_gen_len,
                use_sampling=use_sampling,
                temp=temp,
                top_k=top_k,
                top_p=top_p,
                cfg_coef=cfg_coef,
                two_step_cfg=True,
                callback=callback,
            )
        fast = self.prepare(lm)
        return generate_tokens(
            lm if fast is None else fast,
            attributes,
            prompt_tokens,
            max_gen_len,
            use_sampling=use_sampling,
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            cfg_coef=cfg_coef,
            callback=callback,
        )
