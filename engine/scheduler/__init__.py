"""Pure-Python schedulers; the runtime and the planner's simulator share them."""

from engine.scheduler.base import ScheduledBatch, ScheduledSeq, Scheduler, SchedulerConfig
from engine.scheduler.policies import (SCHEDULERS, ChunkedPrefillScheduler, ContinuousBatchingScheduler,
                                       DecodeOnlyScheduler, PrefillOnlyScheduler)

__all__ = ["ScheduledBatch", "ScheduledSeq", "Scheduler", "SchedulerConfig", "SCHEDULERS",
           "ChunkedPrefillScheduler", "ContinuousBatchingScheduler", "DecodeOnlyScheduler",
           "PrefillOnlyScheduler"]
