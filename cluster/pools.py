"""Ways for the front end to reach instances: Ray actors (the product) and in-process
instances (tests of the front end and workers without starting Ray)."""

from __future__ import annotations

import time
from typing import Any

from cluster.instance import Instance


class RayInstancePool:
    """Instances as Ray actors. One `wait_events` call is kept outstanding per live actor, so
    polling costs one `ray.wait`, and a dead actor shows up as an error on its call."""

    def __init__(self, actors: dict[str, Any], roles: dict[str, str]) -> None:
        self.actors, self.roles = actors, roles
        self.followers: dict[str, list[Any]] = {}   # TP ranks > 0 of each instance
        self.placement_groups: list[Any] = []
        self.dead: set[str] = set()
        self._waits: dict[Any, str] = {}

    def names(self, role: str) -> list[str]:
        return [n for n, r in self.roles.items() if r == role]

    def call(self, name: str, method: str, *args: Any) -> None:
        if name not in self.dead:
            getattr(self.actors[name], method).remote(*args)

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, str]]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        waiting = set(self._waits.values())
        for name, actor in self.actors.items():
            if name not in self.dead and name not in waiting:
                self._waits[actor.wait_events.remote(0.05)] = name
        events: list[dict[str, Any]] = []
        loads: dict[str, dict[str, Any]] = {}
        dead: dict[str, str] = {}
        refs = list(self._waits)
        if not refs:
            time.sleep(timeout)
            return events, loads, dead
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            name = self._waits.pop(ref)
            try:
                reply = ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                self.dead.add(name)
                dead[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            events.extend(reply["events"])
            loads[name] = reply["load"]
        return events, loads, dead


class InProcessPool:
    """Instances in this process (their loops run on threads); `kill` simulates a dead actor."""

    def __init__(self, instances: dict[str, Instance]) -> None:
        self.instances = instances
        self.dead: set[str] = set()
        self._newly_dead: dict[str, str] = {}

    def names(self, role: str) -> list[str]:
        return [n for n, i in self.instances.items() if i.role == role]

    def call(self, name: str, method: str, *args: Any) -> None:
        if name not in self.dead:
            getattr(self.instances[name], method)(*args)

    def kill(self, name: str) -> None:
        self.instances[name].shutdown()
        self.dead.add(name)
        self._newly_dead[name] = "killed"

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, str]]:
        events: list[dict[str, Any]] = []
        loads: dict[str, dict[str, Any]] = {}
        live = [n for n in self.instances if n not in self.dead]
        for i, name in enumerate(live):
            reply = self.instances[name].wait_events(timeout if i == 0 else 0.0)
            events.extend(reply["events"])
            loads[name] = reply["load"]
        dead, self._newly_dead = self._newly_dead, {}
        return events, loads, dead
