"""Per-chunk level choice (CacheGen-style): raw if the link keeps up, else the best-quality
level whose encode + transfer + decode time fits the budget.

Pure Python: the router and the simulator call it without a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvtransfer.codec.levels import QUALITY_ORDER, get_level

# Measured GPU rates (bytes of raw KV per second) belong in the caller's profile; without
# them coding time is ignored (the GPU codec is much faster than any network link).


def transfer_time_s(num_bytes_raw: int, level: str, link_bytes_per_s: float, *, dtype_bits: int = 16,
                    bits_per_element: Mapping[str, float] | None = None,
                    encode_bytes_per_s: Mapping[str, float] | None = None,
                    decode_bytes_per_s: Mapping[str, float] | None = None) -> float:
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
                 decode_bytes_per_s: Mapping[str, float] | None = None) -> str:
    """Level name for one chunk of `num_bytes_raw` bytes that must land within `time_budget_s`.

    Walks `levels` best quality first; returns the first that fits, or the smallest-output
    level when none does (sending something is better than stalling the request).
    """
    if link_bytes_per_s <= 0:
        raise ValueError(f"link_bytes_per_s must be > 0, got {link_bytes_per_s}")
    if not levels:
        raise ValueError("levels must not be empty")
    kw = dict(dtype_bits=dtype_bits, bits_per_element=bits_per_element,
              encode_bytes_per_s=encode_bytes_per_s, decode_bytes_per_s=decode_bytes_per_s)
    times = {name: transfer_time_s(num_bytes_raw, name, link_bytes_per_s, **kw) for name in levels}
    for name in levels:
        if times[name] <= time_budget_s:
            return name
    return min(levels, key=lambda name: times[name])
