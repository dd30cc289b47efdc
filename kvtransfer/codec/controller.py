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
    """How fast each level codes where the coding runs: bytes of raw KV per second, plus a
    fixed encode + decode latency per layer (a GPU codes one layer in ~2k serial rANS steps per
    lane whatever its size, so small layers are latency-bound)."""
    encode_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    decode_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    per_layer_s: Mapping[str, float] = field(default_factory=dict)


# Declared rates, per layer of one request as the cluster codes them (docs/codec.md).
# cuda: H200, 2026-11-27, LayerPacker.pack / LayerUnpacker.unpack of one Llama-3-8B-shaped layer
#       (benchmarks/codec_speed.py channel rows), fitted as latency + bytes / rate over 256- and
#       2048-token layers; int8 and aggressive use default's figures (same kernels).
# cpu:  the CPU reference, one 256-token Llama-3-8B-shaped layer per call, 2 cores, 2026-11-27.
DECLARED_RATES: dict[str, CodingRates] = {
    "cuda": CodingRates({"lossless": 1.4e9, "int8": 4.9e9, "default": 4.9e9, "aggressive": 4.9e9},
                        {"lossless": 2.5e9, "int8": 2.0e9, "default": 2.0e9, "aggressive": 2.0e9},
                        {"lossless": 2.9e-3, "int8": 2.7e-3, "default": 2.7e-3, "aggressive": 2.7e-3}),
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
                    decode_bytes_per_s: Mapping[str, float] | None = None,
                    coding_s: float = 0.0) -> float:
    """Seconds to encode, send and decode a chunk (serial: the sender thread encodes then sends
    each layer, so this is an upper bound on the pipelined time). `coding_s`: fixed coding
    latency of the whole chunk (all its layers), added for coded levels."""
    bits = (bits_per_element or {}).get(level, get_level(level).expected_bits)
    wire = num_bytes_raw * min(bits, dtype_bits) / dtype_bits
    t = wire / link_bytes_per_s
    if level == "raw":
        return t
    for rates in (encode_bytes_per_s, decode_bytes_per_s):
        if rates and rates.get(level):
            t += num_bytes_raw / rates[level]
    return t + coding_s


def choose_level(num_bytes_raw: int, link_bytes_per_s: float, time_budget_s: float, *,
                 levels: Sequence[str] = QUALITY_ORDER, dtype_bits: int = 16,
                 bits_per_element: Mapping[str, float] | None = None,
                 encode_bytes_per_s: Mapping[str, float] | None = None,
                 decode_bytes_per_s: Mapping[str, float] | None = None,
                 rates: CodingRates | None = None, num_layers: int = 1) -> str:
    """Level name for one chunk of `num_bytes_raw` bytes that must land within `time_budget_s`.

    Walks `levels` best quality first; returns the first that fits, or the fastest level when
    none does (sending something is better than stalling the request). `rates` supplies the
    coding speeds that `encode_bytes_per_s` / `decode_bytes_per_s` do not, and its per-layer
    latency for `num_layers` layers.
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
    fixed = rates.per_layer_s if rates is not None else {}
    times = {name: transfer_time_s(num_bytes_raw, name, link_bytes_per_s, coding_s=num_layers * fixed.get(name, 0.0),
                                   **kw) for name in levels}
    for name in levels:
        if times[name] <= time_budget_s:
            return name
    return min(levels, key=lambda name: times[name])
