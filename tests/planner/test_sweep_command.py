"""`splitserve sweep` end to end on a tiny in-process cluster: the real cluster and the
simulator both run every point, and the CSV holds a measured and a simulated row for each."""

from __future__ import annotations

import csv
from pathlib import Path

from splitserve.cli import main

TRACE = Path(__file__).resolve().parents[2] / "benchmarks" / "traces" / "sharegpt_lengths.jsonl"


def test_sweep_measures_and_simulates_each_rate(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {name: tiny-gqa, weights: dummy, dtype: float32}\n"
        "device: cpu\nmode: disagg\n"
        "prefill: {instances: 1, kv_blocks: 256, max_batch_tokens: 512}\n"
        "decode: {instances: 1, kv_blocks: 256}\n"
        "slo: {ttft_s: 1.0, tpot_s: 0.2}\nengine: {cpu_threads_per_instance: 1}\n")
    out = tmp_path / "sweep"
    rc = main(["sweep", str(config), "--rates", "4,8", "--workload", str(TRACE), "--num-requests", "8",
               "--max-prompt-tokens", "200", "--max-output-tokens", "6", "--in-process", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 4, rows
    assert {(r["rate"], r["source"]) for r in rows} == {
        ("4.0", "measured"), ("4.0", "simulated"), ("8.0", "measured"), ("8.0", "simulated")}
    assert all(int(r["num_finished"]) == 8 for r in rows)
    for rate in ("4", "8"):
        summary = out / f"disagg_rate{rate}" / "summary.json"
        assert summary.exists(), sorted(p.name for p in out.iterdir())
    import json
    loops = json.loads((out / "disagg_rate4" / "loops.json").read_text())
    assert set(loops["instances"]) == {"prefill-0", "decode-0"}
    decode = loops["instances"]["decode-0"]
    assert decode["steps"] >= 5 and decode["step_s"] > 0   # at least one step per output token
