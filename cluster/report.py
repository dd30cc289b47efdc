"""What a run leaves behind: the summary table on the terminal, requests.jsonl and summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.metrics import RequestRecord

REQUEST_FIELDS = ("id", "prompt_tokens", "output_tokens", "arrival_s", "ttft_s", "tpot_s", "status",
                  "finish_reason", "prefill_instance", "decode_instance", "kv_bytes_raw", "kv_bytes_wire",
                  "kv_transfer_s")


def write_run(out_dir: Path, records: list[RequestRecord], summary: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "requests.jsonl", "w") as f:
        for r in records:
            d = r.to_json()
            f.write(json.dumps({k: d[k] for k in REQUEST_FIELDS} | {"events": d["events"]}) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v * 1000:.1f} ms" if unit == "s" and v < 10 else f"{v:.3g}{(' ' + unit) if unit else ''}"
    return str(v)


def format_summary(s: dict[str, Any]) -> str:
    rows = [
        ("requests", f"{s['num_finished']}/{s['num_requests']} finished, {s['num_failed']} failed"),
        ("rate", f"{s['rate']} req/s" if s.get("rate") else "-"),
        ("duration", _fmt(s.get("duration_s"), "s")),
        ("TTFT p50/p90/p99", " / ".join(_fmt(s[f"ttft_p{q}"], "s") for q in (50, 90, 99))),
        ("TPOT p50/p90/p99", " / ".join(_fmt(s[f"tpot_p{q}"], "s") for q in (50, 90, 99))),
        ("SLO attainment", f"{s['attainment']:.1%} (TTFT {s['attainment_ttft']:.1%}, TPOT {s['attainment_tpot']:.1%})"
                           f"  targets TTFT {s['slo_ttft_s']} s, TPOT {s['slo_tpot_s']} s"),
        ("output tokens/s", _fmt(s.get("output_tokens_per_s"))),
        ("KV bytes raw/wire", f"{s['kv_bytes_raw'] / 1e6:.1f} MB / {s['kv_bytes_wire'] / 1e6:.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
