"""Per-chunk level choice (CacheGen-style): raw if the link keeps up, else the best-quality
level whose encode + transfer + decode time fits the budget.

Coding time counts: a caller passes the rates of where its coding runs (`coding_rates("cuda")`
or `coding_rates("cpu")`, or its own measured `CodingRates`), so a level whose coding is
slower than sending raw is never chosen (raw is tried first, and when nothing fits the fastest
option wins). Without rates, coding time is ignored.

Pure Python: the router and the simulator call it without a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvtransfer.codec.levels import QUALITY_ORDER, get_level


@dataclass(frozen=True)
class CodingRates:
    """Bytes of raw KV per second that each level encodes / decodes at, one layer at a time."""
    encode_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    decode_bytes_per_s: Mapping[str, float] = field(default_factory=dict)


# Declared rates, per layer of one request as the cluster codes them (docs/codec.md).
# cuda: H200, 256-token chunks, all layers per launch (the slower chunk size; per-layer calls in
#       the cluster are slower still, see the channel rows of benchmarks/codec_speed.py).
# cpu:  the CPU reference, one 256-token Llama-3-8B-shaped layer per call, 2 cores, 2026-11-27.
DECLARED_RATES: dict[str, CodingRates] = {
    "cuda": CodingRates({"lossless": 17e9, "int8": 17e9, "default": 31e9, "aggressive": 27e9},
                        {"lossless": 23e9, "int8": 21e9, "default": 32e9, "aggressive": 28e9}),
    "cpu": CodingRates({"lossless": 9.5e6, "int8": 6.3e6, "default": 6.5e6, "aggressive": 7.1e6},
                       {"lossless": 10.9e6, "int8": 8.5e6, "default": 10.5e6, "aggressive": 11.1e6}),
}


def coding_rates(where: object) -> CodingRates:
    """Declared rates for where the coding runs: a device type ("cuda", "cpu") or a torch.device."""
    kind = getattr(where, "type", where)
    return DECLARED_RATES.get(str(kind), DECLARED_RATES["cpu"])


def transfer_time_s(num_bytes_raw: int, level: str, link_bytes_per_s: float, *, dtype_bits: int = 16,
                    bits_per_element: Mapping[str, float] | None = None,
                    encode_bytes_per_s: Mapping[str, float] | None = None,
                    decode_bytes_per_s: Mapping[str, float] | None = None) -> float:
    """Seconds to encode, send and decode a chunk (serial: the sender thread encodes then sends
    each layer, so this is an upper bound on the pipelined time)."""
    bits = (bits_per_element or {}).get(level, get_level(level).expected_bits)
    wire = num_bytes_raw * min(bits, dtype_bits) / dtype_bits
    t = wire / link_bytes_per_s
    for rates in (encode_bytes_per_s, decode_bytes_per_s):
        if rates and level != "raw" and rates.get(level):
            t += num_bytes_raw / rates[level]
    return t


def choose_level(num_bytes_raw: int, link_bytes_per_s: float, time_budget_s: float, *,
                 levels: Sequence[str] = QUALITY_ORDER, dtype_bits: int = 16,
                 bits_per_element: Mapping[str, float] | None = None,
                 encode_bytes_per_s: Mapping[str, float] | None = None,
                 decode_bytes_per_s: Mapping[str, float] | None = None,
                 rates: CodingRates | None = None) -> str:
    """Level name for one chunk of `num_bytes_raw` bytes that must land within `time_budget_s`.

    Walks `levels` best quality first; returns the first that fits, or the fastest level when
    none does (sending something is better than stalling the request). `rates` supplies the
    coding speeds that `encode_bytes_per_s` / `decode_bytes_per_s` do not.
    """
    if link_bytes_per_s <= 0:
        raise ValueError(f"link_bytes_per_s must be > 0, got {link_bytes_per_s}")
    if not levels:
        raise ValueError("levels must not be empty")
    if rates is not None:
        encode_bytes_per_s = {**rates.encode_bytes_per_s, **(encode_bytes_per_s or {})}
        decode_bytes_per_s = {**rates.decode_bytes_per_s, **(decode_bytes_per_s or {})}
    kw = dict(dtype_bits=dtype_bits, bits_per_element=bits_per_element,
              encode_bytes_per_s=encode_bytes_per_s, decode_bytes_per_s=decode_bytes_per_s)
    times = {name: transfer_time_s(num_bytes_raw, name, link_bytes_per_s, **kw) for name in levels}
    for name in levels:
        if times[name] <= time_budget_s:
            return name
    return min(levels, key=lambda name: times[name])
