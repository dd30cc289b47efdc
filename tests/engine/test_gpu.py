"""CUDA paths of the engine: the Triton layer ops and CUDA-graph decode against the eager
and torch-reference paths. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import engine.model_runner as model_runner
from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from engine.rope import RotaryEmbedding

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# a small Llama shape with Llama-3's head layout (GQA 4:1, head_dim 128)
SMALL = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=3, num_heads=4,
                    num_kv_heads=1, head_dim=128, rope_theta=500000.0, max_position_embeddings=4096,
                    eos_token_ids=(0,), name="small-llama")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_eager(dtype):
    from engine.rope_kernel import rotary_embedding_
    rope = RotaryEmbedding(128, 8192, 500000.0, None).cuda()
    qkv = torch.randn(37, (32 + 2 * 8) * 128, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    q, k = q.view(37, 32, 128), k.view(37, 8, 128)            # strided views, as in the model
    positions = torch.randint(0, 8192, (37,), device="cuda")
    ref_q, ref_k = rope(positions, q.float(), k.float())
    rotary_embedding_(q, k, positions, rope.cos, rope.sin)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for out, ref in ((q, ref_q), (k, ref_k)):
        assert ((out.float() - ref).norm() / ref.norm()).item() < tol


def run(backend: str, graphs: bool, dtype=torch.float32, num_blocks: int = 256, max_tokens: int = 12):
    """Five requests of different lengths (three block-table widths); returns the tokens and
    the logits of every step."""
    cfg = EngineConfig(num_blocks=num_blocks, device="cuda", dtype=dtype, attention_backend=backend,
                       use_cuda_graphs=graphs, max_num_seqs=8)
    engine = LLMEngine(SMALL, cfg)
    engine.preempted = 0
    schedule = engine.scheduler.schedule

    def counting_schedule(now):
        batch = schedule(now)
        engine.preempted += len(batch.preempted)
        return batch

    engine.scheduler.schedule = counting_schedule
    logits_seen = []
    real_sample = model_runner.sample

    def recording_sample(logits, params, positions):
        logits_seen.append(logits.clone())
        return real_sample(logits, params, positions)

    model_runner.sample = recording_sample
    if engine.runner.graphs is not None:   # greedy graph steps take the graph's argmax, not sample()
        graph_run = engine.runner.graphs.run

        def recording_run(*inputs):
            logits, argmax = graph_run(*inputs)
            logits_seen.append(logits.clone())
            return logits, argmax

        engine.runner.graphs.run = recording_run
    try:
        gen = torch.Generator().manual_seed(0)
        reqs = [engine.add_request(torch.randint(1, 1024, (n,), generator=gen).tolist(),
                                   SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                for n in (5, 300, 17, 1000, 64)]
        while engine.has_unfinished:
            engine.step()
    finally:
        model_runner.sample = real_sample
    return engine, [r.output_token_ids for r in reqs], logits_seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_graph_decode_matches_eager():
    eager_engine, eager_tokens, eager_logits = run("triton", graphs=False)
    graph_engine, graph_tokens, graph_logits = run("triton", graphs=True)
    assert eager_engine.runner.graphs is None
    assert graph_engine.runner.graphs.captured, "no decode step ran from a graph"
    assert graph_tokens == eager_tokens
    assert len(graph_logits) == len(eager_logits)
    for a, b in zip(graph_logits, eager_logits):
        assert rel(a, b) < 1e-4


def test_graph_decode_after_preemption_matches_eager():
    """A preempted request comes back with a new block table (a new list): the graph's staged
    table rows must be rewritten, not reused."""
    eager_engine, eager_tokens, _ = run("triton", graphs=False, num_blocks=70, max_tokens=40)
    graph_engine, graph_tokens, _ = run("triton", graphs=True, num_blocks=70, max_tokens=40)
    assert graph_engine.preempted > 0, "no preemption: the test shows nothing"
    assert graph_tokens == eager_tokens


def test_triton_backend_matches_torch_reference():
    _, _, tri = run("triton", graphs=True)
    _, _, ref = run("torch", graphs=False)
    # the first step (all prefills) has the same inputs on both paths; fp32 dots may run as tf32
    assert rel(tri[0], ref[0]) < 5e-3
    assert rel(tri[1], ref[1]) < 5e-3


def test_bf16_graph_decode_runs_and_frees_blocks():
    engine, tokens, _ = run("auto", graphs=True, dtype=torch.bfloat16)
    assert all(len(t) == 12 for t in tokens)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_graph_capture_leaves_other_threads_free_to_pin_memory():
    """A decode worker captures graphs lazily while its KV receiver threads land raw bodies in
    pinned memory; a capture must not make those allocations fail (they did in global mode)."""
    import threading

    from kvtransfer.payload import DeviceEntry
    landed, stop = [], threading.Event()

    def receiver() -> None:
        while not stop.is_set():
            landed.append(DeviceEntry("cuda").landing(1 << 20))
    thread = threading.Thread(target=receiver)
    thread.start()
    try:
        engine, tokens, _ = run("triton", graphs=True, dtype=torch.bfloat16)
    finally:
        stop.set()
        thread.join()
    assert engine.runner.graphs.captured and all(len(t) == 12 for t in tokens)
    assert landed and all(b is not None and b.is_pinned() for b in landed)
