"""When a request is done generating: one function every worker calls after appending a token."""

from __future__ import annotations

from typing import Any

from engine.request import Request


def stop_reason(req: Request, eos_token_ids: tuple[int, ...], max_model_len: int,
                tokenizer: Any | None = None) -> str | None:
    """"stop" (EOS, stop token or stop string), "length" (max_tokens or context), or None."""
    p = req.params
    last = req.output_token_ids[-1]
    if (not p.ignore_eos and last in eos_token_ids) or last in p.stop_token_ids:
        return "stop"
    if p.stop and tokenizer is not None:
        text = tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        if any(s in text for s in p.stop):
            return "stop"
    if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= max_model_len:
        return "length"
    return None
