"""Token sampling: greedy rows by argmax; the rest by temperature, top-k and top-p.

A seeded request draws token i from a generator seeded by (seed, i): sampling holds no
state, so the same request reproduces on any instance, in any batch, after a KV handoff."""

from __future__ import annotations

import torch

from engine.request import SamplingParams


def token_generator(seed: int | None, position: int, device: torch.device) -> torch.Generator | None:
    """The generator for the token at `position` of a request; None (global RNG) if unseeded."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + position) & 0x7FFF_FFFF_FFFF_FFFF)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [vocab] (already temperature-scaled) -> logits with excluded tokens at -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits [num_seqs, vocab] float32 -> one token id per row; `positions` are the
    positions the sampled tokens will take (the request's token count)."""
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = token_generator(p.seed, positions[i], logits.device)
        tokens[i] = torch.multinomial(probs, 1, generator=gen).squeeze(0)
    return tokens.tolist()
