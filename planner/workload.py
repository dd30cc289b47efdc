"""The lengths the planner plans for: a workload's prompt and output token counts, from the
same loader `splitserve run` uses (so plan, simulation and run see one trace)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.workloads import gamma_arrivals, load_workload
from cluster.config import ClusterConfig
from engine.weights import ModelSource


@dataclass
class Workload:
    """Prompt and output lengths (tokens) of a trace; requests cycle through them."""

    prompt_lens: list[int]
    output_lens: list[int]
    seed: int = 0

    def trace(self, n: int, rate: float) -> tuple[list[int], list[int], list[float]]:
        k = len(self.prompt_lens)
        return ([self.prompt_lens[i % k] for i in range(n)], [self.output_lens[i % k] for i in range(n)],
                gamma_arrivals(n, rate, self.seed))

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_lens) / len(self.prompt_lens)

    @property
    def mean_output(self) -> float:
        return sum(self.output_lens) / len(self.output_lens)


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
