"""The simulator's KV channels: one per (prefill, decode) pair, a FIFO of transfers timed by
planner.transfer on the virtual clock, landing into the decode instance's admission queue.
A CPU codec's work runs on the nodes' shared cores (planner.colocation) beside the steps."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.request import Request
from planner.transfer import LinkModel

if TYPE_CHECKING:
    from planner.simulator import SimInstance, Simulator


@dataclass
class Transfer:
    req: Request
    level: str
    ready: list[float]          # per layer, when the prefill step has written it
    first_token_at: float | None = None
    landed_at: float | None = None
    channel: "SimChannel | None" = None
    blocks: list[int] = field(default_factory=list)
    cancelled: bool = False


class SimChannel:
    """One (prefill, decode) KV channel: a FIFO of transfers, one at a time on the link."""

    def __init__(self, sim: "Simulator", src: SimInstance, dst: SimInstance, link: LinkModel) -> None:
        self.sim, self.src, self.dst, self.link = sim, src, dst, link
        self.queue: deque[Transfer] = deque()
        self.busy = False

    def begin(self, tr: Transfer) -> None:
        self.queue.append(tr)
        self.pump()

    def pump(self) -> None:
        while self.queue and self.queue[0].cancelled:
            self.queue.popleft()
        if self.busy or not self.queue:
            return
        tr = self.queue[0]
        now = self.sim.clock.now
        self.busy = True   # KV lands in host staging: the link never waits for decode blocks
        transfer = self.sim.setup.transfer
        if transfer is None:
            sender_free = landed = max([now, *tr.ready])
        else:
            sender_free, landed = transfer.schedule(tr.req.num_prompt_tokens, tr.level, self.link, tr.ready, now)
        landed += self.link.latency_s
        enc, dec = transfer.codec_times(tr.req.num_prompt_tokens, tr.level) if transfer else (0.0, 0.0)
        if (enc or dec) and self.sim.cores.shares(self.src.name):
            send_s, _ = transfer.layer_times(tr.req.num_prompt_tokens, tr.level, self.link)
            self._code_on_cores(tr, sender_free, landed, enc, dec, send_s - enc,
                                transfer.encode_per_run_s.get(tr.level, 0.0),
                                transfer.decode_per_run_s.get(tr.level, 0.0))
            return
        self.sim.clock.at(sender_free, self._next)
        self.sim.clock.at(landed, lambda: self._landed(tr))

    def _code_on_cores(self, tr: Transfer, sender_free: float, landed: float, enc: float, dec: float,
                       wire: float, run_enc: float, run_dec: float) -> None:
        """A CPU codec shares the nodes' cores with the instances: the encode (from the first
        layer) and the decode (from its arrival) run as jobs there, with one run's fixed costs;
        the link and the channel's schedule still bound the times from below."""
        cores, clock, n = self.sim.cores, self.sim.clock, len(tr.ready)
        rid = tr.req.request_id
        state: dict[str, float] = {}

        def finish() -> None:
            if "sent" in state and "decoded" in state:
                clock.at(max(clock.now, landed, state["sent"] + dec), lambda: self._landed(tr))

        def encoded() -> None:
            state["sent"] = max(clock.now, sender_free - wire) + wire
            clock.at(state["sent"], self._next)
            finish()

        def decoded() -> None:
            state["decoded"] = clock.now
            finish()
        start = max(clock.now, tr.ready[0])
        clock.at(start, lambda: cores.run(f"{rid}/encode", "codec", run_enc + n * enc, encoded, on=self.src.name))
        clock.at(start + enc + wire, lambda: cores.run(f"{rid}/decode", "codec", run_dec + n * dec, decoded,
                                                             on=self.dst.name))

    def _next(self) -> None:
        self.queue.popleft()
        self.busy = False
        self.pump()

    def _landed(self, tr: Transfer) -> None:
        tr.landed_at = self.sim.clock.now
        self.maybe_admit(tr)

    def maybe_admit(self, tr: Transfer) -> None:
        """Once landed and its first token is known, the transfer queues for decode blocks."""
        if tr.cancelled or tr.landed_at is None or tr.first_token_at is None:
            return
        self.dst.waiting_admissions.append((self, tr))
        self.dst.admit_waiting()

    def admitted(self, tr: Transfer, blocks: list[int]) -> None:
        tr.blocks = blocks
        now = self.sim.clock.now
        self.dst.admit(tr.req, blocks, now)
        self.sim.transfer_done(self.src, tr, now)
