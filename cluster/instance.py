"""One serving instance: a thin shell around a worker (prefill, decode or colocated) and its
step loop. The Ray actor is this class wrapped by `ray.remote`; tests use it directly."""

from __future__ import annotations

import os
from typing import Any

import torch

from cluster.config import ClusterConfig, PoolSection
from decode_worker import DecodeWorker
from engine.engine import LLMEngine
from engine.request_spec import request_from_spec
from engine.serving_loop import ServingLoop
from prefill_worker import PrefillWorker

ROLES = ("prefill", "decode", "colocated", "chunked")


class Instance:
    """Rank 0 of an instance. At TP 1 it is ready once constructed; at TP > 1 the launcher
    first gathers every rank, then calls `setup(master)` on all of them together."""

    def __init__(self, role: str, config: ClusterConfig, name: str, num_threads: int | None = None,
                 advertise_host: str | None = "127.0.0.1", tp_size: int = 1) -> None:
        if role not in ROLES:
            raise ValueError(f"role={role!r}: one of {ROLES}")
        if num_threads:
            torch.set_num_threads(num_threads)
        if config.engine.switch_interval_ms:
            import sys
            sys.setswitchinterval(config.engine.switch_interval_ms / 1000)
        self.role, self.name, self.config, self.tp_size = role, name, config, tp_size
        if advertise_host is None:  # inside a Ray actor: the address other nodes reach us at
            import ray
            advertise_host = ray.util.get_node_ip_address()
        self.advertise_host = advertise_host
        if tp_size == 1:
            self._build(None)

    def free_port(self) -> tuple[str, int]:
        """An address for this instance's TP rendezvous (rank 0 hosts it)."""
        import socket
        with socket.socket() as s:
            s.bind(("", 0))
            return self.advertise_host, s.getsockname()[1]

    def setup(self, master: tuple[str, int]) -> dict[str, Any]:
        from engine.tp_channel import init_tp
        from engine.tp_runner import TPLeaderRunner
        config = self.config
        source = config.model.source
        group, channel = init_tp(0, self.tp_size, tuple(master), torch.device(config.device))
        runner = TPLeaderRunner(source.model_config(), config.engine_config(self._pool()), source.state_dict(),
                                tp=group, channel=channel)
        self._build(runner)
        return self.ready()

    def _pool(self) -> PoolSection:
        return self.config.prefill if self.name.startswith("prefill") else self.config.decode

    def _build(self, runner: Any) -> None:
        role, name, config, advertise_host = self.role, self.name, self.config, self.advertise_host
        source = config.model.source
        args = (source.model_config(), config.engine_config(self._pool()))
        kwargs: dict[str, Any] = {"weights": None if runner else source.state_dict(),
                                  "tokenizer": source.tokenizer(), "runner": runner}
        timeout = config.kv_transfer.timeout_s
        self.worker: LLMEngine
        if role == "prefill":
            self.worker = PrefillWorker(*args, name=name, codec=config.kv_transfer.codec,
                                        link_gbps=config.kv_transfer.link_gbps, transfer_timeout_s=timeout,
                                        auto_budget_s=config.slo.tpot_s, **kwargs)
        elif role == "decode":
            self.worker = DecodeWorker(*args, name=name, transfer_timeout_s=timeout,
                                       advertise_host=advertise_host, **kwargs)
        else:
            self.worker = LLMEngine(*args, policy="continuous" if role == "colocated" else "chunked", **kwargs)
        self.loop = ServingLoop(self._step, name)
        self.worker.emit = self.loop.emit
        if isinstance(self.worker, PrefillWorker):
            self.worker.call_on_loop = self.loop.call
        if isinstance(self.worker, DecodeWorker):
            self.worker.loop = self.loop
        self.loop.start()

    def _step(self) -> bool:
        before = self.worker.num_steps
        self.worker.step()
        return self.worker.num_steps != before

    # ---- control surface (each call hands work to the loop thread) ------------------------------

    def ready(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "role": self.role, "pid": os.getpid(),
                                "num_blocks": self.worker.blocks.num_blocks}
        if isinstance(self.worker, DecodeWorker):
            info["address"] = self.worker.address
        return info

    def connect(self, peers: dict[str, dict[str, Any]]) -> None:
        """peers: decode instance -> {"tp": d, "addresses": [(host, port) per rank]}."""
        worker = self.worker
        assert isinstance(worker, PrefillWorker)
        self.loop.call(lambda: worker.connect(peers)).result()

    def add(self, spec: dict[str, Any], decode_target: str | None = None) -> None:
        if isinstance(self.worker, PrefillWorker):
            worker = self.worker
            self.loop.call(lambda: worker.add(spec, decode_target or ""))
        else:
            self.loop.call(lambda: self._add_colocated(spec))

    def _add_colocated(self, spec: dict[str, Any]) -> None:
        try:
            req = request_from_spec(spec)
            req.prompt_token_ids = self.worker.tokenize(req.prompt_token_ids)
            self.worker.scheduler.add(req)
        except ValueError as exc:
            self.loop.emit({"id": spec.get("id"), "kind": "failed", "t": self.worker.clock(), "reason": str(exc)})

    def abort(self, request_id: str) -> None:
        self.loop.call(lambda: self.worker.abort(request_id))

    def retry_transfer(self, request_id: str, decode_target: str) -> None:
        worker = self.worker
        assert isinstance(worker, PrefillWorker)
        self.loop.call(lambda: worker.retry_transfer(request_id, decode_target))

    def drop(self, request_id: str) -> None:
        worker = self.worker
        assert isinstance(worker, PrefillWorker)
        self.loop.call(lambda: worker.drop(request_id))

    def wait_events(self, timeout: float = 0.05) -> dict[str, Any]:
        """Events since the last call (waits up to `timeout` s for one), plus a load snapshot
        for the router read without stopping the loop (counts only, so it may lag a step)."""
        events = self.loop.wait_events(timeout)
        for e in events:
            e["instance"] = self.name
        blocks = self.worker.blocks
        load = {"free_blocks": blocks.num_free, "num_blocks": blocks.num_blocks,
                "waiting": len(self.worker.scheduler.waiting), "running": len(self.worker.scheduler.running)}
        return {"events": events, "load": load}

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, **self.loop.call(self.worker.stats).result(timeout=30),
                "loop": self.loop.times()}

    def shutdown(self) -> None:
        self.loop.stop()
        stop_followers = getattr(self.worker.runner, "shutdown_followers", None)
        if stop_followers is not None:
            stop_followers()
        if isinstance(self.worker, DecodeWorker):
            self.worker.close()
        if isinstance(self.worker, PrefillWorker):
            self.worker.close()
