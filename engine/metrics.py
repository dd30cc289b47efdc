"""TTFT, TPOT and SLO attainment, defined once (DESIGN.md) for the runtime, the simulator
and the sweeps.

TTFT = first-token time - arrival time.
TPOT = (last-token time - first-token time) / (output tokens - 1); 0 for a single token.
Attainment = share of requests meeting both targets; a failed request meets neither.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from engine.request import LifecycleEvent, Request


@dataclass
class RequestRecord:
    """One request's outcome, plain data (crosses Ray, lands in requests.jsonl)."""

    id: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    first_token_s: float | None
    last_token_s: float | None
    status: str
    finish_reason: str | None = None
    prefill_instance: str | None = None
    decode_instance: str | None = None
    kv_bytes_raw: int = 0
    kv_bytes_wire: int = 0
    kv_transfer_s: float | None = None
    events: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "finished"

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.last_token_s is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.last_token_s - self.first_token_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ttft_s"], d["tpot_s"] = self.ttft_s, self.tpot_s
        return d


def record_of(req: Request, **extra: Any) -> RequestRecord:
    return RequestRecord(
        id=req.request_id, prompt_tokens=req.num_prompt_tokens, output_tokens=len(req.output_token_ids),
        arrival_s=req.arrival_time, first_token_s=req.events.get(LifecycleEvent.FIRST_TOKEN),
        last_token_s=req.last_token_time, status=req.status.value, finish_reason=req.finish_reason,
        events={e.value: t for e, t in req.events.items()}, **extra)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def attainment(records: Iterable[RequestRecord], slo_ttft_s: float, slo_tpot_s: float) -> tuple[float, float, float]:
    """(both, ttft only, tpot only) shares of requests meeting their targets."""
    recs = list(records)
    if not recs:
        return 0.0, 0.0, 0.0
    ttft_ok = [r.ok and r.ttft_s is not None and r.ttft_s <= slo_ttft_s for r in recs]
    tpot_ok = [r.ok and r.tpot_s is not None and r.tpot_s <= slo_tpot_s for r in recs]
    n = len(recs)
    return (sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / n, sum(ttft_ok) / n, sum(tpot_ok) / n)


def summarize(records: list[RequestRecord], slo_ttft_s: float, slo_tpot_s: float,
              rate: float | None = None, duration_s: float | None = None) -> dict[str, Any]:
    done = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    tpots = [r.tpot_s for r in done if r.tpot_s is not None]
    both, a_ttft, a_tpot = attainment(records, slo_ttft_s, slo_tpot_s)
    out: dict[str, Any] = {"num_requests": len(records), "num_finished": len(done),
                           "num_failed": sum(r.status != "finished" for r in records)}
    for name, vals in (("ttft", ttfts), ("tpot", tpots)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(vals, q)
    out.update(attainment=both, attainment_ttft=a_ttft, attainment_tpot=a_tpot, slo_ttft_s=slo_ttft_s,
               slo_tpot_s=slo_tpot_s, rate=rate, duration_s=duration_s,
               output_tokens=sum(r.output_tokens for r in done),
               kv_bytes_raw=sum(r.kv_bytes_raw for r in records),
               kv_bytes_wire=sum(r.kv_bytes_wire for r in records))
    if duration_s:
        out["output_tokens_per_s"] = out["output_tokens"] / duration_s
    return out
