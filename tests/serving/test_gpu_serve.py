"""`splitserve serve deploy/gpu-1p1d.yaml` on two GPUs (dummy Llama-3-8B: token ids in, ids
out). Marked gpu; skipped without two CUDA devices."""

from __future__ import annotations

import pytest
import torch

from tests.serving.conftest import is_idle, start_server, stop_server

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory):
    proc, srv = start_server("deploy/gpu-1p1d.yaml", tmp_path_factory.mktemp("serve") / "serve.log")
    yield srv
    stop_server(proc)


def test_token_id_completions_on_two_gpus(gpu_server):
    prompt = list(range(1000, 1512))   # 512 tokens of a dummy model's vocabulary
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    status, _, first = gpu_server.request("POST", "/v1/completions", body)
    assert status == 200 and first["usage"] == {"prompt_tokens": 512, "completion_tokens": 16, "total_tokens": 528}
    ids = [int(t) for t in first["choices"][0]["text"].split()]
    assert len(ids) == 16
    _, _, again = gpu_server.request("POST", "/v1/completions", body)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]   # greedy is deterministic
    status, _, reply = gpu_server.request("POST", "/v1/chat/completions",
                                          {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and reply["error"]["param"] == "messages"   # dummy weights: no chat template
    metrics = gpu_server.get("/metrics")
    assert metrics["requests_by_status"]["ok"] == 2
    assert metrics["kv_bytes"]["prefill-0->decode-0"]["raw"] > 0
    assert all(is_idle(s) for s in gpu_server.wait_idle().values())
