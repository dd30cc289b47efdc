"""Decode side of the KV channels: a TCP server on every decode rank, one thread per
connected prefill rank, landing frames in a `StagingArea`.

Per request and source: `begin` (layout of the head slice, codec header; on the control
rank also the request itself), `layers` frames (a run of consecutive layers each), then on
the control channel `done` (first token). The decode worker admits complete requests and answers through `StagedRequest.reply`
(ack/nack on the control connection). `abort` or a broken control connection drops the
request's staging, so nothing outlives a failed transfer.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import torch

from kvtransfer.codec import ModelFingerprint
from kvtransfer.frames import ChannelError, recv_frame, send_frame
from kvtransfer.payload import DeviceEntry, LayerUnpacker
from kvtransfer.staging import StagedFrame, StagedRequest, StagingArea


class KVReceiver:
    def __init__(self, staging: StagingArea, heads: tuple[int, int], head_dim: int, dtype: str,
                 host: str = "0.0.0.0", advertise_host: str = "127.0.0.1",
                 device: torch.device | str | None = None) -> None:
        self.staging = staging
        self.device = device      # coded layers are decoded here (see LayerUnpacker)
        self.heads, self.head_dim, self.dtype = heads, head_dim, dtype
        self._server = socket.create_server((host, 0))
        self.address = (advertise_host, self._server.getsockname()[1])
        self._closed = False
        self._conns: list[tuple[socket.socket, threading.Thread]] = []
        threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True).start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, end every connection and wait for its thread (so none is left
        mid-frame when the process exits)."""
        self._closed = True
        try:
            self._server.close()
        except OSError:
            pass
        for conn, thread in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(timeout_s)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-recv", daemon=True)
            self._conns.append((conn, thread))
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        write_lock = threading.Lock()
        unpackers: dict[str, tuple[LayerUnpacker, tuple[int, int]]] = {}
        controlled: set[str] = set()   # requests whose control channel is this connection

        def reply_fn(rid: str):
            def reply(ok: bool, reason: str | None) -> None:
                controlled.discard(rid)
                try:
                    with write_lock:
                        send_frame(conn, {"type": "ack" if ok else "nack", "id": rid, "reason": reason})
                except OSError:
                    pass
            return reply

        # KV bound for a GPU goes there as soon as it lands (see DeviceEntry)
        on_gpu = self.device is not None and torch.device(self.device).type == "cuda"
        to_gpu = DeviceEntry(self.device) if on_gpu else None

        def land(header: dict[str, Any], nbytes: int) -> Any:
            entry = unpackers.get(header.get("id")) if header.get("type") == "layers" else None
            return to_gpu.landing(nbytes) if to_gpu is not None and entry is not None and entry[0].raw else None

        def refuse(rid: str, reason: str) -> None:
            unpackers.pop(rid, None)
            staged = self.staging.pop(rid)
            if rid in controlled or (staged and staged.reply):
                reply_fn(rid)(False, reason)

        try:
            while not self._closed:
                header, body = recv_frame(conn, land)
                kind, rid = header.get("type"), header.get("id")
                if kind == "begin":
                    try:
                        lo, hi = header["heads"]
                        if not (self.heads[0] <= lo < hi <= self.heads[1]):
                            raise ValueError(f"heads [{lo}, {hi}) are not held here ({self.heads})")
                        layout = ModelFingerprint(**header["layout"])
                        if (layout.num_kv_heads, layout.head_dim, layout.dtype) != (hi - lo, self.head_dim, self.dtype):
                            raise ValueError(f"KV layout {layout.to_dict()} does not match this rank "
                                             f"(heads {lo}-{hi}, head_dim {self.head_dim}, {self.dtype})")
                        num_tokens = int(header["num_tokens"])
                        unpacker = LayerUnpacker(layout, header["level"], num_tokens, bytes(body), self.device)
                        unpackers[rid] = (unpacker, (lo, hi))
                    except (ValueError, KeyError, TypeError) as exc:
                        refuse(rid, f"bad KV stream: {exc}")
                        continue
                    expected = layout.num_layers * int(header["num_sources"])
                    control = header.get("spec") is not None
                    if control:
                        controlled.add(rid)

                    def on_begin(s: StagedRequest, h=header, n=num_tokens, e=expected, c=control, r=rid) -> None:
                        s.num_tokens, s.expected_layers = n, e
                        if c:
                            s.spec, s.reply = h["spec"], reply_fn(r)
                    self.staging.update(rid, on_begin)
                elif kind == "layers":
                    entry = unpackers.get(rid)
                    if entry is None:
                        continue
                    unpacker, (lo, hi) = entry
                    try:
                        first, count = int(header["first"]), int(header["count"])
                        kv = unpacker.unpack_layers(body, first, count, header.get("sizes"))
                        if to_gpu is not None and not kv.is_cuda:
                            kv = to_gpu.to_device(kv)
                    except (ValueError, RuntimeError, KeyError, TypeError) as exc:   # corrupt body (CodecError)
                        refuse(rid, f"bad KV layers from {header.get('first')}: {exc}")
                        continue
                    frame = StagedFrame(first, lo - self.heads[0], hi - self.heads[0], kv)
                    self.staging.update(rid, lambda s, f=frame: s.add(f))
                elif kind == "done":
                    unpackers.pop(rid, None)
                    done = (int(header["first_token"]), header.get("events") or {})
                    self.staging.update(rid, lambda s, d=done: setattr(s, "done", d))
                elif kind == "end":
                    unpackers.pop(rid, None)
                elif kind == "abort":
                    unpackers.pop(rid, None)
                    controlled.discard(rid)
                    self.staging.pop(rid)
        except (OSError, ChannelError, ValueError, RuntimeError):   # RuntimeError: a CUDA call failed here
            pass  # the sender sees the broken connection and fails its requests
        finally:
            for rid in list(controlled):
                self.staging.pop(rid)
            try:
                conn.close()
            except OSError:
                pass
            self._conns = [(c, t) for c, t in self._conns if c is not conn]
