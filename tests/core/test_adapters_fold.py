"""One LoRA fold (`adapters.fold_lora`) behind every place an adapter becomes a weight, and one target matcher
(`adapters.match_targets`) behind the model's and the layout's checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core import adapters
from core.versions import load_musicgen
from generation import fast
from training.methods import lora


def adapted_tiny(seed: int = 0, rank: int = 2, alpha: float = 6.0) -> nn.Module:
    """The tiny LM with adapters on every target, B non-zero (an untrained adapter changes nothing)."""
    lm = load_musicgen("tiny", "cpu").lm
    adapters.add_lora(lm, adapters.lora_target_names(lm), rank, alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return lm


def test_fold_is_the_weight_plus_the_scaled_low_rank_product():
    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(shape, generator=gen) for shape in ((6, 5), (2, 5), (6, 2)))
    torch.testing.assert_close(adapters.fold_lora(w, a, b, 1.5), w + 1.5 * (b @ a), rtol=0, atol=0)
    assert adapters.fold_lora(w.half(), a, b, 1.5).dtype == torch.float16


def test_every_fold_agrees_with_the_adapted_forward():
    """The merged state dict, `LoRALinear.merged`, the attention's adapted `in_proj_weight` and the fast sampler's
    weights are one formula: each equals what the adapter modules compute."""
    lm = adapted_tiny()
    scale = 6.0 / 2
    merged = adapters.merge_lora_state(lm.state_dict(), scale)
    x = torch.randn(3, lm.dim, generator=torch.Generator().manual_seed(1))
    linears = {n: m for n, m in lm.named_modules() if isinstance(m, adapters.LoRALinear)}
    attentions = {n: m for n, m in lm.named_modules() if isinstance(m, adapters.LoRAInProj)}
    assert linears and attentions
    with torch.no_grad():
        for name, module in linears.items():
            plain = module.merged()
            torch.testing.assert_close(plain.weight, merged[name + ".weight"])
            folded, _ = fast._linear_weights(module)
            torch.testing.assert_close(folded, merged[name + ".weight"])
            if module.in_features == lm.dim:
                torch.testing.assert_close(plain(x), module(x), atol=1e-5, rtol=1e-5)
        for name, attn in attentions.items():
            torch.testing.assert_close(attn.in_proj_weight, merged[name + ".in_proj_weight"])
            assert not torch.equal(attn.in_proj_weight, attn._parameters["in_proj_weight"])


def test_one_matcher_for_the_model_and_the_layout():
    lm = load_musicgen("tiny", "cpu").lm
    names = adapters.lora_target_names(lm)
    assert adapters.select_targets(lm, "v, q ,linears.*, q") == adapters.match_targets(names, "v, q ,linears.*, q")
    chosen = adapters.match_targets(names, "v,q")
    assert chosen == [n for n in names if n.endswith((".q", ".v"))]  # model order, each once
    layout = lora.layout_target_names(2, 4)
    assert lora.check_targets("layers.1.*", layout) == adapters.match_targets(layout, "layers.1.*")
    for patterns, words in ((" , ", "no LoRA target given"), ("attn_q", "'attn_q' matches no module")):
        with pytest.raises(ValueError, match=words):
            adapters.match_targets(names, patterns)
        with pytest.raises(ValueError, match=words):  # InputError is a ValueError naming lora_targets
            lora.check_targets(patterns, layout)
