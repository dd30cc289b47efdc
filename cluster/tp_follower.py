"""A tensor-parallel rank > 0 of an instance, as a Ray actor: holds its model shard and KV
heads, follows rank 0's step broadcasts, and moves its own KV heads directly to or from the
peer instances' ranks (prefill: streams them; decode: stages and lands them)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from cluster.config import ClusterConfig
from engine.tensor_parallel import kv_heads_of
from engine.tp_channel import init_tp
from engine.tp_runner import TPFollowerRunner, gather_failures
from kvtransfer.codec.format import dtype_name
from kvtransfer.receiver import KVReceiver
from kvtransfer.staging import StagingArea
from prefill_worker.streamer import KVStreamer
from decode_worker.worker import check_frame, scatter_heads


class TPFollower:
    def __init__(self, role: str, config: ClusterConfig, name: str, rank: int, size: int,
                 num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.role, self.config, self.name, self.rank, self.size = role, config, name, rank, size

    def setup(self, master: tuple[str, int], advertise_host: str | None = None) -> dict[str, Any]:
        config = self.config
        pool = config.prefill if self.role == "prefill" else config.decode
        source = config.model.source
        device = torch.device(config.device)
        group, channel = init_tp(self.rank, self.size, tuple(master), device)
        model_config = source.model_config()
        self.runner = TPFollowerRunner(model_config, config.engine_config(pool), source.state_dict(),
                                       tp=group, channel=channel)
        self.timeout_s = config.kv_transfer.timeout_s
        self.streamer: KVStreamer | None = None
        self.staging: StagingArea | None = None
        info: dict[str, Any] = {"name": f"{self.name}/rank{self.rank}", "rank": self.rank}
        if self.role == "prefill":
            self.streamer = KVStreamer(self.rank, self.size, model_config.num_kv_heads, self.runner.kv_cache,
                                       lambda *a: None, config.kv_transfer.link_gbps, self.timeout_s)
        else:
            if advertise_host is None:
                import ray
                advertise_host = ray.util.get_node_ip_address()
            self.staging = StagingArea(control=False, ttl_s=4 * self.timeout_s)
            heads = kv_heads_of(self.rank, self.size, model_config.num_kv_heads)
            self.receiver = KVReceiver(self.staging, heads, model_config.head_dim, dtype_name(self.runner.dtype),
                                       advertise_host=advertise_host, device=self.runner.device)
            info["address"] = self.receiver.address
        self._thread = threading.Thread(target=self._follow, name=f"{self.name}-rank{self.rank}", daemon=True)
        self._thread.start()
        return info

    def connect(self, peers: dict[str, dict[str, Any]]) -> None:
        if self.streamer is not None:
            self.streamer.connect(peers)

    def _follow(self) -> None:
        self.runner.follow(self._on_control, self._after_step)

    # ---- what rank 0 asks for ------------------------------------------------------------------

    def _on_control(self, control: dict[str, Any]):
        s = self.streamer
        if s is not None:
            for item in control.get("abort", []):
                s.abort(item["id"], item["decode"], item["reason"])
            for item in control.get("resend", []):
                s.begin(item["id"], item["decode"], None, item["num_tokens"], item["level"])
                for layer in range(self.runner.model_config.num_layers):
                    s.send_layer(item["id"], item["decode"], layer, item["blocks"], item["num_tokens"])
                s.done(item["id"], item["decode"], 0, {})
            stream = control.get("stream", [])
            for item in stream:
                s.begin(item["id"], item["decode"], None, item["num_tokens"], item["level"])
            if stream:
                return self._layer_sender(stream)
        for item in control.get("admit", []):
            self._admit(item["id"], item["blocks"])
        return None

    def _layer_sender(self, stream: list[dict[str, Any]]):
        s = self.streamer
        on_cuda = self.runner.device.type == "cuda"

        def on_layer_done(layer: int) -> None:
            ready = None
            if on_cuda:
                ready = torch.cuda.Event()
                ready.record()
            for item in stream:
                s.send_layer(item["id"], item["decode"], layer, item["blocks"], item["num_tokens"], ready)
        return on_layer_done

    def _after_step(self, control: dict[str, Any]) -> None:
        if self.streamer is not None:
            for item in control.get("stream", []):
                self.streamer.done(item["id"], item["decode"], 0, {})

    def _admit(self, request_id: str, block_ids: list[int]) -> None:
        assert self.staging is not None
        staged = self.staging.wait_complete(request_id, self.timeout_s)
        failed = staged is None
        if staged is not None:
            self.staging.pop(request_id)
            blocks = torch.tensor(block_ids, dtype=torch.int64, device=self.runner.device)
            try:
                for frame in staged.frames:
                    check_frame(frame, staged.num_tokens, self.runner.model_config)
                    scatter_heads(self.runner.kv_cache, frame, blocks)
            except (ValueError, RuntimeError):
                failed = True
        gather_failures(self.runner.channel, self.size, failed)

    def stats(self) -> dict[str, Any]:
        return {"staged": len(self.staging) if self.staging is not None else 0}

    def shutdown(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
        if self.staging is not None:
            self.receiver.close()
