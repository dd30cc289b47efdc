"""Start the instances a cluster config asks for, as Ray actors in placement groups.

Only this module creates actors and placement groups. Each instance gets one bundle per
tensor-parallel rank in a STRICT_PACK group; with `placement: pack` the i-th prefill and
i-th decode instance share one group (so their KV link stays on one node), with `spread`
every instance has its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cluster.config import ClusterConfig
from cluster.instance import Instance
from cluster.pools import RayInstancePool
from cluster.tp_follower import TPFollower
from engine.tensor_parallel import validate_tp
from engine.errors import ConfigError


@dataclass(frozen=True)
class InstancePlan:
    name: str
    role: str
    tp: int


def plan_instances(config: ClusterConfig) -> list[InstancePlan]:
    """The instances of a config, by mode. Colocated modes keep both pools' instances, each
    serving both phases, so a comparison uses the same GPUs."""
    role_p, role_d = ("prefill", "decode") if config.mode == "disagg" else (config.mode, config.mode)
    return ([InstancePlan(f"prefill-{i}", role_p, config.prefill.tp) for i in range(config.prefill.instances)]
            + [InstancePlan(f"decode-{i}", role_d, config.decode.tp) for i in range(config.decode.instances)])


def start_ray(config: ClusterConfig, num_ranks: int) -> None:
    import ray
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=True)
        return
    # A local Ray instance: logical CPUs may exceed cores so every rank gets its actor.
    ray.init(num_cpus=max(os.cpu_count() or 1, num_ranks + 1), include_dashboard=False,
             log_to_driver=True, configure_logging=False)


def check_gpus(config: ClusterConfig, available_gpus: int) -> None:
    """Refuse a config that needs more GPUs than the Ray cluster has."""
    if config.device != "cuda":
        return
    need = sum(p.tp for p in plan_instances(config))
    have = available_gpus
    if need > have:
        raise ConfigError(f"prefill/decode: the config needs {need} GPUs (instances x tp) but the Ray cluster "
                          f"has {have}; lower prefill.instances, decode.instances or their tp")


def check_tp(config: ClusterConfig, plans: list[InstancePlan]) -> None:
    """Each instance's TP size must divide the model's heads and MLP."""
    model_config = config.model.source.model_config()
    for p in plans:
        validate_tp(model_config, p.tp, f"{p.name.split('-')[0]}.tp")


def _placement_groups(config: ClusterConfig, plans: list[InstancePlan]) -> dict[str, tuple[Any, int]]:
    """instance name -> (placement group, index of its first bundle)."""
    from ray.util.placement_group import placement_group

    bundle = {"CPU": 1, "GPU": 1} if config.device == "cuda" else {"CPU": 1}
    groups: list[list[InstancePlan]] = []
    prefills = [p for p in plans if p.name.startswith("prefill")]
    decodes = [p for p in plans if p.name.startswith("decode")]
    if config.placement == "pack":
        for i in range(max(len(prefills), len(decodes))):
            groups.append([p for p in (prefills[i:i + 1] + decodes[i:i + 1])])
    else:
        groups = [[p] for p in plans]
    out: dict[str, tuple[Any, int]] = {}
    for members in groups:
        pg = placement_group([dict(bundle) for m in members for _ in range(m.tp)], strategy="STRICT_PACK")
        index = 0
        for m in members:
            out[m.name] = (pg, index)
            index += m.tp
    return out


def launch(config: ClusterConfig, ready_timeout_s: float = 300.0,
           plans: list[InstancePlan] | None = None) -> tuple[RayInstancePool, dict[str, dict[str, Any]]]:
    """Start the config's instances (or explicit `plans`, e.g. mixed TP sizes) on Ray."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    plans = plans or plan_instances(config)
    check_tp(config, plans)
    # 1. Ray: the one given by RAY_ADDRESS (ray job submit), else a local one.
    start_ray(config, sum(p.tp for p in plans))
    check_gpus(config, int(ray.cluster_resources().get("GPU", 0)))
    # 2. Build the model cache once, before many actors race to build it.
    config.model.source.directory
    # 3. Placement groups, then one actor per instance in its group.
    groups = _placement_groups(config, plans)
    need_cpus, have_cpus = sum(p.tp for p in plans), ray.cluster_resources().get("CPU", 0)
    if need_cpus > have_cpus:
        raise ConfigError(f"prefill/decode: {need_cpus} ranks need {need_cpus} CPUs in the Ray cluster, which has "
                          f"{have_cpus:g}; start Ray with more --num-cpus or use fewer instances")
    try:
        ray.get([pg.ready() for pg, _ in {id(g[0]): g for g in groups.values()}.values()], timeout=120)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError("placement: the cluster cannot place every instance (not enough CPUs/GPUs per node); "
                          "use placement: spread or fewer instances") from None
    threads = config.engine.cpu_threads_per_instance or max(1, (os.cpu_count() or 1) // sum(p.tp for p in plans))
    threads = threads if config.device == "cpu" else None
    leader_cls, follower_cls = ray.remote(Instance), ray.remote(TPFollower)

    def placed(pg: Any, index: int) -> dict[str, Any]:
        return dict(num_cpus=1, num_gpus=1 if config.device == "cuda" else 0, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index))
    actors: dict[str, Any] = {}
    followers: dict[str, list[Any]] = {}
    for p in plans:
        pg, index = groups[p.name]
        actors[p.name] = leader_cls.options(max_concurrency=16, **placed(pg, index)).remote(
            p.role, config, p.name, threads, None, tp_size=p.tp)
        followers[p.name] = [follower_cls.options(max_concurrency=4, **placed(pg, index + r)).remote(
            p.role, config, p.name, r, p.tp, threads) for r in range(1, p.tp)]
    # 4. Wait for every instance to load its model (TP ranks join their group together);
    #    report which one failed and why.
    info: dict[str, dict[str, Any]] = {}
    for name, actor in actors.items():
        try:
            if followers[name]:
                master = ray.get(actor.free_port.remote(), timeout=ready_timeout_s)
                replies = ray.get([actor.setup.remote(master)] + [f.setup.remote(master) for f in followers[name]],
                                  timeout=ready_timeout_s)
                info[name] = {**replies[0], "addresses": [tuple(r["address"]) for r in replies if "address" in r]}
            else:
                info[name] = ray.get(actor.ready.remote(), timeout=ready_timeout_s)
        except Exception as exc:
            for a in list(actors.values()) + [f for fs in followers.values() for f in fs]:
                ray.kill(a)
            raise RuntimeError(f"instance {name} failed to start: {str(exc).splitlines()[-1]}") from exc
    # 5. Every prefill rank opens KV channels to the decode ranks that own its heads.
    tp_of = {p.name: p.tp for p in plans}
    peers = {n: {"tp": tp_of[n], "addresses": i.get("addresses") or [tuple(i["address"])]}
             for n, i in info.items() if i["role"] == "decode"}
    ray.get([a.connect.remote(peers) for n, i in info.items() if i["role"] == "prefill"
             for a in [actors[n], *followers[n]]])
    pool = RayInstancePool(actors, {p.name: p.role for p in plans})
    pool.followers = followers
    pool.placement_groups = list({id(pg): pg for pg, _ in groups.values()}.values())
    return pool, info
