"""A request as plain data, for crossing process boundaries (Ray calls, the KV channel)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from engine.request import LifecycleEvent, Request, SamplingParams


def request_to_spec(req: Request) -> dict[str, Any]:
    return {"id": req.request_id, "prompt_token_ids": list(req.prompt_token_ids),
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(req.params).items()},
            "arrival_s": req.arrival_time, "events": {e.value: t for e, t in req.events.items()}}


def request_from_spec(spec: dict[str, Any]) -> Request:
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in (spec.get("params") or {}).items()}
    req = Request(spec["id"], list(spec["prompt_token_ids"]), SamplingParams(**params), float(spec["arrival_s"]))
    for name, t in (spec.get("events") or {}).items():
        req.record(LifecycleEvent(name), t)
    return req
