"""Prefill side of a KV channel: one persistent TCP connection to one decode instance.

Jobs (begin, layer, done, abort) queue up from the prefill loop and leave in order on a
sender thread, so encoding and sending a layer overlaps the next layers' compute. Whenever the
sender thread wakes it takes every queued job, and the consecutive layers of one request that
are waiting go out as one run (one gather, one copy, one frame): a busy prefill process gives
this thread little time, and a per-layer round of Python and CUDA calls made the channel ~8x
slower there than alone. A channel that keeps up still streams layer by layer (short runs as
layers are computed); one that falls behind sends what has piled up in one go. A reader
thread collects acks. Any failure (connect, send, ack timeout, nack) ends in exactly one
`on_result(request_id, ok=False, reason)`; success in one `on_result(request_id, True, None)`.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from kvtransfer.codec import ModelFingerprint
from kvtransfer.frames import Body, ChannelError, body_nbytes, recv_frame, send_frame
from kvtransfer.link import BandwidthEstimator, RateLimiter
from kvtransfer.payload import DeviceExit, LayerPacker

ResultCallback = Callable[[str, bool, "str | None", dict[str, Any]], None]


class KVSource(Protocol):
    """One request's KV on the prefill side, as the channel reads it."""

    def gather(self, first: int, count: int, ready: Any) -> torch.Tensor:
        """Layers first..first+count-1 as [count, 2, num_tokens, num_kv_heads, head_dim], complete
        on return; `ready` (a CUDA event or None) is recorded after the last layer's compute."""


@dataclass
class _Run:
    """Consecutive layers of one request, sent as one frame."""
    first: int
    count: int
    ready: Any
    source: KVSource


def coalesce(jobs: list) -> list:
    """The queued jobs in order, with the consecutive layers of each request merged into one
    run at the place of its first layer (a request's own jobs keep their order; runs of
    different requests are independent)."""
    out: list = []
    open_runs: dict[str, _Run] = {}
    for job in jobs:
        if job is None:
            out.append(None)
            break
        kind, rid, arg = job
        if kind != "layer":
            open_runs.pop(rid, None)
            out.append(job)
            continue
        layer, ready, source = arg
        run = open_runs.get(rid)
        if run is not None and run.source is source and run.first + run.count == layer:
            run.count, run.ready = run.count + 1, ready
            continue
        open_runs[rid] = run = _Run(layer, 1, ready, source)
        out.append(("layers", rid, run))
    return out


@dataclass
class _Outgoing:
    packer: LayerPacker
    control: bool                # carries the request itself, `done`, and gets the ack
    bytes_raw: int = 0
    bytes_wire: int = 0
    started: float = field(default_factory=time.monotonic)
    ack_deadline: float | None = None


class KVSender:
    def __init__(self, peer: str, address: tuple[str, int], on_result: ResultCallback,
                 link_gbps: float | None = None, timeout_s: float = 30.0) -> None:
        self.peer, self.address = peer, address
        self.on_result = on_result
        self.limiter = RateLimiter(link_gbps)
        self.bandwidth = BandwidthEstimator(link_gbps * 1e9 / 8 if link_gbps else 1e9)
        self.timeout_s = timeout_s
        self._jobs: queue.Queue = queue.Queue()
        self._exit = DeviceExit()
        self._inflight: dict[str, _Outgoing] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        threading.Thread(target=self._send_loop, name=f"kv-send-{peer}", daemon=True).start()

    # ---- called from the prefill loop ------------------------------------------------------

    def begin(self, request_id: str, spec: dict[str, Any] | None, layout: ModelFingerprint, level: str,
              num_tokens: int, heads: tuple[int, int], num_sources: int = 1) -> None:
        """Open a request on this channel. `spec` is given on the control channel only
        (prefill rank 0 -> decode rank 0); `layout` describes the head slice `heads` sent here."""
        self._jobs.put(("begin", request_id, (spec, layout, level, num_tokens, heads, num_sources)))

    def send_layer(self, request_id: str, layer_idx: int, source: KVSource, ready: Any = None) -> None:
        """The layer's compute is enqueued (and `ready` recorded after it, on a GPU); the sender
        thread reads it from `source` (the same object for every layer of the request)."""
        self._jobs.put(("layer", request_id, (layer_idx, ready, source)))

    def done(self, request_id: str, first_token: int, events: dict[str, float]) -> None:
        """Last frame of a request: `done` with the first token on the control channel,
        a plain `end` elsewhere."""
        self._jobs.put(("done", request_id, (first_token, events)))

    def abort(self, request_id: str, reason: str) -> None:
        self._jobs.put(("abort", request_id, reason))

    def close(self) -> None:
        self._closed = True
        self._jobs.put(None)
        self._drop_connection("channel closed")

    # ---- sender thread ---------------------------------------------------------------------

    def _take_jobs(self) -> list:
        """Wait for a job, then take all that are queued."""
        jobs = [self._jobs.get()]
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _send_loop(self) -> None:
        while True:
            for job in coalesce(self._take_jobs()):
                if job is None:
                    return
                self._run_job(*job)

    def _run_job(self, kind: str, rid: str, arg: Any) -> None:
        with self._lock:
            out = self._inflight.get(rid)
        if kind != "begin" and out is None:
            return  # the request already failed (or was aborted); drop its remaining jobs
        try:
            self._handle(kind, rid, arg, out)
        except (OSError, ChannelError, ValueError) as exc:
            reason = f"KV transfer to {self.peer} failed: {exc}"
            if isinstance(exc, (OSError, ChannelError)):
                self._drop_connection(reason)
            else:   # e.g. a level the codec does not know: fails at `begin`, before it is in flight
                self._fail(rid, reason, in_flight=kind != "begin")

    def _handle(self, kind: str, rid: str, arg: Any, out: _Outgoing | None) -> None:
        if kind == "begin":
            spec, layout, level, num_tokens, heads, num_sources = arg
            out = _Outgoing(LayerPacker(layout, level, num_tokens, self._exit), control=spec is not None)
            with self._lock:
                self._inflight[rid] = out
            self._send({"type": "begin", "id": rid, "spec": spec, "layout": layout.to_dict(), "level": level,
                        "num_tokens": num_tokens, "heads": list(heads), "num_sources": num_sources},
                       out.packer.stream_header())
        elif kind == "layers":
            run: _Run = arg
            kv = run.source.gather(run.first, run.count, run.ready)
            body, sizes = out.packer.pack_layers(run.first, kv)
            out.bytes_raw += kv.numel() * kv.element_size()
            size = body_nbytes(body)
            out.bytes_wire += size
            self.limiter.acquire(size)
            self._send({"type": "layers", "id": rid, "first": run.first, "count": run.count, "sizes": sizes}, body)
        elif kind == "done" and not out.control:
            with self._lock:
                self._inflight.pop(rid, None)
            self._send({"type": "end", "id": rid})
        elif kind == "done":
            first_token, events = arg
            out.ack_deadline = time.monotonic() + self.timeout_s
            self._send({"type": "done", "id": rid, "first_token": first_token, "events": events})
        elif kind == "abort":
            self._send({"type": "abort", "id": rid, "reason": arg})
            with self._lock:
                self._inflight.pop(rid, None)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self.address, timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            self._sock = sock
            threading.Thread(target=self._ack_loop, args=(sock,), name=f"kv-ack-{self.peer}", daemon=True).start()
        return self._sock

    def _send(self, header: dict[str, Any], body: Body = b"") -> None:
        send_frame(self._connect(), header, body)

    # ---- ack thread ------------------------------------------------------------------------

    def _ack_loop(self, sock: socket.socket) -> None:
        try:
            while self._sock is sock:
                ready, _, _ = select.select([sock], [], [], 0.2)
                if not ready:
                    self._expire_overdue()
                    continue
                header, _ = recv_frame(sock)
                rid = header.get("id")
                with self._lock:
                    out = self._inflight.pop(rid, None)
                if out is None:
                    continue
                if header.get("type") == "ack":
                    elapsed = time.monotonic() - out.started
                    self.bandwidth.observe(out.bytes_wire, elapsed)
                    self.on_result(rid, True, None, {"kv_bytes_raw": out.bytes_raw, "kv_bytes_wire": out.bytes_wire})
                else:
                    self.on_result(rid, False, f"{self.peer} refused the KV: {header.get('reason')}", {})
        except (OSError, ValueError, ChannelError) as exc:
            if self._sock is sock:
                self._drop_connection(f"KV channel to {self.peer} broke: {exc}")

    def _expire_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [rid for rid, o in self._inflight.items() if o.ack_deadline and now > o.ack_deadline]
        for rid in overdue:
            self._fail(rid, f"no ack from {self.peer} within {self.timeout_s:.0f} s")

    def _fail(self, rid: str, reason: str, in_flight: bool = True) -> None:
        with self._lock:
            out = self._inflight.pop(rid, None)
        if out is not None or not in_flight:
            self.on_result(rid, False, reason, {})

    def _drop_connection(self, reason: str) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        with self._lock:
            failed = list(self._inflight)
            self._inflight.clear()
        for rid in failed:
            self.on_result(rid, False, reason, {})
