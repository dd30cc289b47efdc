"""Wire format: a msgpack header, then one framed section per layer (decodable alone).

    stream  = MAGIC(4) | u32 header_len | u32 crc32(header) | header
              | section*                                   (any order; one per layer)
    section = SECTION_MAGIC(2) | u32 payload_len | u32 crc32(payload) | payload
    header  = msgpack {magic, version, model: {num_layers, num_kv_heads, head_dim, dtype},
                       tokens: [start, end), seq_len, level, params}
    payload = msgpack {layer, k: tensor_section, v: tensor_section}   (bin fields only; no pickle)

All integers little-endian. Every failure raises CodecError naming the field.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from kvtransfer.codec.errors import CodecError
from kvtransfer.codec.levels import LevelConfig

MAGIC = b"SSKV"
SECTION_MAGIC = b"LY"
FORMAT_VERSION = 1
_HDR = struct.Struct("<4sII")
_SEC = struct.Struct("<2sII")
_MAX_BYTES = 1 << 31

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INT_VIEW: dict[torch.dtype, torch.dtype] = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                                            torch.float32: torch.int32}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise CodecError(f"unsupported KV dtype {dtype}; the codec takes {list(DTYPES)}")


@dataclass(frozen=True)
class ModelFingerprint:
    """What a stream's tensors must match on both ends."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # one of DTYPES

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CodecError(f"fingerprint dtype {self.dtype!r} not one of {list(DTYPES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise CodecError(f"fingerprint {name} must be a positive int, got {v!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype}


@dataclass(frozen=True)
class StreamHeader:
    model: ModelFingerprint
    token_start: int
    token_end: int
    seq_len: int
    level: LevelConfig

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    def to_bytes(self) -> bytes:
        body = msgpack.packb({
            "magic": MAGIC.decode(), "version": FORMAT_VERSION, "model": self.model.to_dict(),
            "tokens": [self.token_start, self.token_end], "seq_len": self.seq_len,
            "level": self.level.name, "params": self.level.to_dict(),
        }, use_bin_type=True)
        return _HDR.pack(MAGIC, len(body), zlib.crc32(body)) + body


def _unpack(body: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"{what}: not valid msgpack ({exc})") from exc


def parse_header(data: bytes | memoryview) -> tuple[StreamHeader, int]:
    """(header, bytes consumed) from the start of a stream."""
    data = memoryview(data)
    if len(data) < _HDR.size:
        raise CodecError(f"stream truncated: {len(data)} bytes, a header needs at least {_HDR.size}")
    magic, n, crc = _HDR.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not a KV stream: magic {bytes(magic)!r}, expected {MAGIC!r}")
    body = bytes(data[_HDR.size:_HDR.size + n])
    if len(body) != n:
        raise CodecError(f"header truncated: {len(body)} of {n} bytes")
    if zlib.crc32(body) != crc:
        raise CodecError("header CRC32 mismatch (corrupted header)")
    h = _unpack(body, "header")
    if not isinstance(h, dict) or h.get("magic") != MAGIC.decode():
        raise CodecError("header: missing or wrong magic field")
    if h.get("version") != FORMAT_VERSION:
        raise CodecError(f"header: format version {h.get('version')!r}, this decoder reads {FORMAT_VERSION}")
    try:
        model = ModelFingerprint(**h["model"])
        start, end = (int(v) for v in h["tokens"])
        seq_len = int(h["seq_len"])
        level = LevelConfig.from_dict(h["params"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"header: missing or malformed field ({exc})") from exc
    if not 0 <= start < end or seq_len < end:
        raise CodecError(f"header: bad token range [{start}, {end}) with seq_len {seq_len}")
    if level.name != h.get("level"):
        raise CodecError(f"header: level {h.get('level')!r} disagrees with params name {level.name!r}")
    return StreamHeader(model, start, end, seq_len, level), _HDR.size + n


def frame_section(payload: dict[str, Any]) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _SEC.pack(SECTION_MAGIC, len(body), zlib.crc32(body)) + body


def section_length(data: bytes | memoryview, offset: int = 0) -> int:
    """Total bytes of the section starting at `offset` (checks magic and that it is complete)."""
    data = memoryview(data)
    if len(data) - offset < _SEC.size:
        raise CodecError(f"layer section truncated at byte {offset}: no room for its frame")
    magic, n, _ = _SEC.unpack_from(data, offset)
    if magic != SECTION_MAGIC:
        raise CodecError(f"layer section at byte {offset}: bad magic {bytes(magic)!r}")
    if len(data) - offset - _SEC.size < n:
        raise CodecError(f"layer section at byte {offset} truncated: "
                         f"{len(data) - offset - _SEC.size} of {n} payload bytes")
    return _SEC.size + n


def parse_section(data: bytes | memoryview) -> dict[str, Any]:
    data = memoryview(data)
    size = section_length(data)
    if size != len(data):
        raise CodecError(f"layer section: {len(data) - size} bytes beyond its frame")
    _, n, crc = _SEC.unpack_from(data)
    body = data[_SEC.size:]          # a view: msgpack copies out the bin fields it returns
    if zlib.crc32(body) != crc:
        raise CodecError("layer section CRC32 mismatch (corrupted payload)")
    p = _unpack(body, "layer section")
    if not isinstance(p, dict) or not all(key in p for key in ("layer", "k", "v")):
        raise CodecError("layer section: payload must be a map with layer, k, v")
    return p


def split_stream(stream: bytes | memoryview) -> tuple[StreamHeader, bytes, list[bytes]]:
    """(header, header bytes, [section bytes]) of a whole stream."""
    header, off = parse_header(stream)
    mv = memoryview(stream)
    sections = []
    while off < len(mv):
        size = section_length(mv, off)
        sections.append(bytes(mv[off:off + size]))
        off += size
    return header, bytes(mv[:parse_header(stream)[1]]), sections


def field_bytes(d: dict[str, Any], key: str, what: str, size: int | None = None) -> bytes:
    v = d.get(key)
    if not isinstance(v, (bytes, bytearray)):
        raise CodecError(f"{what}: field {key!r} missing or not bytes")
    if size is not None and len(v) != size:
        raise CodecError(f"{what}: field {key!r} has {len(v)} bytes, expected {size}")
    return bytes(v)


def field_int(d: dict[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise CodecError(f"{what}: field {key!r} missing or not an int")
    return v
