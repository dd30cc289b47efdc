"""The shared model engine: Llama-family model code, paged KV cache, schedulers, sampler.

Both workers (prefill_worker/, decode_worker/) and the colocated baselines run this engine;
the planner's simulator imports its schedulers unchanged.
"""
