import random

import pytest
import torch

from cluster.config import parse_cluster_config
from engine.presets import get_preset
from planner.latency import LinearFit, StepModel
from planner.perf import Perf
from planner.hardware import ACCELERATORS
from planner.workload import Workload
from planner.transfer import LinkModel, TransferModel


@pytest.fixture
def small_config():
    return parse_cluster_config({
        "model": {"name": "smollm2-135m"},
        "prefill": {"instances": 1, "kv_blocks": 1024, "max_batch_tokens": 1024, "chunk_size": 512},
        "decode": {"instances": 1, "kv_blocks": 1024, "max_batch_size": 32},
        "slo": {"ttft_s": 2.0, "tpot_s": 0.25, "attainment": 0.9}})


@pytest.fixture
def step_model():
    # prefill: 10 ms + 0.1 ms/token; decode: 20 ms + 2 ms per sequence
    return StepModel(1, LinearFit((0.01, 1e-4, 1e-8)), LinearFit((0.02, 1e-6, 2e-3)))


@pytest.fixture
def workload():
    rng = random.Random(0)
    return Workload([rng.randint(20, 600) for _ in range(300)], [rng.randint(5, 60) for _ in range(300)])


@pytest.fixture
def small_perf(step_model):
    model = get_preset("smollm2-135m")
    transfer = TransferModel(model.kv_bytes_per_token(torch.float32), model.num_layers, 32,
                             encode_bytes_per_s={"lossless": 4e8, "int8": 3e8, "default": 3e8, "aggressive": 3e8},
                             decode_bytes_per_s={"lossless": 4e8, "int8": 3e8, "default": 3e8, "aggressive": 3e8})
    perf = Perf(model, "float32", ACCELERATORS["cpu"], {1: step_model}, transfer, LinkModel("tcp", 2e9))
    return perf
