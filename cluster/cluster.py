"""A running cluster: instances (Ray actors, or in-process for tests), the router and the
front end, assembled from one config."""

from __future__ import annotations

import itertools
import time
from typing import Any

from cluster.config import ClusterConfig
from cluster.frontend import Frontend, Tracked
from cluster.instance import Instance
from cluster.launcher import InstancePlan, launch, plan_instances
from cluster.pools import InProcessPool, RayInstancePool
from cluster.router import Router
from engine.errors import ConfigError
from engine.request import SamplingParams


class Cluster:
    def __init__(self, config: ClusterConfig, pool: Any, info: dict[str, dict[str, Any]]) -> None:
        self.config = config
        self.pool = pool
        disagg = config.mode == "disagg"
        prefill_role = "prefill" if disagg else config.mode
        num_blocks = {n: i["num_blocks"] for n, i in info.items()}
        router = Router(pool.names(prefill_role), pool.names("decode") if disagg else [],
                        config.engine.block_size,
                        max_queued_tokens=8 * config.prefill.max_batch_tokens, num_blocks=num_blocks)
        self.frontend = Frontend(pool, router, disagg, config.kv_transfer.max_retries)
        self._ids = itertools.count()

    @classmethod
    def start(cls, config: ClusterConfig, plans: list[InstancePlan] | None = None) -> "Cluster":
        pool, info = launch(config, plans=plans)
        return cls(config, pool, info)

    @classmethod
    def open(cls, config: ClusterConfig, in_process: bool = False) -> "Cluster":
        return cls.in_process(config) if in_process else cls.start(config)

    @classmethod
    def in_process(cls, config: ClusterConfig) -> "Cluster":
        """Every instance in this process (no Ray): for tests and debugging. TP 1 only."""
        if config.prefill.tp > 1 or config.decode.tp > 1:
            raise ConfigError("prefill.tp / decode.tp: tensor parallelism needs one process per rank; "
                              "run without --in-process")
        instances = {p.name: Instance(p.role, config, p.name) for p in plan_instances(config)}
        peers = {n: {"tp": 1, "addresses": [i.ready()["address"]]} for n, i in instances.items() if i.role == "decode"}
        for inst in instances.values():
            if inst.role == "prefill":
                inst.connect(peers)
        return cls(config, InProcessPool(instances), {n: i.ready() for n, i in instances.items()})

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
               arrival_s: float | None = None, on_event: Any = None,
               route: tuple[str, str | None] | None = None) -> str:
        rid = request_id or f"req-{next(self._ids)}"
        self.frontend.submit(rid, prompt_token_ids, params, arrival_s, on_event, route)
        return rid

    def wait(self, request_ids: list[str] | None = None, timeout_s: float = 600.0) -> None:
        """Poll until the given requests (default: all) are done, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ids = request_ids if request_ids is not None else list(self.frontend.requests)
            if all(self.frontend.requests[r].done for r in ids):
                return
            self.frontend.poll(0.05)
        raise TimeoutError(f"{sum(not self.frontend.requests[r].done for r in ids)} requests still running "
                           f"after {timeout_s:.0f} s")

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, timeout_s: float = 600.0) -> Tracked:
        rid = self.submit(prompt_token_ids, params)
        self.wait([rid], timeout_s)
        return self.frontend.requests[rid]

    def instance_stats(self) -> dict[str, dict[str, Any]]:
        if isinstance(self.pool, InProcessPool):
            return {n: i.stats() for n, i in self.pool.instances.items() if n not in self.pool.dead}
        import ray
        live = {n: a for n, a in self.pool.actors.items() if n not in self.pool.dead}
        return dict(zip(live, ray.get([a.stats.remote() for a in live.values()], timeout=60)))

    def shutdown(self) -> None:
        if isinstance(self.pool, InProcessPool):
            for n, inst in self.pool.instances.items():
                if n not in self.pool.dead:
                    inst.shutdown()
            return
        import ray
        live = [a for n, a in self.pool.actors.items() if n not in self.pool.dead]
        try:
            ray.get([a.shutdown.remote() for a in live], timeout=30)
        except Exception:
            pass
        for a in live:
            ray.kill(a)
        for fs in self.pool.followers.values():
            for f in fs:
                ray.kill(f)
        from ray.util.placement_group import remove_placement_group
        for pg in self.pool.placement_groups:   # give the resources back for the next cluster
            remove_placement_group(pg)
