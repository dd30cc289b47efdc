"""The prefill instance: prompts in, first tokens out, KV streamed to decode instances."""

from prefill_worker.worker import PrefillWorker

__all__ = ["PrefillWorker"]
