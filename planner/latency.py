"""Iteration-time models of one engine instance, per tensor-parallel size.

DistServe's forms, with chunked prefill folded in:

    prefill step  t = a + b * sum(new tokens) + c * sum(new * (start + new))   (attention term:
                  each new token attends to its context; sum(len^2) for whole prompts)
    decode step   t = a + b * sum(context) + c * batch, or per profiled batch size a line in
                  context interpolated over batch (DecodeGrid) where that fits the profile better
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


@dataclass(frozen=True)
class DecodeGrid:
    """Decode step time over the profiled batch sizes: per batch size a line in total context
    (a_i + k_i * sum_context), interpolated linearly in batch between them and continued from
    the last two beyond. CPU decode steps are concave in batch (SmolLM2 on 2 cores: 65 ms at
    batch 1, 120 at 4, 191 at 16), which one plane a + b*context + c*batch misses by 25% at
    batch 4; the plane stays for the step constant and for display."""

    plane: LinearFit
    batches: tuple[int, ...]
    lines: tuple[tuple[float, float], ...]   # (a_i, k_i) per batch size
    mean_rel_err: float | None = None

    @property
    def coef(self) -> tuple[float, float, float]:
        return self.plane.coef

    @property
    def source(self) -> str:
        return self.plane.source

    def __call__(self, sum_context: float, batch: float) -> float:
        bs, lines = self.batches, self.lines
        i = 0
        while i < len(bs) - 2 and batch > bs[i + 1]:
            i += 1
        (b0, (a0, k0)), (b1, (a1, k1)) = (bs[i], lines[i]), (bs[i + 1], lines[i + 1])
        f = (max(batch, bs[0]) - b0) / (b1 - b0)
        a, k = a0 + f * (a1 - a0), k0 + f * (k1 - k0)
        return max(a, 0.0) + max(k, 0.0) * sum_context

    def extrapolates(self, sum_context: float, batch: float) -> bool:
        return self.plane.extrapolates(sum_context, batch)

    def to_json(self) -> dict[str, Any]:
        return {**self.plane.to_json(), "grid": {"batches": list(self.batches), "lines": [list(x) for x in self.lines],
                                                 "mean_rel_err": self.mean_rel_err}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DecodeGrid":
        g = d["grid"]
        return cls(LinearFit.from_json(d), tuple(g["batches"]), tuple(tuple(x) for x in g["lines"]),  # type: ignore[arg-type]
                   g.get("mean_rel_err"))


def fit_decode(points: list[tuple[float, float, float]]) -> LinearFit | DecodeGrid:
    """(sum_context, batch, seconds) -> the plane, or a grid over batch sizes when the profile
    has two or more contexts at each of two or more batch sizes and the grid fits better."""
    plane = fit_linear(points)
    by_batch: dict[float, list[tuple[float, float]]] = {}
    for ctx, b, t in points:
        by_batch.setdefault(b, []).append((ctx, t))
    usable = sorted(b for b, pts in by_batch.items() if len({c for c, _ in pts}) >= 2)
    if len(usable) < 2:
        return plane
    lines = []
    for b in usable:
        pts = np.asarray(by_batch[b], dtype=np.float64)
        w = 1.0 / np.maximum(pts[:, 1], 1e-9)
        x = np.column_stack([np.ones(len(pts)), pts[:, 0]])
        (a, k), *_ = np.linalg.lstsq(x * w[:, None], pts[:, 1] * w, rcond=None)
        if k < 0:   # time never falls as context grows
            a, k = float(np.average(pts[:, 1], weights=w)), 0.0
        lines.append((float(a), float(k)))
    grid = DecodeGrid(plane, tuple(int(b) for b in usable), tuple(lines))
    err = float(np.mean([abs(grid(c, b) - t) / max(t, 1e-9) for c, b, t in points]))
    if plane.mean_rel_err is not None and err >= plane.mean_rel_err:
        return plane
    return DecodeGrid(plane, grid.batches, grid.lines, err)


@dataclass
class StepModel:
    """Iteration time of one instance at one TP size."""

    tp: int
    prefill: LinearFit
    decode: LinearFit | DecodeGrid
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
        dec = d["decode"]
        return cls(int(d["tp"]), LinearFit.from_json(d["prefill"]),
                   DecodeGrid.from_json(dec) if "grid" in dec else LinearFit.from_json(dec))


def fit_step_model(tp: int, prefill_points: list[dict[str, float]], decode_points: list[dict[str, float]]) -> StepModel:
    """From profile rows: prefill {num_tokens, attn, time_s}; decode {batch, sum_context, time_s}."""
    pre = fit_linear((p["num_tokens"], p["attn"], p["time_s"]) for p in prefill_points)
    dec = fit_decode([(p["sum_context"], p["batch"], p["time_s"]) for p in decode_points])
    return StepModel(tp, pre, dec)


def derive_tp(base: StepModel, tp: int, efficiency: float = 0.85) -> StepModel:
    """A TP size the profile lacks, from a measured one: work terms split `tp` ways at
    `efficiency` per extra rank, the constant (launches, weight reads at small batch) shrinks
    less. A planning guess, flagged `derived`."""
    doublings = max(0.0, math.log2(tp / base.tp))
    scale = base.tp / (tp * efficiency ** doublings)   # speedup tp/base at `efficiency` per doubling

    def scaled(f: LinearFit | DecodeGrid, const_share: float) -> LinearFit:
        plane = f.plane if isinstance(f, DecodeGrid) else f
        a, b, c = plane.coef
        a2 = a * (const_share + (1 - const_share) * scale)
        return LinearFit((a2, b * scale, c * scale), plane.lo, plane.hi, plane.mean_rel_err, "derived")
    return StepModel(tp, scaled(base.prefill, 0.5), scaled(base.decode, 0.3))
