"""Iteration-time models of one engine instance, per tensor-parallel size.

DistServe's forms, with chunked prefill folded in:

    prefill step  t = a + b * sum(new tokens) + c * sum(new * (start + new))   (attention term:
                  each new token attends to its context; sum(len^2) for whole prompts)
    decode step   t = a + b * sum(context) + c * batch
    mixed step    prefill part + decode part - the smaller constant (one launch, not two)

Fitted by least squares on relative error from a profile (coefficients kept >= 0), with the
fitted feature range stored so a prediction outside it is flagged as an extrapolation; or
from a roofline (planner.hardware) when no profile covers a TP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from engine.scheduler import ScheduledBatch


@dataclass(frozen=True)
class LinearFit:
    """t = coef[0] + coef[1] * x1 + coef[2] * x2, valid over [lo, hi] of (x1, x2)."""

    coef: tuple[float, float, float]
    lo: tuple[float, float] = (0.0, 0.0)
    hi: tuple[float, float] = (float("inf"), float("inf"))
    mean_rel_err: float | None = None   # on the profile points it was fitted to
    source: str = "profile"             # profile | roofline | derived

    def __call__(self, x1: float, x2: float) -> float:
        a, b, c = self.coef
        return a + b * x1 + c * x2

    def extrapolates(self, x1: float, x2: float) -> bool:
        return x1 > self.hi[0] * 1.05 or x2 > self.hi[1] * 1.05

    def to_json(self) -> dict[str, Any]:
        return {"coef": list(self.coef), "lo": list(self.lo), "hi": list(self.hi),
                "mean_rel_err": self.mean_rel_err, "source": self.source}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LinearFit":
        return cls(tuple(d["coef"]), tuple(d["lo"]), tuple(d["hi"]), d.get("mean_rel_err"),  # type: ignore[arg-type]
                   d.get("source", "profile"))


def fit_linear(points: Iterable[tuple[float, float, float]]) -> LinearFit:
    """Least squares on relative error over (x1, x2, seconds) points, coefficients >= 0
    (a negative one is dropped and the rest refitted: time never falls as work grows)."""
    pts = np.asarray(list(points), dtype=np.float64)
    if len(pts) < 3:
        raise ValueError(f"need >= 3 profile points to fit, got {len(pts)}")
    x = np.column_stack([np.ones(len(pts)), pts[:, 0], pts[:, 1]])
    t = pts[:, 2]
    w = 1.0 / np.maximum(t, 1e-9)
    active = [0, 1, 2]
    coef = np.zeros(3)
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], t * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    err = float(np.mean(np.abs(x @ coef - t) / np.maximum(t, 1e-9)))
    return LinearFit(tuple(float(c) for c in coef), (float(pts[:, 0].min()), float(pts[:, 1].min())),  # type: ignore[arg-type]
                     (float(pts[:, 0].max()), float(pts[:, 1].max())), err)


@dataclass
class StepModel:
    """Iteration time of one instance at one TP size."""

    tp: int
    prefill: LinearFit
    decode: LinearFit
    extrapolations: int = field(default=0, compare=False)  # predictions outside the fitted range

    def prefill_time(self, num_tokens: float, attn: float) -> float:
        return self.prefill(num_tokens, attn)

    def decode_time(self, batch: int, sum_context: float) -> float:
        return self.decode(sum_context, batch)

    def step_time(self, batch: ScheduledBatch) -> float:
        t = 0.0
        if batch.prefills:
            n = attn = 0
            for s in batch.prefills:
                n += s.num_new_tokens
                attn += s.num_new_tokens * (s.start + s.num_new_tokens)
            t += self.prefill(n, attn)
            if self.prefill.extrapolates(n, attn):
                self.extrapolations += 1
        if batch.decodes:
            ctx = sum(s.start + 1 for s in batch.decodes)
            t += self.decode(ctx, len(batch.decodes))
            if self.decode.extrapolates(ctx, len(batch.decodes)):
                self.extrapolations += 1
            if batch.prefills:
                t -= min(self.prefill.coef[0], self.decode.coef[0])
        return t

    def to_json(self) -> dict[str, Any]:
        return {"tp": self.tp, "prefill": self.prefill.to_json(), "decode": self.decode.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepModel":
        return cls(int(d["tp"]), LinearFit.from_json(d["prefill"]), LinearFit.from_json(d["decode"]))


def fit_step_model(tp: int, prefill_points: list[dict[str, float]], decode_points: list[dict[str, float]]) -> StepModel:
    """From profile rows: prefill {num_tokens, attn, time_s}; decode {batch, sum_context, time_s}."""
    pre = fit_linear((p["num_tokens"], p["attn"], p["time_s"]) for p in prefill_points)
    dec = fit_linear((p["sum_context"], p["batch"], p["time_s"]) for p in decode_points)
    return StepModel(tp, pre, dec)


def derive_tp(base: StepModel, tp: int, efficiency: float = 0.85) -> StepModel:
    """A TP size the profile lacks, from a measured one: work terms split `tp` ways at
    `efficiency` per extra rank, the constant (launches, weight reads at small batch) shrinks
    less. A planning guess, flagged `derived`."""
    doublings = max(0.0, math.log2(tp / base.tp))
    scale = base.tp / (tp * efficiency ** doublings)   # speedup tp/base at `efficiency` per doubling

    def scaled(f: LinearFit, const_share: float) -> LinearFit:
        a, b, c = f.coef
        a2 = a * (const_share + (1 - const_share) * scale)
        return LinearFit((a2, b * scale, c * scale), f.lo, f.hi, f.mean_rel_err, "derived")
    return StepModel(tp, scaled(base.prefill, 0.5), scaled(base.decode, 0.3))
