"""Token-exact greedy generation against transformers' own `generate` (fp32, CPU), on the
real SmolLM2 weights and real ShareGPT prompts, with requests arriving while others run."""

from __future__ import annotations

import pytest
import torch

from benchmarks.workloads import load_workload
from engine.request import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.weights import load_reference_model

NUM_PROMPTS = 16
NEW_TOKENS = 32
# requests added before each of the first steps: some arrive while others decode
ARRIVALS = [3, 0, 2, 1, 0, 4, 0, 0, 1, 2, 0, 3]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[list[int]]:
    _, _, tokenizer = smollm2
    items = load_workload("sharegpt", NUM_PROMPTS, tokenizer, max_prompt_tokens=192)
    ids = [tokenizer.encode(it.prompt) for it in items]
    assert len(ids) == NUM_PROMPTS and all(ids)
    return ids


@pytest.fixture(scope="module")
def reference_outputs(prompts) -> list[list[int]]:
    """transformers' greedy continuation of each prompt alone, cut after its first EOS."""
    model, _ = load_reference_model()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=model.config.eos_token_id)
            new = y[0, len(ids):].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            outs.append(new[:cut])
    return outs


def run_staggered(engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[ScheduledBatch]]:
    """Submit prompts a few at a time between steps; returns outputs and every batch run."""
    batches: list[ScheduledBatch] = []
    schedule = engine.scheduler.schedule

    def recording_schedule(now: float) -> ScheduledBatch:
        batches.append(schedule(now))
        return batches[-1]

    engine.scheduler.schedule = recording_schedule
    params = SamplingParams(max_tokens=NEW_TOKENS)
    pending, reqs, step = list(prompts), [], 0
    while pending or engine.has_unfinished:
        n = ARRIVALS[step] if step < len(ARRIVALS) else len(pending)
        for _ in range(min(n, len(pending))):
            reqs.append(engine.add_request(pending.pop(0), params))
        engine.step()
        step += 1
    assert all(r.status.is_done for r in reqs)
    return [r.output_token_ids for r in reqs], batches


@pytest.mark.parametrize("policy,config", [
    ("continuous", {}),
    ("chunked", {"max_num_batched_tokens": 64}),
])
def test_greedy_matches_transformers(make_smollm2_engine, prompts, reference_outputs, policy, config):
    engine = make_smollm2_engine(policy, **config)
    outputs, batches = run_staggered(engine, prompts)
    for i, (ours, ref) in enumerate(zip(outputs, reference_outputs)):
        assert ours == ref, f"prompt {i} ({len(prompts[i])} tokens) diverges at token " \
            f"{next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))}"
    # the run exercised what it claims to: late arrivals, and for chunked, split prompts
    # sharing steps with decodes
    assert any(b.decodes for b in batches[:len(ARRIVALS)])
    if policy == "chunked":
        assert max(b.num_tokens for b in batches) <= 64
        assert any(b.prefills and b.decodes for b in batches)
        assert any(s.start > 0 for b in batches for s in b.prefills), "no prompt was split into chunks"
    assert engine.blocks.num_free == engine.blocks.num_blocks
