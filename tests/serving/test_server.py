"""`splitserve serve deploy/local.yaml` on CPU, talked to by the `openai` client and by a raw
HTTP client: greedy outputs equal `splitserve generate`, bad bodies get 400 naming the field,
a client that goes away mid-request leaves no KV held, and overload answers 429 with a retry
hint while every request still completes."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from benchmarks.workloads import load_workload
from engine.weights import ModelSource
from splitserve.cli import main as splitserve_main
from tests.serving.conftest import HOST, is_idle

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Short real ShareGPT prompts."""
    tokenizer = ModelSource(MODEL).tokenizer()
    return [it.prompt for it in load_workload("sharegpt", 4, tokenizer, seed=3, max_prompt_tokens=48)]


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def splitserve_generate(capsys: pytest.CaptureFixture[str], prompt: str, *flags: str) -> str:
    """What `splitserve generate deploy/local.yaml` prints (instances in this process)."""
    capsys.readouterr()
    rc = splitserve_main(["generate", "deploy/local.yaml", "--prompt", prompt, "--max-tokens", str(MAX_TOKENS),
                          "--in-process", *flags])
    out = capsys.readouterr().out
    assert rc == 0 and out.endswith("\n"), out
    return out[:-1]


def test_health_and_models(server, client):
    assert server.get("/health")["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_outputs_equal_splitserve_generate(server, client, prompts, capsys):
    prompt = prompts[0]
    tokenizer = ModelSource(MODEL).tokenizer()
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == splitserve_generate(capsys, prompt)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= MAX_TOKENS
    # /v1/completions on the chat template's token ids gives the same tokens, so the same text
    templated = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                               add_generation_prompt=True, tokenize=False))
    by_ids = client.completions.create(model=MODEL, prompt=templated, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.choices[0].text == chat.choices[0].message.content
    assert by_ids.usage.prompt_tokens == chat.usage.prompt_tokens == len(templated)
    # and a text prompt is tokenized as `splitserve generate --raw` does
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    raw_ids = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompt), max_tokens=MAX_TOKENS,
                                        temperature=0)
    assert text.choices[0].text == raw_ids.choices[0].text and text.usage == raw_ids.usage


def test_streaming_equals_non_streaming(server, client, prompts):
    for prompt in prompts[1:3]:
        messages = [{"role": "user", "content": prompt}]
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(deltas) == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True)
    whole_text = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=MAX_TOKENS, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == whole_text.choices[0].text


def test_stop_string_is_cut(server, client, prompts):
    full = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=MAX_TOKENS, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("/v1/completions", b"{not json", 400, "body"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": 7}, 400, "stop"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
]


def test_bad_requests_get_400_naming_the_field(server):
    before = server.get("/metrics")["requests_by_status"].get("invalid", 0)
    for path, body, status, param in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, _, reply = server.request("POST", path, raw=raw)
        assert got == status, (body, got, reply)
        assert reply["error"]["param"] == param and param.split(".")[0] in reply["error"]["message"], (body, reply)
    assert server.get("/metrics")["requests_by_status"]["invalid"] - before == len(BAD_REQUESTS)
    assert all(is_idle(s) for s in server.get("/instances").values())


def _open_request(server, path: str, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((HOST, server.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_frees_kv_on_both_pools(server, prompts, stream):
    before = server.get("/metrics")
    body = {"model": MODEL, "prompt": prompts[2], "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    sock = _open_request(server, "/v1/completions", body)
    if stream:   # read until the first token arrives, then hang up
        seen = b""
        while seen.count(b"data: ") < 2:
            chunk = sock.recv(4096)
            assert chunk, seen
            seen += chunk
        assert b" 200 " in seen.split(b"\r\n")[0]
    else:        # hang up once the request is decoding
        deadline = time.monotonic() + 30
        while server.get("/metrics")["queue_depth"].get("decode", 0) == 0:
            assert time.monotonic() < deadline, "the request never reached the decode pool"
            time.sleep(0.1)
    sock.close()
    stats = server.wait_idle(timeout_s=30)
    assert stats and all(is_idle(s) for s in stats.values()), stats
    after = server.get("/metrics")
    assert after["requests_by_status"].get("aborted", 0) == before["requests_by_status"].get("aborted", 0) + 1
    generated = after["tokens"]["completion"] - before["tokens"].get("completion", 0)
    assert 1 <= generated < 400, generated   # it stopped early: the abort reached the decode instance
    assert {s["role"] for s in stats.values()} == {"prefill", "decode"}


def test_load_under_overload_answers_429_and_loses_nothing(server):
    """12 clients at once against 4 admission slots; throttled clients retry after the hint."""
    num_clients, max_tokens = 12, 8
    before = server.get("/metrics")
    start = threading.Barrier(num_clients, timeout=30)
    body = {"model": MODEL, "prompt": "Tell me about the sea.", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}

    def one_client(i: int) -> tuple[int, list[int]]:
        start.wait()
        throttled: list[int] = []
        for _ in range(40):
            status, headers, reply = server.request("POST", "/v1/completions", body, timeout=120)
            if status == 200:
                assert reply["usage"]["completion_tokens"] == max_tokens, reply
                return status, throttled
            assert status in (429, 503), (status, reply)
            assert int(headers["retry-after"]) >= 1 and reply["error"]["type"], (headers, reply)
            throttled.append(status)
            time.sleep(random.Random(i).uniform(0.2, 0.6))  # shorter than the hint, to keep the test quick
        return status, throttled

    t0 = time.monotonic()
    with ThreadPoolExecutor(num_clients) as pool:
        results = list(pool.map(one_client, range(num_clients), timeout=150))
    elapsed = time.monotonic() - t0
    assert [s for s, _ in results] == [200] * num_clients, results   # no request lost
    num_throttled = sum(len(t) for _, t in results)
    assert num_throttled > 0, "12 clients never exceeded 4 slots"
    after = server.get("/metrics")
    delta = {k: after["requests_by_status"].get(k, 0) - before["requests_by_status"].get(k, 0)
             for k in ("ok", "rejected", "failed", "aborted")}
    assert delta == {"ok": num_clients, "rejected": num_throttled, "failed": 0, "aborted": 0}, delta
    assert after["latency"]["ttft_s"]["count"] - before["latency"]["ttft_s"]["count"] == num_clients
    assert after["latency"]["tpot_s"]["p50"] > 0 and after["latency"]["kv_transfer_s"]["count"] > 0
    link = after["kv_bytes"]["prefill-0->decode-0"]
    assert link["raw"] > before["kv_bytes"].get("prefill-0->decode-0", {}).get("raw", 0) and link["wire"] > 0
    assert after["kv_codec"] == {"prefill-0->decode-0": "raw"}
    assert set(after["kv_blocks"]) == {"prefill-0", "decode-0"}
    stats = server.wait_idle(timeout_s=30)
    assert all(is_idle(s) for s in stats.values()), stats
    print(f"load: {num_clients} requests, {num_throttled} throttled, {elapsed:.1f} s")


def test_rays_prometheus_endpoint_exports_the_same_counts(server):
    """Ray's exporter flushes every few seconds: poll it (bounded) until it caught up."""
    import urllib.request

    want = server.get("/metrics")["requests_by_status"]["ok"]
    pattern = re.compile(r'^ray_splitserve_requests_total\{[^}]*status="ok"[^}]*\} ([0-9.e+]+)$', re.M)
    deadline, seen = time.monotonic() + 40, None
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://{HOST}:{server.metrics_port}/metrics", timeout=10).read().decode()
        seen = sum(float(v) for v in pattern.findall(text))
        if seen >= want:
            break
        time.sleep(2)
    assert seen == want, (seen, want)
    for name in ("ttft_s_count", "tpot_s_count", "kv_transfer_s_count", "kv_bytes_total", "kv_blocks",
                 "queue_depth", "kv_codec"):
        assert f"ray_splitserve_{name}" in text, name
