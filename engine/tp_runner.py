"""Model runners for tensor-parallel instances.

`TPLeaderRunner` (rank 0) is a ModelRunner whose `prepare` first broadcasts the step, with
any control queued since the last one. `TPFollowerRunner` (ranks > 0) receives those
broadcasts and runs the same forward on its shard; it never samples.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from engine.attention import AttentionMetadata
from engine.model import ForwardContext
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch
from engine.tp_channel import StepChannel


class TPLeaderRunner(ModelRunner):
    def __init__(self, *args: Any, channel: StepChannel, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channel = channel
        self._control: dict[str, list[dict[str, Any]]] = {}

    def add_control(self, key: str, item: dict[str, Any]) -> None:
        self._control.setdefault(key, []).append(item)

    def _take_control(self) -> dict[str, Any]:
        control, self._control = self._control, {}
        return control

    def flush_control(self) -> None:
        """Send queued control now, without a step (e.g. a resend while idle)."""
        if self._control:
            self.channel.send(self._take_control(), None)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        step = super().prepare(batch)
        self.channel.send(self._take_control(), step)
        return step

    def admit_on_followers(self, request_id: str, block_ids: list[int]) -> list[int]:
        """Every other rank lands its staged heads of `request_id`; returns the ranks that could not."""
        self.channel.send({**self._take_control(), "admit": [{"id": request_id, "blocks": block_ids}]}, None)
        return gather_failures(self.channel, self.tp.size if self.tp else 1, failed=False)

    def shutdown_followers(self) -> None:
        self.channel.send({"shutdown": True}, None)


def gather_failures(channel: StepChannel, size: int, failed: bool) -> list[int]:
    """All ranks report whether their part failed; returns the failing ranks (same on all)."""
    flags = torch.zeros(size, dtype=torch.int64)
    flags[dist.get_rank(group=channel.group)] = int(failed)
    dist.all_reduce(flags, group=channel.group)
    return [r for r in range(size) if flags[r]]


class TPFollowerRunner(ModelRunner):
    """Ranks > 0: follow rank 0's broadcasts until told to shut down."""

    def __init__(self, *args: Any, channel: StepChannel, **kwargs: Any) -> None:
        kwargs.setdefault("tp", None)
        super().__init__(*args, **kwargs)
        self.channel = channel

    @torch.inference_mode()
    def follow(self, on_control: Callable[[dict[str, Any]], Callable[[int], None] | None],
               after_step: Callable[[dict[str, Any]], None]) -> None:
        """on_control(control) runs before each step and may return a per-layer callback;
        after_step(control) runs after the forward."""
        while True:
            control, step = self.channel.recv()
            if control.get("shutdown"):
                return
            on_layer_done = on_control(control)
            if step is not None:
                ids, positions, meta = step
                self.model(ids, positions, ForwardContext(meta, self.kv_cache, self.ops, on_layer_done))
            after_step(control)
