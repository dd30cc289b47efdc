"""The KV-transfer model: how long a request's KV takes from its prefill instance to its
decode instance, for a codec level on a link, overlapped with layer streaming.

The runtime's channel (kvtransfer/sender.py) is one FIFO sender thread per (prefill, decode)
pair: `begin`, then runs of layers, then `done` after the first token. Whenever the thread is
free it takes every layer that is ready as one run (one gather, encode, message); the decode side
unpacks a run once it has landed. Layer l of the last prefill chunk is ready at chunk_start +
step * (l + 1) / layers, so transfer overlaps compute, and a busy channel sends long runs.

    a run of n layers on the sender    per_run_s (link) + encode_per_run_s
                                        + n x (encode(raw bytes) + wire bytes / link [+ per_layer_s])
    the same run on the receiver        decode_per_run_s + n x decode(raw bytes), after it lands

(`per_layer_s` and the codec's per-layer fixed costs come from profiles taken before the channel
sent runs; newer profiles measure fixed costs per run.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from kvtransfer.codec import choose_level, get_level


@dataclass(frozen=True)
class LinkModel:
    """One link kind: bytes/s that reach the other side, and a fixed cost per message."""

    name: str
    bytes_per_s: float
    per_layer_s: float = 0.0     # occupies the channel, per layer (older profiles: one message per layer)
    latency_s: float = 0.0       # delays each request's landing without occupying the channel
    per_run_s: float = 0.0       # occupies the channel, per message (a run of layers)


@dataclass(frozen=True)
class TransferModel:
    kv_bytes_per_token: int                      # raw, all layers, K and V
    num_layers: int
    dtype_bits: int = 16
    # measured bits/element (all-in) and codec speeds in raw bytes/s, per level; missing: not modeled
    bits_per_element: Mapping[str, float] = field(default_factory=dict)
    encode_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    decode_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    copy_bytes_per_s: float | None = None        # gather/scatter of raw KV (D2H+H2D on GPU)
    codec_on_device: bool = False                # GPU codec: only coded bytes cross PCIe
    # fixed seconds on top of raw bytes / rate (a GPU codec's launches and host reads): per run of
    # layers coded together (newer profiles), or per layer (profiles from before runs)
    encode_per_layer_s: Mapping[str, float] = field(default_factory=dict)
    decode_per_layer_s: Mapping[str, float] = field(default_factory=dict)
    encode_per_run_s: Mapping[str, float] = field(default_factory=dict)
    decode_per_run_s: Mapping[str, float] = field(default_factory=dict)

    def wire_bytes(self, num_tokens: int, level: str) -> float:
        bits = self.bits_per_element.get(level, get_level(level).expected_bits)
        raw = num_tokens * self.kv_bytes_per_token
        # expected_bits are for 16-bit input; a raw fp32 cache sends 32 bits
        return raw if level == "raw" else raw * min(bits, self.dtype_bits) / self.dtype_bits

    def codec_times(self, num_tokens: int, level: str) -> tuple[float, float]:
        """(encode, decode) seconds for one layer of one request."""
        if level == "raw":
            return 0.0, 0.0
        raw = num_tokens * self.kv_bytes_per_token / self.num_layers
        enc, dec = self.encode_bytes_per_s.get(level), self.decode_bytes_per_s.get(level)
        return ((self.encode_per_layer_s.get(level, 0.0) + raw / enc) if enc else 0.0,
                (self.decode_per_layer_s.get(level, 0.0) + raw / dec) if dec else 0.0)

    def run_times(self, level: str, link: LinkModel) -> tuple[float, float]:
        """(sender seconds, receiver seconds) of fixed cost per run of layers."""
        if level == "raw":
            return link.per_run_s, 0.0
        return link.per_run_s + self.encode_per_run_s.get(level, 0.0), self.decode_per_run_s.get(level, 0.0)

    def layer_times(self, num_tokens: int, level: str, link: LinkModel) -> tuple[float, float]:
        """(sender seconds, receiver seconds) for one layer of one request, on top of its run's."""
        raw = num_tokens * self.kv_bytes_per_token / self.num_layers
        wire = self.wire_bytes(num_tokens, level) / self.num_layers
        send = wire / link.bytes_per_s + link.per_layer_s
        recv = 0.0
        if self.copy_bytes_per_s:
            copied = wire if self.codec_on_device and level != "raw" else raw
            send += copied / self.copy_bytes_per_s
            recv += copied / self.copy_bytes_per_s
        enc, dec = self.codec_times(num_tokens, level)
        return send + enc, recv + dec

    def total_time(self, num_tokens: int, level: str, link: LinkModel) -> float:
        """Unoverlapped seconds for the whole request, all layers ready (one run; for pruning
        and reports)."""
        return self.schedule(num_tokens, level, link, [0.0] * self.num_layers, 0.0)[1]

    def schedule(self, num_tokens: int, level: str, link: LinkModel, ready: list[float],
                 start: float) -> tuple[float, float]:
        """One request through a FIFO channel that is free from `start`; layer l is ready at
        ready[l]. Returns (sender free at, last layer landed at)."""
        send, recv = self.layer_times(num_tokens, level, link)
        run_send, run_recv = self.run_times(level, link)
        return schedule_runs(ready, start, run_send, send, run_recv, recv)

    def resolve_level(self, level: str, num_tokens: int, link: LinkModel, budget_s: float) -> str:
        """The level a prefill worker uses: `auto` picks per request like the runtime does."""
        if level != "auto":
            return level
        return choose_level(num_tokens * self.kv_bytes_per_token * 16 // self.dtype_bits,
                            link.bytes_per_s, budget_s)


def schedule_runs(ready: list[float], start: float, run_send: float, layer_send: float, run_recv: float,
                  layer_recv: float) -> tuple[float, float]:
    """The channel's coalescing: whenever the sender is free it takes every layer that is ready
    (at least the next one, waiting for it) as one run. Returns (sender free at, last landed at)."""
    sender = recv = start
    i = 0
    while i < len(ready):
        t = max(sender, ready[i])
        j = i + 1
        while j < len(ready) and ready[j] <= t:
            j += 1
        n = j - i
        sender = t + run_send + n * layer_send
        recv = max(recv, sender) + run_recv + n * layer_recv
        i = j
    return sender, recv
