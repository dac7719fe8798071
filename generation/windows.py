"""Outputs longer than the model's window (30 s), and continuation windows: `sample_windows`.

Beyond `max_duration` each new window is conditioned on the last `max_duration - EXTEND_STRIDE` seconds of what came
before (audiocraft's own extension scheme), and a melody is tiled so that the chroma conditioner sees the part of
it under the current window. One sampler call per window for the whole batch.
"""

from __future__ import annotations

import typing as tp

import torch

from core.progress import progress_bar

EXTEND_STRIDE = 18.0  # seconds of new audio per window beyond the first; audiocraft's default
SampleFn = tp.Callable[..., torch.Tensor]


def lm_generate(lm, prompt_tokens, attributes, *, max_gen_len: int, callback, **gen_params) -> torch.Tensor:
    """The LM's own `generate` in the sampler call shape (what runs without a fast sampler)."""
    return lm.generate(prompt_tokens, attributes, max_gen_len=max_gen_len, callback=callback, **gen_params)


@torch.no_grad()
def sample_windows(
    model,
    attributes: list,
    prompt_tokens: torch.Tensor | None,
    duration: float,
    gen_params: dict[str, tp.Any],
    *,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample `[B, K, T]` tokens for `duration` seconds (one sample per attribute), prompt tokens included.

    Beyond the model's window (`max_duration`, 30 s) each new window is conditioned on the last
    `max_duration - EXTEND_STRIDE` seconds of what came before; a melody is tiled to follow the window.
    """
    from audiocraft.modules.conditioners import WavCondition

    sample_fn = sample_fn or lm_generate
    frame_rate, window = model.frame_rate, model.max_duration
    total_len = int(duration * frame_rate)
    bar = progress_bar(total=total_len, desc="generating", unit="step", disable=not progress, leave=False)
    offset = 0  # frames of final output before the current window's prompt
    prompt_len = 0 if prompt_tokens is None else prompt_tokens.shape[-1]

    def callback(generated: int, _to_generate: int) -> None:
        # `generated` counts the window's new steps only: its prompt (the overlap with the previous window, or the
        # audio to continue) is already part of the output.
        bar.n = min(total_len, offset + prompt_len + generated)
        bar.refresh()

    try:
        if duration <= window:
            with model.autocast:
                return sample_fn(
                    model.lm, prompt_tokens, attributes, max_gen_len=total_len, callback=callback, **gen_params
                )
        melodies = [attr.wav.get("self_wav") for attr in attributes]
        pieces: list[torch.Tensor] = []
        stride = int(EXTEND_STRIDE * frame_rate)
        if prompt_tokens is not None:
            pieces.append(prompt_tokens)
        while offset + prompt_len < total_len:
            window_len = int(min(duration - offset / frame_rate, window) * frame_rate)
            for attr, melody in zip(attributes, melodies, strict=True):
                if melody is None or int(melody.length.item()) == 0:
                    continue
                # The chroma conditioner sees one window: tile the melody from this window's start.
                start = int(offset / frame_rate * model.sample_rate)
                target = int(window * model.sample_rate)
                positions = torch.arange(start, start + target, device=melody.wav.device) % int(melody.length.item())
                attr.wav["self_wav"] = WavCondition(
                    melody.wav[..., positions],
                    torch.full_like(melody.length, target),
                    melody.sample_rate,
                    [None],
                    [0.0],
                )
            with model.autocast:
                out = sample_fn(
                    model.lm, prompt_tokens, attributes, max_gen_len=window_len, callback=callback, **gen_params
                )
            pieces.append(out if prompt_tokens is None else out[..., prompt_tokens.shape[-1] :])
            prompt_tokens = out[..., stride:]
            prompt_len = prompt_tokens.shape[-1]
            offset += stride
        return torch.cat(pieces, dim=-1)[..., :total_len]
    finally:
        bar.close()
