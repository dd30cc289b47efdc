"""Everything the planner knows about speed, assembled from a profile (planner.profile) or,
for what the profile lacks, from the roofline (planner.hardware):

    step_model(tp)     measured fit > derived from a measured TP size > roofline
    transfer           KV bytes per token, codec bits and speeds, gather/scatter copy rate
    intra / inter link the KV channel within a node (measured TCP loopback) and across nodes
                       (min of the network's --link-gbps and the channel's own speed), both
                       capped by an emulated kv_transfer.link_gbps
    kv_blocks(pool)    the pool's kv_blocks if set, else the memory model
    sharing            CPU: step-time stretch with k instances of a node busy (planner.colocation)
    overhead_s         per step, by pool: the serving runtime's own time (planner.overhead)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from cluster.config import ClusterConfig, PoolSection
from engine.config import ModelConfig, parse_dtype
from planner.colocation import CoreSharing
from planner.hardware import Accelerator, accelerator_for, dtype_bytes, kv_blocks_per_instance, roofline_step_model
from planner.latency import StepModel, derive_tp, fit_step_model
from planner.transfer import LinkModel, TransferModel

DEFAULT_TCP_BYTES_PER_S = 1.0e9   # loopback KV channel without a profile


@dataclass
class Perf:
    model: ModelConfig
    dtype: str
    accelerator: Accelerator
    measured: dict[int, StepModel] = field(default_factory=dict)
    transfer: TransferModel | None = None
    tcp: LinkModel = field(default_factory=lambda: LinkModel("tcp", DEFAULT_TCP_BYTES_PER_S))
    sharing: CoreSharing | None = None
    overhead_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _cache: dict[int, StepModel] = field(default_factory=dict)

    def step_model(self, tp: int) -> StepModel:
        if tp not in self._cache:
            if tp in self.measured:
                m = self.measured[tp]
            elif self.measured:
                base = max(t for t in self.measured if t <= tp) if any(t <= tp for t in self.measured) else min(self.measured)
                m = derive_tp(self.measured[base], tp)
            else:
                m = roofline_step_model(self.model, tp, self.accelerator, self.dtype)
            self._cache[tp] = StepModel(m.tp, m.prefill, m.decode)  # own extrapolation counter
        return self._cache[tp]

    def source(self, tp: int) -> str:
        return self.step_model(tp).prefill.source

    def link(self, kind: str, emulated_gbps: float | None, network_gbps: float | None = None) -> LinkModel:
        bps = self.tcp.bytes_per_s
        if kind == "inter" and network_gbps:
            bps = min(bps, network_gbps * 1e9 / 8)
        if emulated_gbps:
            bps = min(bps, emulated_gbps * 1e9 / 8)
        return LinkModel(kind, bps, self.tcp.per_layer_s, self.tcp.latency_s, self.tcp.per_run_s)

    def kv_blocks(self, config: ClusterConfig, pool: PoolSection) -> int:
        if pool.kv_blocks is not None:
            return pool.kv_blocks
        if config.device == "cpu":  # EngineConfig.cpu_kv_bytes
            return max(1, (512 << 20) // (self.model.kv_bytes_per_token(parse_dtype(self.dtype)) * config.engine.block_size))
        return kv_blocks_per_instance(self.model, pool.tp, self.accelerator, self.dtype, config.engine.block_size,
                                      pool.memory_fraction)


def build_perf(config: ClusterConfig, model: ModelConfig, profile: dict[str, Any] | None) -> Perf:
    dtype = config.model.dtype
    acc = accelerator_for(config.device, (profile or {}).get("device_name"))
    perf = Perf(model, dtype, acc)
    dtype_bits = 8 * dtype_bytes(dtype)
    kv_token = model.kv_bytes_per_token(parse_dtype(dtype))
    if profile is None:
        perf.notes.append(f"no profile: roofline step times for {acc.name}")
        perf.transfer = TransferModel(kv_token, model.num_layers, dtype_bits)
        return perf
    if profile.get("model") != model.name or profile.get("dtype") != dtype:
        perf.notes.append(f"profile is of {profile.get('model')}/{profile.get('dtype')}, config is "
                          f"{model.name}/{dtype}: using it anyway")
    for tp, entry in profile.get("tp", {}).items():
        if entry.get("prefill") and entry.get("decode"):
            perf.measured[int(tp)] = fit_step_model(int(tp), entry["prefill"], entry["decode"])
    codec = profile.get("codec", {})

    def rates(what: str) -> dict[str, float]:
        # the marginal rate where the profile split off a fixed part, else the sampled rate
        return {k: v.get(f"{what}_marginal_bytes_per_s") or v[f"{what}_bytes_per_s"]
                for k, v in codec.items() if v.get(f"{what}_bytes_per_s")}
    perf.transfer = TransferModel(
        kv_token, model.num_layers, dtype_bits,
        bits_per_element={k: v["bits_per_element"] for k, v in codec.items() if v.get("bits_per_element")},
        encode_bytes_per_s=rates("encode"), decode_bytes_per_s=rates("decode"),
        encode_per_layer_s={k: v["encode_per_layer_s"] for k, v in codec.items() if "encode_per_layer_s" in v},
        decode_per_layer_s={k: v["decode_per_layer_s"] for k, v in codec.items() if "decode_per_layer_s" in v},
        encode_per_run_s={k: v["encode_per_run_s"] for k, v in codec.items() if "encode_per_run_s" in v},
        decode_per_run_s={k: v["decode_per_run_s"] for k, v in codec.items() if "decode_per_run_s" in v},
        copy_bytes_per_s=profile.get("copy_bytes_per_s"),
        codec_on_device=any(v.get("device") == "cuda" for v in codec.values()))
    tcp = profile.get("links", {}).get("tcp")
    if tcp:
        perf.tcp = LinkModel("tcp", float(tcp["bytes_per_s"]), float(tcp.get("per_layer_s", 0.0)),
                             float(tcp.get("latency_s", 0.0)), float(tcp.get("per_run_s", 0.0)))
    served = (profile.get("serving_overhead") or {}).get("kv_transfer")
    if served and tcp:
        perf.tcp = calibrate_link(perf.tcp, perf.transfer, served, perf.notes)
    if profile.get("colocation"):
        perf.sharing = CoreSharing.from_json(profile["colocation"])
    serving = profile.get("serving_overhead")
    if serving:
        perf.overhead_s = {"prefill": float(serving["prefill_s"]), "decode": float(serving["decode_s"]),
                           "decode_per_seq": float(serving.get("decode_per_seq_s", 0.0)),
                           "decode_admission": float(serving.get("decode_admission_s", 0.0))}
    perf.notes.extend(profile.get("notes", []))
    return perf


def calibrate_link(link: LinkModel, transfer: TransferModel, served: dict[str, float], notes: list[str]) -> LinkModel:
    """The probed channel, slowed to what a request's transfer took inside the running cluster
    (serving_overhead.kv_transfer) where that was slower: the isolated probe does not see the
    busy instance around the channel. The wire rate and the per-message costs scale alike."""
    tokens = served["raw_bytes"] / transfer.kv_bytes_per_token
    modeled = transfer.total_time(int(round(tokens)), "raw", link)
    factor = served["served_s"] / modeled if modeled > 0 else 1.0
    if factor <= 1.05:
        return link
    notes.append(f"KV channel slowed x{factor:.2f}: a {tokens:.0f}-token transfer took {served['served_s'] * 1e3:.0f} ms "
                 f"in the running cluster vs {modeled * 1e3:.0f} ms modeled from the probe")
    return LinkModel(link.name, link.bytes_per_s / factor, link.per_layer_s * factor, link.latency_s,
                     link.per_run_s * factor)
