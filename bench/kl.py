"""How far a quantized sampler's next-token distributions are from the LM's own precision (benchmarks and tests).

`next_token_kl` drives the fast sampler's own step loop (`generation.fast`: the pattern plan and the decode loop
with a token chooser), so what it measures is exactly the distributions `generate_tokens` samples from; it lives
here because only the benchmarks (bench/generate.py, bench/gpu_check.py) and the tests use it.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch

from core.sampling import sample_next_token
from generation.fast import FastLM, _check_inputs, _decode, _plan

if tp.TYPE_CHECKING:
    from audiocraft.models.lm import LMModel
    from audiocraft.modules.conditioners import ConditioningAttributes


@dataclass
class DistributionGap:
    """How far a quantized model's next-token distributions are from the reference's, on the same contexts."""

    quantize: str | None
    steps: int  # sequence steps compared
    tokens: int  # (sample, codebook, step) distributions compared (pattern-masked ones excluded)
    kl_mean: float  # mean KL(p_ref || p_quant) in nats per token
    kl_p99: float
    kl_max: float
    top1_agreement: float  # fraction of tokens where both argmaxes agree
    ref_entropy: float  # mean entropy of the reference distributions (nats; uniform = ln(card))

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.inference_mode()
def next_token_kl(
    lm: LMModel,
    attributes: list[ConditioningAttributes],
    max_gen_len: int,
    quantize: str | FastLM = "int8",
    prompt_tokens: torch.Tensor | None = None,
    top_k: int = 250,
    cfg_coef: float | None = 3.0,
    reference: FastLM | None = None,
) -> DistributionGap:
    """KL divergence of next-token distributions, quantized vs the LM's own precision, over `max_gen_len` frames.

    The reference (`reference`, else the LM unquantized) samples a sequence (top-k, guided); the quantized model
    is then teacher-forced on exactly that sequence, so both predict every step from identical contexts. The
    distributions compared are the guided ones before temperature and top-k (`softmax(uncond + (cond - uncond) *
    cfg_coef)`), i.e. what sampling starts from.
    """
    ref = reference if reference is not None else FastLM(lm, None)
    quant = quantize if isinstance(quantize, FastLM) else FastLM(lm, quantize)
    attributes = list(attributes)
    batch = _check_inputs(lm, attributes, prompt_tokens, max_gen_len, top_k, 0.0, 1.0)
    cfg = lm.cfg_coef if cfg_coef is None else cfg_coef
    ref_logits: dict[int, torch.Tensor] = {}
    quant_logits: dict[int, torch.Tensor] = {}

    ref_plan = _plan(lm, prompt_tokens, batch, max_gen_len, ref.device)

    def sample(offset: int, logits: torch.Tensor) -> torch.Tensor:
        ref_logits[offset] = logits.float().cpu()
        return sample_next_token(logits, True, 1.0, top_k, 0.0)

    with torch.autocast(ref.device.type, enabled=False):
        _decode(ref, lm, attributes, ref_plan, cfg_coef=cfg, choose=sample, callback=None)
    forced = ref_plan.gen_sequence
    quant_plan = _plan(lm, prompt_tokens, batch, max_gen_len, quant.device)

    def force(offset: int, logits: torch.Tensor) -> torch.Tensor:
        quant_logits[offset] = logits.float().cpu()
        return forced[..., offset : offset + 1].to(logits.device).clone()

    with torch.autocast(quant.device.type, enabled=False):
        _decode(quant, lm, attributes, quant_plan, cfg_coef=cfg, choose=force, callback=None)

    kls, agree, entropies = [], [], []
    for offset, p_logits in ref_logits.items():
        valid = ~ref_plan.invalid[:, offset].cpu()  # [K]
        log_p = torch.log_softmax(p_logits[:, valid], dim=-1)  # [B, K_valid, card]
        log_q = torch.log_softmax(quant_logits[offset][:, valid], dim=-1)
        p = log_p.exp()
        kls.append((p * (log_p - log_q)).sum(-1).flatten())
        agree.append((log_p.argmax(-1) == log_q.argmax(-1)).flatten())
        entropies.append(-(p * log_p).sum(-1).flatten())
    kl = torch.cat(kls).double()
    return DistributionGap(
        quantize=quant.quantize,
        steps=len(ref_logits),
        tokens=kl.numel(),
        kl_mean=kl.mean().item(),
        kl_p99=torch.quantile(kl, 0.99).item(),
        kl_max=kl.max().item(),
        top1_agreement=torch.cat(agree).float().mean().item(),
        ref_entropy=torch.cat(entropies).double().mean().item(),
    )
