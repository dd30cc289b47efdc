"""The decode instance: KV in from prefill instances, continuous batching, tokens out."""

from decode_worker.worker import DecodeWorker

__all__ = ["DecodeWorker"]
