"""How fast one KV channel really moves a request: a `KVSender` streaming every layer of one
request to a `KVReceiver` over loopback, into host staging (pinned when the KV is bound for a
GPU), with the channel's own framing, packing and threads.

Bare socket throughput overstates the channel: packing, landing and the sender thread's
round per run of layers cost as much as the wire at GPU rates. The planner's transfer model takes
its link rate from here.

    rate = measure_channel(num_layers=32, num_kv_heads=8, head_dim=128, num_tokens=2048,
                           dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import torch

from kvtransfer.payload import layout_of
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.staging import StagedRequest, StagingArea


class _WholeRequest:
    """A request's KV already in one tensor [num_layers, 2, tokens, heads, head_dim]."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv

    def gather(self, first: int, count: int, ready: object) -> torch.Tensor:
        return self.kv[first:first + count]


@dataclass(frozen=True)
class ChannelRate:
    bytes_per_s: float         # raw KV bytes per second, first layer queued -> last layer staged
    per_request_s: float       # median seconds for the probed request
    num_tokens: int
    level: str
    in_flight: int = 1         # requests queued back to back (1: each waits for the last to land)


def measure_channel(num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu", level: str = "raw", repeats: int = 3,
                    timeout_s: float = 60.0, in_flight: int = 1) -> ChannelRate:
    """`in_flight` = 1 times one request alone (its latency); more queue that many back to
    back, as a busy prefill instance does, and time the channel's occupancy per request."""
    device = torch.device(device)
    layout = layout_of(num_layers, num_kv_heads, head_dim, dtype)
    source = _WholeRequest(torch.randn(num_layers, 2, num_tokens, num_kv_heads, head_dim, device=device).to(dtype))
    landed: dict[str, threading.Event] = {}
    failures: list[str] = []

    def on_complete(staged: StagedRequest) -> None:
        staging.pop(staged.request_id)
        landed[staged.request_id].set()

    def on_result(rid: str, ok: bool, reason: str | None, info: object) -> None:
        if not ok:
            failures.append(reason or "failed")
            landed[rid].set()

    staging = StagingArea(control=False, on_complete=on_complete)
    receiver = KVReceiver(staging, (0, num_kv_heads), head_dim, layout.dtype, device=device)
    sender = KVSender("probe", receiver.address, on_result, timeout_s=timeout_s)
    times = []
    try:
        for i in range(repeats + 1):   # the first round connects and warms up
            rids = [f"probe-{i}-{j}" for j in range(in_flight)]
            t0 = time.perf_counter()
            for rid in rids:
                landed[rid] = threading.Event()
                sender.begin(rid, None, layout, level, num_tokens, (0, num_kv_heads))
                for layer in range(num_layers):
                    sender.send_layer(rid, layer, source)
                sender.done(rid, 0, {})
            for rid in rids:
                if not landed[rid].wait(timeout_s) or failures:
                    raise RuntimeError(f"channel probe: request {rid} did not land within {timeout_s:.0f} s "
                                       f"({failures[0] if failures else 'timeout'})")
            if i:
                times.append((time.perf_counter() - t0) / in_flight)
    finally:
        sender.close()
        receiver.close()
    per_request = statistics.median(times)
    raw_bytes = source.kv.numel() * source.kv.element_size()
    return ChannelRate(raw_bytes / per_request, per_request, num_tokens, level, in_flight)
