"""Codec levels: named, frozen parameter sets, chosen through a registry.

A level's parameters travel in every stream header, so a decoder never consults this
registry to read a stream: the registry only says what an *encoder* uses for a name.

Kinds:
    raw       tensor bytes as they are
    lossless  byte planes (sign/exponent plane, mantissa planes) entropy-coded, bit-exact
    zstd      zstandard on the raw bytes (baseline only)
    quant     scalar quantization + escapes + interleaved rANS (int8, default, aggressive,
              and the CacheGen-as-released baseline)
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

from kvtransfer.codec.errors import CodecError

KINDS = ("raw", "lossless", "zstd", "quant")
SCALE_MODES = ("channel", "token_head", "token", "head")  # group a scale is shared by
STAT_MODES = ("meanabs", "absmax")                   # how a group's scale is measured
TABLE_MODES = ("head", "channel_cdf16")              # one rANS table per head / per channel


@dataclass(frozen=True)
class LevelConfig:
    """Parameters of one level. Steps are `alpha * band_multiplier(layer) * scale(group)`.

    `k_scale`/`v_scale`: which elements share a scale (keys per channel, values per token
    and head, or CacheGen's one scale per token across all heads). `stat`: meanabs scales
    (steps relative to a typical value; values beyond `max_q` steps are escaped and sent
    exact) or absmax (CacheGen: nothing escapes). `layer_bands`: [[end_fraction, multiplier],
    ...] over layers, so early layers get finer steps. `num_sink`/`num_recent`: the first
    and last tokens of the request are sent exact. `lane_len`: most symbols per rANS lane.
    """

    name: str
    kind: str
    expected_bits: float = 16.0          # bits/element for fp16 input, used by the controller
    alpha_k: float = 1.0
    alpha_v: float = 1.0
    k_scale: str = "channel"
    v_scale: str = "token_head"
    stat: str = "meanabs"
    max_q: int = 31                      # alphabet = 2 * max_q + 2 (last symbol = escape)
    layer_bands: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
    num_sink: int = 0
    num_recent: int = 0
    table: str = "head"
    lane_len: int = 2048
    chunk_tokens: int = 0                # informational: the chunk size a baseline assumes
    lossy: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CodecError(f"level {self.name!r}: kind {self.kind!r} not one of {KINDS}")
        if self.k_scale not in SCALE_MODES or self.v_scale not in SCALE_MODES:
            raise CodecError(f"level {self.name!r}: k_scale/v_scale must be in {SCALE_MODES}")
        if self.stat not in STAT_MODES:
            raise CodecError(f"level {self.name!r}: stat {self.stat!r} not one of {STAT_MODES}")
        if self.table not in TABLE_MODES:
            raise CodecError(f"level {self.name!r}: table {self.table!r} not one of {TABLE_MODES}")
        if not 1 <= self.max_q <= 127:
            raise CodecError(f"level {self.name!r}: max_q must be in 1..127, got {self.max_q}")
        if self.lane_len < 1:
            raise CodecError(f"level {self.name!r}: lane_len must be >= 1")
        if self.alpha_k <= 0 or self.alpha_v <= 0:
            raise CodecError(f"level {self.name!r}: alpha_k/alpha_v must be > 0")

    @property
    def alphabet(self) -> int:
        return 2 * self.max_q + 2

    def band_multiplier(self, layer_idx: int, num_layers: int) -> float:
        for end_fraction, mult in self.layer_bands:
            if layer_idx < end_fraction * num_layers:
                return float(mult)
        return float(self.layer_bands[-1][1])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_bands"] = [list(b) for b in self.layer_bands]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "LevelConfig":
        if not isinstance(d, dict):
            raise CodecError(f"level params must be a map, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CodecError(f"level params: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "layer_bands" in d:
            try:
                d["layer_bands"] = tuple((float(a), float(b)) for a, b in d["layer_bands"])
            except (TypeError, ValueError) as exc:
                raise CodecError(f"level params: bad layer_bands {d['layer_bands']!r}") from exc
        try:
            return cls(**d)
        except TypeError as exc:
            raise CodecError(f"level params: {exc}") from exc


_REGISTRY: dict[str, LevelConfig] = {}


def register_level(cfg: LevelConfig) -> LevelConfig:
    _REGISTRY[cfg.name] = cfg
    return cfg


def get_level(name: str | LevelConfig) -> LevelConfig:
    if isinstance(name, LevelConfig):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec level {name!r}; choose one of {sorted(_REGISTRY)}") from None


def level_names() -> list[str]:
    return list(_REGISTRY)


# Quality order, best first: what the controller walks down.
QUALITY_ORDER = ("raw", "lossless", "int8", "default", "aggressive")


def level_for_bits(bits_per_element: float) -> str:
    """The best-quality level whose expected size is <= `bits_per_element` (fp16 input)."""
    for name in QUALITY_ORDER:
        if _REGISTRY[name].expected_bits <= bits_per_element:
            return name
    raise CodecError(f"no level fits {bits_per_element} bits/element; the smallest is "
                     f"{QUALITY_ORDER[-1]!r} at ~{_REGISTRY[QUALITY_ORDER[-1]].expected_bits}")


# Early layers are the most sensitive (CacheGen, KVQuant): finer steps for the first eighth.
_BANDS = ((0.125, 0.5), (1.0, 1.0))

register_level(LevelConfig("raw", "raw", expected_bits=16.0, lossy=False))
register_level(LevelConfig("lossless", "lossless", expected_bits=13.5, lossy=False))
# Keys carry the attention logits and are what the quality hinges on: measured on SmolLM2
# (docs/codec.md), one key scale per head beats per-channel scales at equal bits, and values
# tolerate steps ~7x coarser than keys.
register_level(LevelConfig("int8", "quant", expected_bits=6.5, alpha_k=1 / 24, alpha_v=1 / 24,
                           max_q=127, num_sink=1, layer_bands=((1.0, 1.0),)))
# default: measured on 8 ShareGPT samples (docs/codec.md), a finer first quarter of layers and
# finer values beat finer keys at equal bits (keys 0.22 / values 2.5 was worst).
register_level(LevelConfig("default", "quant", expected_bits=3.5, alpha_k=0.30, alpha_v=1.8,
                           k_scale="head", max_q=31, num_sink=4, num_recent=8,
                           layer_bands=((0.25, 0.5), (1.0, 1.0))))
register_level(LevelConfig("aggressive", "quant", expected_bits=2.35, alpha_k=0.65, alpha_v=3.0,
                           k_scale="head", max_q=31, num_sink=4, num_recent=0, layer_bands=_BANDS))
register_level(LevelConfig("zstd", "zstd", expected_bits=15.0, lossy=False))


def _cachegen(chunk_tokens: int) -> LevelConfig:
    # CacheGen as released (LMCache): one absmax scale per (layer, token) across all heads,
    # 32 bins in the early layers and 16 later, a 16-bit CDF per (layer, K/V, channel) per chunk.
    return LevelConfig(f"cachegen{chunk_tokens}", "quant", expected_bits=4.5, alpha_k=1 / 8,
                       alpha_v=1 / 8, k_scale="token", v_scale="token", stat="absmax", max_q=16,
                       layer_bands=((1 / 3, 0.5), (1.0, 1.0)), table="channel_cdf16",
                       chunk_tokens=chunk_tokens)


register_level(_cachegen(256))
register_level(dataclasses.replace(_cachegen(256), name="cachegen"))
register_level(_cachegen(2048))
