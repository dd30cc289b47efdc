"""`splitserve profile CONFIG --out profile.json`: measure step times, the KV link and the
codec on this machine, and print the fitted latency model with its error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from cluster.config import load_cluster_config
from engine.errors import SplitserveError
from planner.latency import fit_step_model
from planner.profile import profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="cluster YAML: model, dtype, device, batch limits")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--quick", action="store_true", help="fewer points (a minute on CPU)")
    p.add_argument("--codecs", default="raw,lossless,int8,default,aggressive")
    p.add_argument("--colocate", type=int, default=None,
                   help="CPU: measure steps with up to this many instances sharing the cores "
                        "(default: the config's instances, at least one more than the cores hold)")
    p.add_argument("--serving-only", action="store_true",
                   help="re-measure only the serving overhead, into the existing --out profile")
    p.add_argument("--no-serving", action="store_true",
                   help="skip the serving-overhead measurement on a running cluster")
    p.add_argument("--tp-sizes", default="1",
                   help="TP sizes to measure, e.g. 1,2,4 (one process per rank; on GPUs each needs that "
                        "many devices); sizes not measured are derived from a measured one")


def tp_sizes_to_profile(config: Any, text: str) -> tuple[int, ...]:
    """--tp-sizes "1,2,4" -> (1, 2, 4), each dividing the model and fitting the GPUs here."""
    from engine.tensor_parallel import validate_tp
    try:
        sizes = tuple(sorted({1, *(int(x) for x in text.split(",") if x.strip())}))
    except ValueError:
        raise ValueError(f"--tp-sizes: {text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None
    model = config.model.source.model_config()
    gpus = torch.cuda.device_count() if config.device == "cuda" else None
    for tp in sizes:
        if tp < 1:
            raise ValueError(f"--tp-sizes: {tp} is not a TP size; use positive integers")
        validate_tp(model, tp, field="--tp-sizes")
        if gpus is not None and tp > gpus:
            raise ValueError(f"--tp-sizes: TP {tp} needs {tp} GPUs, this machine has {gpus}; drop it")
    return sizes


def run(args: argparse.Namespace) -> int:
    try:
        config = load_cluster_config(args.config)
    except SplitserveError as exc:
        print(f"splitserve profile: {exc}", file=sys.stderr)
        return 2
    try:
        tp_sizes = tp_sizes_to_profile(config, args.tp_sizes)
    except (SplitserveError, ValueError) as exc:
        print(f"splitserve profile: {exc}", file=sys.stderr)
        return 2
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if args.serving_only:
        return _serving_only(config, Path(args.out), log)
    prof = profile(config, args.quick, tuple(args.codecs.split(",")), log, args.colocate, not args.no_serving,
                   tp_sizes)
    for tp, entry in prof["tp"].items():
        m = fit_step_model(int(tp), entry["prefill"], entry["decode"])
        entry["fit"] = m.to_json()
        print(f"tp{tp} prefill: {m.prefill.coef[0] * 1e3:.2f} ms + {m.prefill.coef[1] * 1e6:.2f} us/token + "
              f"{m.prefill.coef[2] * 1e9:.3f} ns/token^2 (mean error {m.prefill.mean_rel_err:.1%})")
        print(f"tp{tp} decode:  {m.decode.coef[0] * 1e3:.2f} ms + {m.decode.coef[1] * 1e9:.2f} ns/context token + "
              f"{m.decode.coef[2] * 1e3:.3f} ms/seq (mean error {m.decode.mean_rel_err:.1%})")
    tcp = prof["links"]["tcp"]
    print(f"KV channel (loopback TCP): {tcp['bytes_per_s'] / 1e9:.2f} GB/s + {tcp.get('per_run_s', 0) * 1e6:.0f} us "
          f"per message (a run of layers), +{tcp.get('latency_s', 0) * 1e3:.1f} ms per request alone")
    for level, c in prof["codec"].items():
        print(f"codec {level}: {c['bits_per_element']:.2f} bits/elem, encode {c['encode_bytes_per_s'] / 1e6:.0f} MB/s, "
              f"decode {c['decode_bytes_per_s'] / 1e6:.0f} MB/s")
    if prof.get("colocation"):
        for kind, st in prof["colocation"]["stretch"].items():
            print(f"co-location {kind}: " + ", ".join(f"{k + 1} busy x{x:.2f}" for k, x in enumerate(st)))
    if prof.get("serving_overhead"):
        o = prof["serving_overhead"]
        print(f"serving overhead: prefill {o['prefill_s'] * 1e3:.1f} ms, decode {o['decode_s'] * 1e3:.1f} ms "
              f"+ {o.get('decode_per_seq_s', 0.0) * 1e3:.2f} ms/seq per step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(prof, indent=1) + "\n")
    print(f"  wrote {args.out} in {prof['profile_s']:.0f} s", file=sys.stderr)
    return 0


def _serving_only(config: Any, out: Path, log: Any) -> int:
    """The serving overhead on the running cluster, against the step model already in `out`."""
    from planner.overhead import measure_overhead
    prof = json.loads(out.read_text())
    entry = prof["tp"]["1"]
    prof["serving_overhead"] = measure_overhead(config, fit_step_model(1, entry["prefill"], entry["decode"]), log=log)
    out.write_text(json.dumps(prof, indent=1) + "\n")
    o = prof["serving_overhead"]
    print(f"serving overhead: prefill {o['prefill_s'] * 1e3:.1f} ms, decode {o['decode_s'] * 1e3:.1f} ms "
          f"+ {o['decode_per_seq_s'] * 1e3:.2f} ms/seq per step, {o['decode_admission_s'] * 1e3:.1f} ms per admission")
    return 0
