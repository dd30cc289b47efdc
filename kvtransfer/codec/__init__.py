"""KV codec: ship a request's KV cache raw, bit-exact compressed, or quantized + rANS-coded.

Public surface:
    levels     LevelConfig, get_level, level_names, level_for_bits, register_level
    streams    KVEncoder / KVDecoder (header + independent per-layer sections, CRC32 each),
               encode_request / decode_request, ModelFingerprint, StreamHeader
    control    choose_level (per chunk: raw if the link keeps up, else best level that fits),
               coding_rates / CodingRates (how fast coding runs where it runs)
    errors     CodecError (a ValueError) for corrupt, truncated, mismatched or non-finite input
See docs/codec.md for the format and measured numbers.
"""

from kvtransfer.codec.codec import KVDecoder, KVEncoder, decode_request, encode_request, fingerprint_of
from kvtransfer.codec.controller import DECLARED_RATES, CodingRates, choose_level, coding_rates, transfer_time_s
from kvtransfer.codec.errors import CodecError
from kvtransfer.codec.format import FORMAT_VERSION, MAGIC, ModelFingerprint, StreamHeader, parse_header, split_stream
from kvtransfer.codec.levels import (QUALITY_ORDER, LevelConfig, get_level, level_for_bits, level_names,
                                     register_level)


def bits_per_element(stream_bytes: int, num_layers: int, num_tokens: int, num_kv_heads: int, head_dim: int) -> float:
    """All-in bits per K/V element: everything on the wire (header, tables, scales, escapes)."""
    return 8.0 * stream_bytes / (2 * num_layers * num_tokens * num_kv_heads * head_dim)


__all__ = [
    "CodecError", "CodingRates", "DECLARED_RATES", "FORMAT_VERSION", "KVDecoder", "KVEncoder", "LevelConfig",
    "MAGIC", "ModelFingerprint", "QUALITY_ORDER", "StreamHeader", "bits_per_element", "choose_level", "coding_rates",
    "decode_request", "encode_request",
    "fingerprint_of", "get_level", "level_for_bits", "level_names", "parse_header", "register_level",
    "split_stream", "transfer_time_s",
]
