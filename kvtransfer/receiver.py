"""Decode side of the KV channels: a TCP server; one thread per connected prefill instance.

Per request: `begin` reserves blocks (the handler may wait for room, up to its timeout, and
refuses with a reason after), `layer` frames land in those blocks as they arrive, `done`
admits the request to decoding and is acked. A broken connection or an `abort` releases the
reservation, so no block outlives a failed transfer.
"""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod
from typing import Any

from kvtransfer.codec import ModelFingerprint
from kvtransfer.frames import ChannelError, recv_frame, send_frame
from kvtransfer.payload import LayerUnpacker


class TransferRefused(Exception):
    """The decode side cannot take this request (no room in time, shutting down, bad layout)."""


class ReceiveHandler(ABC):
    """What the decode worker does with incoming KV. Reservations are opaque to the channel."""

    @abstractmethod
    def reserve(self, request_id: str, spec: dict[str, Any], layout: ModelFingerprint, num_tokens: int) -> Any:
        """Blocks for `num_tokens` (+ room to decode); raises TransferRefused."""

    @abstractmethod
    def write_layer(self, reservation: Any, layer_idx: int, k: Any, v: Any) -> None:
        """Put one layer's K/V ([num_tokens, num_kv_heads, head_dim], CPU) into the reserved blocks."""

    @abstractmethod
    def admit(self, reservation: Any, first_token: int, events: dict[str, float]) -> None:
        """Every layer has landed: start decoding."""

    @abstractmethod
    def release(self, reservation: Any, reason: str) -> None:
        """The transfer failed or was aborted: free the reserved blocks."""


class _Incoming:
    def __init__(self, reservation: Any, unpacker: LayerUnpacker, num_layers: int) -> None:
        self.reservation = reservation
        self.unpacker = unpacker
        self.layers_left = set(range(num_layers))


class KVReceiver:
    def __init__(self, handler: ReceiveHandler, host: str = "0.0.0.0", advertise_host: str = "127.0.0.1") -> None:
        self.handler = handler
        self._server = socket.create_server((host, 0))
        self.address = (advertise_host, self._server.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self._server.close()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            threading.Thread(target=self._serve, args=(conn,), name="kv-recv", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        incoming: dict[str, _Incoming] = {}
        refused: set[str] = set()
        try:
            while not self._closed:
                header, body = recv_frame(conn)
                kind, rid = header.get("type"), header.get("id")
                if rid in refused:
                    if kind in ("done", "abort"):
                        refused.discard(rid)
                    continue
                if kind == "begin":
                    self._begin(conn, header, body, incoming, refused)
                elif kind == "layer":
                    self._layer(conn, header, body, incoming, refused)
                elif kind == "done":
                    inc = incoming.pop(rid, None)
                    if inc is None:
                        continue
                    if inc.layers_left:
                        self.handler.release(inc.reservation, "transfer ended with layers missing")
                        send_frame(conn, {"type": "nack", "id": rid, "reason": f"layers {sorted(inc.layers_left)[:4]} missing"})
                        continue
                    try:
                        self.handler.admit(inc.reservation, int(header["first_token"]), header.get("events") or {})
                    except TransferRefused as exc:
                        send_frame(conn, {"type": "nack", "id": rid, "reason": str(exc)})
                        continue
                    send_frame(conn, {"type": "ack", "id": rid})
                elif kind == "abort":
                    inc = incoming.pop(rid, None)
                    if inc is not None:
                        self.handler.release(inc.reservation, str(header.get("reason")))
        except (OSError, ChannelError, ValueError):
            pass  # the sender sees the broken connection and fails its requests
        finally:
            for inc in incoming.values():
                self.handler.release(inc.reservation, "KV channel closed mid-transfer")
            try:
                conn.close()
            except OSError:
                pass

    def _begin(self, conn: socket.socket, header: dict[str, Any], body: bytearray,
               incoming: dict[str, _Incoming], refused: set[str]) -> None:
        rid = header["id"]
        try:
            layout = ModelFingerprint(**header["layout"])
            num_tokens = int(header["num_tokens"])
            unpacker = LayerUnpacker(layout, header["level"], num_tokens, bytes(body))
            reservation = self.handler.reserve(rid, header["spec"], layout, num_tokens)
        except (TransferRefused, ValueError, KeyError, TypeError) as exc:
            refused.add(rid)
            send_frame(conn, {"type": "nack", "id": rid, "reason": str(exc)})
            return
        incoming[rid] = _Incoming(reservation, unpacker, layout.num_layers)

    def _layer(self, conn: socket.socket, header: dict[str, Any], body: bytearray,
               incoming: dict[str, _Incoming], refused: set[str]) -> None:
        rid = header["id"]
        inc = incoming.get(rid)
        if inc is None:
            return
        layer_idx = int(header["layer"])
        try:
            k, v = inc.unpacker.unpack(body)
            self.handler.write_layer(inc.reservation, layer_idx, k, v)
        except (ValueError, RuntimeError) as exc:  # corrupt section (CodecError) or bad shape
            incoming.pop(rid)
            refused.add(rid)
            self.handler.release(inc.reservation, f"bad KV layer {layer_idx}: {exc}")
            send_frame(conn, {"type": "nack", "id": rid, "reason": f"bad KV layer {layer_idx}: {exc}"})
            return
        inc.layers_left.discard(layer_idx)
