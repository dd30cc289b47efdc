"""The cluster config: one YAML file describes the model, the two pools, the KV transfer,
the SLOs and placement. Loaded into frozen dataclasses; unknown keys and impossible values
are rejected with the field's dotted path and the fix.

    model:       {name, weights: real|dummy, dtype}
    device:      cpu | cuda
    mode:        disagg | colocated | chunked      (colocated modes reuse both pools' GPUs)
    prefill:     {instances, tp, max_batch_tokens, chunk_size, kv_blocks, memory_fraction}
    decode:      {instances, tp, max_batch_size, max_batch_tokens, kv_blocks, memory_fraction}
    kv_transfer: {transport: tcp|inproc, codec: raw|lossless|int8|default|aggressive|auto,
                  link_gbps, timeout_s, max_retries}
    slo:         {ttft_s, tpot_s, attainment}
    placement:   pack | spread
    engine:      {block_size, max_model_len, cpu_threads_per_instance, switch_interval_ms}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from cluster.config_schema import from_dict
from engine.config import EngineConfig, parse_dtype
from engine.errors import ConfigError
from engine.weights import ModelSource

CODEC_LEVELS = ("raw", "lossless", "int8", "default", "aggressive", "auto")


@dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m"
    weights: Literal["real", "dummy"] = "real"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        parse_dtype(self.dtype, "model.dtype")

    @property
    def source(self) -> ModelSource:
        return ModelSource(self.name, self.weights)


@dataclass(frozen=True)
class PoolSection:
    instances: int = 1
    tp: int = 1
    max_batch_tokens: int = 2048
    max_batch_size: int = 64
    chunk_size: int | None = None
    kv_blocks: int | None = None
    memory_fraction: float = 0.85

    def validate(self, name: str) -> None:
        if self.instances < 0:
            raise ConfigError(f"{name}.instances={self.instances}: must be >= 0")
        if self.tp < 1:
            raise ConfigError(f"{name}.tp={self.tp}: must be >= 1")
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ConfigError(f"{name}.max_batch_tokens / max_batch_size: must be >= 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ConfigError(f"{name}.kv_blocks={self.kv_blocks}: must be >= 1 (or leave it unset)")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"{name}.memory_fraction={self.memory_fraction}: must be in (0, 1]")


@dataclass(frozen=True)
class KVTransferSection:
    transport: Literal["tcp", "inproc"] = "tcp"
    codec: str = "raw"
    link_gbps: float | None = None   # emulated link cap, gigabits/s; None = as fast as it goes
    timeout_s: float = 30.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.codec not in CODEC_LEVELS:
            raise ConfigError(f"kv_transfer.codec={self.codec!r}: choose one of {', '.join(CODEC_LEVELS)}")
        if self.link_gbps is not None and self.link_gbps <= 0:
            raise ConfigError(f"kv_transfer.link_gbps={self.link_gbps}: must be > 0 (or unset for no cap)")
        if self.timeout_s <= 0:
            raise ConfigError(f"kv_transfer.timeout_s={self.timeout_s}: must be > 0")


@dataclass(frozen=True)
class SLOSection:
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ConfigError("slo.ttft_s and slo.tpot_s: must be > 0 seconds")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"slo.attainment={self.attainment}: must be in (0, 1]")


@dataclass(frozen=True)
class EngineSection:
    block_size: int = 16
    max_model_len: int | None = None
    cpu_threads_per_instance: int | None = None
    # Python's GIL switch interval in each instance process (None: Python's 5 ms). A KV channel
    # thread waits up to this long for the GIL per layer message while the step loop launches
    # kernels; shorter hands it over sooner at some cost to the loop.
    switch_interval_ms: float | None = None


@dataclass(frozen=True)
class ClusterConfig:
    model: ModelSection = field(default_factory=ModelSection)
    device: Literal["cpu", "cuda"] = "cpu"
    mode: Literal["disagg", "colocated", "chunked"] = "disagg"
    prefill: PoolSection = field(default_factory=PoolSection)
    decode: PoolSection = field(default_factory=PoolSection)
    kv_transfer: KVTransferSection = field(default_factory=KVTransferSection)
    slo: SLOSection = field(default_factory=SLOSection)
    placement: Literal["pack", "spread"] = "pack"
    engine: EngineSection = field(default_factory=EngineSection)

    def __post_init__(self) -> None:
        self.prefill.validate("prefill")
        self.decode.validate("decode")
        if self.prefill.instances + self.decode.instances == 0:
            raise ConfigError("prefill.instances + decode.instances: at least one instance is needed")
        if self.mode == "disagg" and (self.prefill.instances == 0 or self.decode.instances == 0):
            raise ConfigError("mode: disagg needs prefill.instances >= 1 and decode.instances >= 1; "
                              "use mode: colocated for a single pool")
        si = self.engine.switch_interval_ms
        if si is not None and not 0.01 <= si <= 100:
            raise ConfigError(f"engine.switch_interval_ms={si}: use 0.01-100 ms, or leave it unset for Python's 5 ms")
        if self.device == "cpu" and self.model.dtype not in ("float32", "fp32", "bfloat16", "bf16"):
            raise ConfigError(f"model.dtype={self.model.dtype!r}: CPU runs float32 or bfloat16")

    @property
    def num_gpus(self) -> int:
        if self.device != "cuda":
            return 0
        return self.prefill.instances * self.prefill.tp + self.decode.instances * self.decode.tp

    def with_mode(self, mode: str | None) -> "ClusterConfig":
        return self if mode is None else replace(self, mode=mode)

    def engine_config(self, pool: PoolSection) -> EngineConfig:
        """The engine limits of one instance of `pool`."""
        return EngineConfig(
            block_size=self.engine.block_size, num_blocks=pool.kv_blocks,
            gpu_memory_fraction=pool.memory_fraction, max_num_seqs=pool.max_batch_size,
            max_num_batched_tokens=pool.max_batch_tokens, max_model_len=self.engine.max_model_len,
            dtype=parse_dtype(self.model.dtype), device=self.device,
            extra={"chunk_size": pool.chunk_size},
        )


def load_cluster_config(path: str | os.PathLike[str]) -> ClusterConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such cluster config; see deploy/ for examples")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_cluster_config(data, str(p))


def parse_cluster_config(data: object, origin: str = "config") -> ClusterConfig:
    try:
        return from_dict(ClusterConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
