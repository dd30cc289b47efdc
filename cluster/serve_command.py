"""`splitserve serve CONFIG`: the OpenAI-compatible HTTP server (serving/) on Ray Serve.

    1. load and check the cluster config (--dry-run stops here and prints the plan)
    2. join Ray: --address / RAY_ADDRESS (a cluster, `ray job submit`), else start a local one
    3. start Serve's HTTP proxy on --host:--port and deploy the app; its replica starts the pools
    4. serve until SIGINT/SIGTERM, then delete the app (and stop the local Ray we started)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from cluster.config import load_cluster_config
from cluster.launcher import plan_instances
from engine.errors import SplitserveError

APP_NAME = "splitserve"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="cluster YAML (see deploy/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 inside a pod)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the config's model.name)")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="requests admitted at once; more get 429 (default: 2x the decode batch slots)")
    p.add_argument("--max-queued", type=int, default=64, help="Serve's queue before the replica; more get 503")
    p.add_argument("--retry-after", type=float, default=1.0, help="seconds suggested to throttled clients")
    p.add_argument("--address", default=None, help="Ray address to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--metrics-export-port", type=int, default=None,
                   help="local Ray only: port of Ray's Prometheus endpoint (default: Ray picks one)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the plan; start nothing")


def run(args: argparse.Namespace) -> int:
    from serving.app import ServeOptions, build_app

    try:
        config = load_cluster_config(args.config)
        if not 0 < args.port < 65536:
            raise SplitserveError(f"--port {args.port}: must be in 1..65535")
        if args.max_inflight is not None and args.max_inflight < 1:
            raise SplitserveError("--max-inflight: must be >= 1")
        options = ServeOptions(args.model_name, args.max_inflight, args.max_queued, args.retry_after)
    except (SplitserveError, ValueError) as exc:
        print(f"splitserve serve: {exc}", file=sys.stderr)
        return 2
    plans = plan_instances(config)
    if args.dry_run:
        print(json.dumps({"config": args.config, "mode": config.mode, "device": config.device,
                          "model": options.model_name or config.model.name, "num_gpus": config.num_gpus,
                          "instances": [p.__dict__ for p in plans], "max_inflight": options.inflight_limit(config),
                          "listen": f"http://{args.host}:{args.port}/v1"}, indent=2))
        return 0

    import ray
    from ray import serve

    address = args.address or os.environ.get("RAY_ADDRESS")
    started_ray = address is None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        kwargs = {"_metrics_export_port": args.metrics_export_port} if args.metrics_export_port else {}
        ray.init(num_cpus=max(os.cpu_count() or 1, len(plans) + 1), include_dashboard=False,
                 configure_logging=False, log_to_driver=True, **kwargs)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"splitserve serve: starting {len(plans)} instances of {config.model.name} ({config.mode}, "
              f"{config.device})", file=sys.stderr, flush=True)
        serve.run(build_app(config, options), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"splitserve serve: ready on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except Exception as exc:
        print(f"splitserve serve: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}",
              file=sys.stderr)
        return 1
    finally:
        print("splitserve serve: shutting down", file=sys.stderr, flush=True)
        try:
            serve.delete(APP_NAME)
            if started_ray:
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
    return 0
