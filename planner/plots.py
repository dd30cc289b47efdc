"""Sweep plots: attainment vs per-GPU rate (measured solid, simulated dashed, per mode),
attainment vs SLO scale, and predicted vs measured attainment."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_sweep(rows: list[dict[str, Any]], out: Path, target: float, title: str = "") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    colors = dict(zip(modes, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))

    def series(mode: str, src: str, key: str, fixed: dict[str, Any]) -> tuple[list[float], list[float]]:
        pts = sorted((r[key], r["attainment"]) for r in rows if r["mode"] == mode and r["source"] == src
                     and all(r[k] == v for k, v in fixed.items()))
        return [p[0] for p in pts], [100 * p[1] for p in pts]

    for key, fixed, name, xlabel in (("per_gpu_rate", {"slo_scale": 1.0}, "attainment_vs_rate.png",
                                      "request rate per GPU (req/s)"),
                                     ("slo_scale", {}, "attainment_vs_slo_scale.png", "SLO scale")):
        if len({r[key] for r in rows}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for mode in modes:
            for src, style in (("measured", "-o"), ("simulated", "--x")):
                x, y = series(mode, src, key, fixed)
                if x:
                    ax.plot(x, y, style, color=colors[mode], label=f"{mode} {src}")
        ax.axhline(100 * target, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    pairs: dict[tuple, dict[str, float]] = {}
    for r in rows:
        pairs.setdefault((r["mode"], r["rate"], r["slo_scale"]), {})[r["source"]] = 100 * r["attainment"]
    both = [(k, v) for k, v in pairs.items() if len(v) == 2]
    if both:
        fig, ax = plt.subplots(figsize=(4.2, 4.0))
        for mode in modes:
            pts = [v for k, v in both if k[0] == mode]
            ax.scatter([p["measured"] for p in pts], [p["simulated"] for p in pts], color=colors[mode], label=mode, s=18)
        ax.plot([0, 100], [0, 100], color="gray", lw=0.8)
        ax.fill_between([0, 100], [-5, 95], [5, 105], color="gray", alpha=0.15, label="±5 points")
        ax.set_xlabel("measured attainment (%)")
        ax.set_ylabel("simulated attainment (%)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "predicted_vs_measured.png", dpi=120)
        plt.close(fig)
        written.append(out / "predicted_vs_measured.png")
    return written
