"""`splitserve generate CONFIG --prompt TEXT`: one completion through the cluster."""

from __future__ import annotations

import argparse
import sys

from cluster.cluster import Cluster
from cluster.config import load_cluster_config
from engine.errors import SplitserveError
from engine.request import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mode", choices=["disagg", "colocated", "chunked"], default=None)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--in-process", action="store_true", help="run instances in this process, without Ray")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_cluster_config(args.config).with_mode(args.mode)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        tokenizer = config.model.source.tokenizer()
        if tokenizer is None:
            raise SplitserveError("model.weights: dummy weights have no tokenizer; generate needs real weights")
        if args.raw or tokenizer.chat_template is None:
            prompt_ids = tokenizer.encode(args.prompt)
        else:
            prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                       add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer.encode(prompt_ids)
    except (SplitserveError, ValueError) as exc:
        print(f"splitserve generate: {exc}", file=sys.stderr)
        return 2
    try:
        cluster = Cluster.open(config, args.in_process)
    except (SplitserveError, RuntimeError) as exc:
        print(f"splitserve generate: {exc}", file=sys.stderr)
        return 2
    try:
        result = cluster.generate(prompt_ids, params)
    finally:
        cluster.shutdown()
    if result.state != "finished":
        print(f"splitserve generate: request {result.state}: {result.reason}", file=sys.stderr)
        return 1
    print(tokenizer.decode(result.tokens, skip_special_tokens=True))
    return 0
