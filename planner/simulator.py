"""A discrete-event simulator of a cluster config, built from the runtime's own pieces.

What is imported unchanged: the front end (cluster.frontend.Frontend, with its Router and
backpressure), the schedulers and BlockManager (engine.scheduler), request specs and stop
rules; records come out of `Frontend.records()` and go into engine.metrics.summarize, so the
simulator and `splitserve run` report the same numbers by construction. What is modeled: the
time of each engine step (planner.latency.StepModel, plus the serving loop's measured
overhead), stretched while instances share a node's cores (planner.colocation), and of each
KV transfer (planner.transfer), on a virtual clock.

    arrival -> Frontend.submit -> Router -> SimInstance("prefill").add
    prefill step (scheduler.schedule -> step_time) -> last chunk: channel.begin (layers stream
      into host staging as the step computes them) -> first token -> channel done
      -> landed: decode allocates blocks (FIFO, waits for room) -> admit_running -> decode steps
      -> tokens -> finished
    colocated/chunked: one SimInstance runs both phases with the runtime's policy.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.config import ClusterConfig
from cluster.frontend import Frontend
from cluster.router import Router
from engine.block_manager import BlockManager
from engine.config import ModelConfig
from engine.engine import scheduler_config_for
from engine.metrics import RequestRecord
from engine.request import LifecycleEvent, Request, RequestStatus, SamplingParams
from engine.request_spec import request_from_spec
from engine.scheduler import SCHEDULERS, ScheduledBatch
from engine.stopping import stop_reason
from planner.colocation import CoreSharing, SharedCores
from planner.latency import StepModel
from planner.sim_channel import SimChannel, Transfer
from planner.transfer import LinkModel, TransferModel


@dataclass
class SimSetup:
    """Everything timing-related the simulator needs besides the cluster config."""

    model: ModelConfig
    steps: dict[str, StepModel]                  # by pool: "prefill", "decode"
    blocks: dict[str, int]                       # KV blocks per instance, by pool
    transfer: TransferModel | None = None
    link: Callable[[int, int], LinkModel] | None = None   # (prefill index, decode index) -> link
    # the serving runtime's own seconds per step, by pool ("decode"), per sequence ("decode_per_seq")
    # and per request admitted since the last step ("decode_admission")
    overhead_s: dict[str, float] = field(default_factory=dict)
    sharing: CoreSharing | None = None           # CPU: steps slow down while instances share a node's cores
    node_of: dict[str, int] = field(default_factory=dict)        # instance -> node, for `sharing`


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn))

    def run(self, after_each: Callable[[], None]) -> None:
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            fn()
            after_each()


class SimInstance:
    """One instance: a scheduler over a BlockManager, stepping on the virtual clock."""

    def __init__(self, sim: "Simulator", name: str, role: str, num_blocks: int) -> None:
        self.sim, self.name, self.role = sim, name, role
        pool = sim.config.prefill if name.startswith("prefill") else sim.config.decode
        policy = {"prefill": "prefill", "decode": "decode", "colocated": "continuous", "chunked": "chunked"}[role]
        self.blocks = BlockManager(num_blocks, sim.config.engine.block_size)
        self.scheduler = SCHEDULERS[policy](scheduler_config_for(sim.setup.model, sim.config.engine_config(pool)),
                                            self.blocks)
        self.pool = "prefill" if name.startswith("prefill") else "decode"
        self.step_model = sim.setup.steps[self.pool]
        self.busy = False
        self.kick_pending = False
        # decode: landed transfers waiting for blocks, FIFO (the runtime's staged admission queue)
        self.waiting_admissions: deque[tuple[SimChannel, Transfer]] = deque()
        self.targets: dict[str, int] = {}                    # prefill: request -> decode index
        self.num_admitted = 0                                # decode: KV landed since the last step
        self.index = int(name.rsplit("-", 1)[1])

    # ---- the control surface the front end calls (cluster.instance.Instance's) ------------------

    def add(self, spec: dict[str, Any], decode_target: str | None = None) -> None:
        req = request_from_spec(spec)
        try:
            self.scheduler.add(req)
        except ValueError as exc:
            self.sim.emit({"id": req.request_id, "kind": "failed", "t": self.sim.clock.now, "reason": str(exc)})
            return
        if decode_target:
            self.targets[req.request_id] = int(decode_target.rsplit("-", 1)[1])
        self.kick()

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    # ---- the step loop ---------------------------------------------------------------------------

    def kick(self) -> None:
        if not self.busy and not self.kick_pending:
            self.kick_pending = True
            self.sim.clock.at(self.sim.clock.now, self._start_step)

    def _start_step(self) -> None:
        self.kick_pending = False
        if self.busy:
            return
        now = self.sim.clock.now
        batch = self.scheduler.schedule(now)
        if batch.is_empty:
            return
        self.busy = True
        over = self.sim.setup.overhead_s
        work = (self.step_model.step_time(batch) + over.get(self.pool, 0.0)
                + over.get(f"{self.pool}_per_seq", 0.0) * len(batch.seqs)
                + over.get(f"{self.pool}_admission", 0.0) * self.num_admitted)
        self.num_admitted = 0
        kind = "prefill" if batch.prefills else "decode"
        dt = self.sim.cores.run(self.name, kind, work, lambda: self._end_step(batch))
        if self.role == "prefill":
            for s in batch.prefills:
                if s.samples:
                    self.sim.begin_transfer(self, s.request, now, dt)

    def _end_step(self, batch: ScheduledBatch) -> None:
        now = self.sim.clock.now
        self.busy = False
        self.scheduler.on_step_done(batch)
        for s in batch.seqs:
            if s.samples and s.request.status == RequestStatus.RUNNING:
                self._accept_token(s.request, now)
        self.sim.dirty.add(self.name)
        self.admit_waiting()
        self.kick()

    def _accept_token(self, req: Request, now: float) -> None:
        req.append_token(0, now)
        self.sim.emit({"id": req.request_id, "kind": "token", "t": now, "token": 0})
        reason = stop_reason(req, (), self.scheduler.config.max_model_len)
        if reason is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED, reason)
            req.record(LifecycleEvent.FINISHED, now)
            self.sim.emit({"id": req.request_id, "kind": "finished", "t": now, "reason": reason})
            if self.role == "prefill":
                self.sim.cancel_transfer(req)
            return
        if self.role == "prefill":   # leaves the scheduler, keeps its blocks until the ack
            self.scheduler.running.remove(req)
            self.sim.first_token(req, now)

    # ---- decode side of a channel ----------------------------------------------------------------

    def admit_waiting(self) -> None:
        """Admit landed transfers FIFO while blocks allow (DecodeWorker._admit_ready)."""
        while self.waiting_admissions:
            ch, tr = self.waiting_admissions[0]
            if not tr.cancelled:
                blocks = self.try_reserve(tr.req.num_prompt_tokens)
                if blocks is None:
                    return
                self.sim.dirty.add(self.name)
                ch.admitted(tr, blocks)
            self.waiting_admissions.popleft()

    def try_reserve(self, num_tokens: int) -> list[int] | None:
        """As DecodeWorker._admit_ready: keep a block per running request free."""
        need = self.blocks.blocks_for(num_tokens + 1)
        if self.blocks.num_free - need < len(self.scheduler.running):
            return None
        return self.blocks.allocate(need)

    def admit(self, req: Request, blocks: list[int], now: float) -> None:
        req.num_computed_tokens = req.num_prompt_tokens
        req.block_table = blocks
        req.record(LifecycleEvent.KV_RECEIVED, now)
        self.num_admitted += 1
        self.scheduler.admit_running(req)
        self.sim.emit({"id": req.request_id, "kind": "kv_received", "t": now, "instance": self.name})
        self.sim.dirty.add(self.name)
        self.kick()


class SimPool:
    """cluster.frontend.InstancePool over simulated instances."""

    def __init__(self, sim: "Simulator") -> None:
        self.sim = sim

    def names(self, role: str) -> list[str]:
        return [n for n, i in self.sim.instances.items() if i.role == role]

    def call(self, name: str, method: str, *args: Any) -> None:
        getattr(self.sim.instances[name], method)(*args)

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, str]]:
        events, self.sim.events = self.sim.events, []
        loads = {n: {"free_blocks": self.sim.instances[n].blocks.num_free,
                     "num_blocks": self.sim.instances[n].blocks.num_blocks} for n in self.sim.dirty}
        self.sim.dirty = set()
        return events, loads, {}


def instance_plan(config: ClusterConfig) -> list[tuple[str, str, int]]:
    """(name, role, tp) per instance: cluster.launcher.plan_instances' naming, without
    importing the launcher (which loads the workers and torch)."""
    role_p, role_d = ("prefill", "decode") if config.mode == "disagg" else (config.mode, config.mode)
    return ([(f"prefill-{i}", role_p, config.prefill.tp) for i in range(config.prefill.instances)]
            + [(f"decode-{i}", role_d, config.decode.tp) for i in range(config.decode.instances)])


class Simulator:
    def __init__(self, config: ClusterConfig, setup: SimSetup) -> None:
        self.config, self.setup = config, setup
        self.clock = _Clock()
        self.cores = SharedCores(self.clock, setup.sharing or CoreSharing({}), setup.node_of if setup.sharing else {})
        self.events: list[dict[str, Any]] = []
        self.dirty: set[str] = set()
        self.instances: dict[str, SimInstance] = {}
        for name, role, _tp in instance_plan(config):
            pool = "prefill" if name.startswith("prefill") else "decode"
            self.instances[name] = SimInstance(self, name, role, setup.blocks[pool])
        self.channels: dict[tuple[str, str], SimChannel] = {}
        self.transfers: dict[str, Transfer] = {}
        self.handoff_blocks: dict[str, list[int]] = {}
        disagg = config.mode == "disagg"
        pool = SimPool(self)
        prefill_role = "prefill" if disagg else config.mode
        router = Router(pool.names(prefill_role), pool.names("decode") if disagg else [], config.engine.block_size,
                        max_queued_tokens=8 * config.prefill.max_batch_tokens,
                        num_blocks={n: i.blocks.num_blocks for n, i in self.instances.items()})
        self.frontend = Frontend(pool, router, disagg, config.kv_transfer.max_retries, clock=lambda: self.clock.now)

    def _poll(self) -> None:
        if self.events or self.dirty or self.frontend.pending:
            self.frontend.poll(0.0)

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    # ---- KV transfer ----------------------------------------------------------------------------

    def _channel(self, src: SimInstance, decode_index: int) -> SimChannel:
        dst = self.instances[f"decode-{decode_index}"]
        key = (src.name, dst.name)
        if key not in self.channels:
            link = self.setup.link(src.index, decode_index) if self.setup.link else LinkModel("ideal", float("inf"))
            self.channels[key] = SimChannel(self, src, dst, link)
        return self.channels[key]

    def begin_transfer(self, src: SimInstance, req: Request, start: float, step_s: float) -> None:
        layers = self.setup.model.num_layers
        ready = [start + step_s * (i + 1) / layers for i in range(layers)]
        channel = self._channel(src, src.targets[req.request_id])
        level = self.config.kv_transfer.codec
        if self.setup.transfer is not None:
            level = self.setup.transfer.resolve_level(level, req.num_prompt_tokens, channel.link, self.config.slo.tpot_s)
        tr = Transfer(req, level, ready, channel=channel)
        self.transfers[req.request_id] = tr
        channel.begin(tr)

    def first_token(self, req: Request, now: float) -> None:
        tr = self.transfers[req.request_id]
        tr.first_token_at = now
        self.handoff_blocks[req.request_id], req.block_table = req.block_table, []
        tr.channel.maybe_admit(tr)  # type: ignore[union-attr]

    def cancel_transfer(self, req: Request) -> None:
        tr = self.transfers.pop(req.request_id, None)
        if tr is not None:
            tr.cancelled = True
            if tr.blocks:
                tr.channel.dst.blocks.free(tr.blocks)  # type: ignore[union-attr]
                tr.blocks = []

    def transfer_done(self, src: SimInstance, tr: Transfer, now: float) -> None:
        rid = tr.req.request_id
        self.transfers.pop(rid, None)
        src.blocks.free(self.handoff_blocks.pop(rid))
        src.targets.pop(rid, None)
        self.emit({"id": rid, "kind": "kv_sent", "t": now})
        self.dirty.add(src.name)
        src.kick()

    # ---- a run ----------------------------------------------------------------------------------

    def run(self, prompt_lens: list[int], output_lens: list[int], arrivals: list[float]) -> list[RequestRecord]:
        """Drive one trace (like cluster.run_command.drive) and return the front end's records."""
        for i, (n_in, n_out, t) in enumerate(zip(prompt_lens, output_lens, arrivals)):
            params = SamplingParams(max_tokens=max(1, n_out), ignore_eos=True)
            self.clock.at(t, lambda i=i, n_in=n_in, params=params, t=t: self.frontend.submit(
                f"req-{i}", [0] * n_in, params, arrival_s=t))
        self.clock.run(self._poll)
        return self.frontend.records()


def simulate(config: ClusterConfig, setup: SimSetup, prompt_lens: list[int], output_lens: list[int],
             arrivals: list[float]) -> list[RequestRecord]:
    return Simulator(config, setup).run(prompt_lens, output_lens, arrivals)
