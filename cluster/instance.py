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
    def __init__(self, role: str, config: ClusterConfig, name: str, num_threads: int | None = None,
                 advertise_host: str | None = "127.0.0.1") -> None:
        if role not in ROLES:
            raise ValueError(f"role={role!r}: one of {ROLES}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.role, self.name = role, name
        if advertise_host is None:  # inside a Ray actor: the address other nodes reach us at
            import ray
            advertise_host = ray.util.get_node_ip_address()
        pool: PoolSection = config.prefill if role == "prefill" else config.decode
        if role in ("colocated", "chunked"):
            pool = config.prefill if name.startswith("prefill") else config.decode
        source = config.model.source
        args = (source.model_config(), config.engine_config(pool))
        kwargs: dict[str, Any] = {"weights": source.state_dict(), "tokenizer": source.tokenizer()}
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
        return {"name": self.name, "role": self.role, **self.loop.call(self.worker.stats).result(timeout=30)}

    def shutdown(self) -> None:
        self.loop.stop()
        if isinstance(self.worker, DecodeWorker):
            self.worker.close()
        if isinstance(self.worker, PrefillWorker):
            self.worker.close()
