#!/usr/bin/env bash
# A short SLO sweep: `splitserve run` at a few request rates, disaggregated and colocated on the
# same instances (--mode colocated), then one table of SLO attainment and p90 latencies.
#   deploy/slo-sweep.sh deploy/gpu-1p1d.yaml 2 4 8          # CONFIG RATE...
# NUM_REQUESTS (default 64), MAX_OUTPUT_TOKENS (64), WORKLOAD (sharegpt), OUT (runs/slo-sweep).
# Exits non-zero if any run fails outright; attainment is reported, not judged (CI keeps the table).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: deploy/slo-sweep.sh CONFIG RATE...}
shift
rates=("${@:-2}")
out=${OUT:-runs/slo-sweep}
modes=(disagg colocated)
for rate in "${rates[@]}"; do
  for mode in "${modes[@]}"; do
    echo "== $config  mode=$mode  rate=$rate req/s" >&2
    splitserve run "$config" --mode "$mode" --rate "$rate" --workload "${WORKLOAD:-sharegpt}" \
      --num-requests "${NUM_REQUESTS:-64}" --max-output-tokens "${MAX_OUTPUT_TOKENS:-64}" \
      --max-prompt-tokens "${MAX_PROMPT_TOKENS:-1024}" --timeout "${TIMEOUT:-900}" \
      --out "$out/$mode-rate$rate"
  done
done
python3 - "$out" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(p.read_text())
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"
    rows.append((s["mode"], s["rate"], f"{s['attainment']:.0%}", f"{s['attainment_ttft']:.0%}",
                 f"{s['attainment_tpot']:.0%}", ms(s["ttft_p90"]), ms(s["tpot_p90"]),
                 f"{s['num_finished']}/{s['num_requests']}"))
head = ("mode", "rate", "SLO", "TTFT ok", "TPOT ok", "TTFT p90 ms", "TPOT p90 ms", "finished")
rows.sort(key=lambda r: (r[0], float(r[1])))
widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
for r in (head, *rows):
    print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
PY
