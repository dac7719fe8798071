"""Next-token sampling with audiocraft's own functions, so the random draws match `LMModel.generate`'s."""

from __future__ import annotations

import torch


def sample_next_token(logits: torch.Tensor, use_sampling: bool, temp: float, top_k: int, top_p: float) -> torch.Tensor:
    """`[B, K, card]` -> `[B, K, 1]`: top-p if set, else top-k if set, else plain multinomial; argmax when greedy."""
    from audiocraft.utils import utils

    if use_sampling and temp > 0.0:
        probs = torch.softmax(logits / temp, dim=-1)
        if top_p > 0.0:
            return utils.sample_top_p(probs, p=top_p)
        if top_k > 0:
            return utils.sample_top_k(probs, k=top_k)
        return utils.multinomial(probs, num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)
