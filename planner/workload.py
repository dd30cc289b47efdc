"""The lengths the planner plans for: a workload's prompt and output token counts, from the
same loader `splitserve run` uses (so plan, simulation and run see one trace)."""

from __future__ import annotations

from benchmarks.workloads import load_workload
from cluster.config import ClusterConfig
from engine.weights import ModelSource
from planner.search import Workload


def workload_lengths(config: ClusterConfig, name: str, num: int, seed: int, max_prompt_tokens: int,
                     max_output_tokens: int) -> Workload:
    """Text workloads are tokenized with the model's tokenizer, or SmolLM2's when the model has
    dummy weights (no tokenizer): a lengths trace drawn from the real data either way."""
    source = config.model.source
    tokenizer = source.tokenizer()
    if tokenizer is None and not name.endswith(".jsonl"):
        tokenizer = ModelSource("smollm2-135m", "real").tokenizer()
    vocab = source.model_config().vocab_size
    items = load_workload(name, num, tokenizer, seed, max_prompt_tokens, max_output_tokens, vocab)
    prompts = [len(it.prompt_token_ids) if it.prompt_token_ids else len(tokenizer.encode(it.prompt)) for it in items]
    return Workload(prompts, [it.max_tokens for it in items], seed)
