"""Request validation and streamed detokenization, without a server."""

from __future__ import annotations

import json

import pytest

from engine.weights import ModelSource
from serving.detokenize import Detokenizer
from serving.protocol import APIError, ChatBody, CompletionBody, parse_body


def _error(cls, body) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse_body(cls, raw)
    return info.value


@pytest.mark.parametrize("body, param", [
    (b"", "body"), (b"{", "body"), ({}, "prompt"), ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"), ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_k": -1}, "top_k"), ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "stop": ["a", 1]}, "stop"), ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"), ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "stream": 1}, "stream"), ({"prompt": []}, "prompt"),
])
def test_completion_errors_name_the_field(body, param):
    err = _error(CompletionBody, body)
    assert err.status == 400 and err.param == param and param.split(".")[0] in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_valid_body_becomes_sampling_params():
    ok = parse_body(CompletionBody, json.dumps({"prompt": "x", "stop": "\n", "temperature": 0, "seed": 3,
                                                "unknown_field": 1}).encode())
    params = ok.sampling_params(16)
    assert params.stop == ("\n",) and params.greedy and params.max_tokens == 16 and params.seed == 3


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"), ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_chat_errors_name_the_field(body, param):
    if param is None:   # content parts are checked when the text is read
        msg = parse_body(ChatBody, json.dumps(body).encode()).messages[0]
        with pytest.raises(APIError) as info:
            msg.text(0)
        assert info.value.param == "messages.0.content"
        return
    err = _error(ChatBody, body)
    assert err.status == 400 and err.param == param


def test_retry_hint_header():
    assert APIError(429, "busy", retry_after_s=0.2).headers() == {"Retry-After": "1"}
    assert APIError(400, "bad").headers() == {}


@pytest.fixture(scope="module")
def tokenizer():
    return ModelSource("smollm2-135m").tokenizer()


def test_streamed_text_concatenates_to_the_whole(tokenizer):
    text = "Ünïcödé, emoji 🚀🙂 and 中文字符 — all split across byte-level tokens."
    ids = tokenizer.encode(text)
    detok = Detokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer.encode("The answer is 42. END of the story")
    detok = Detokenizer(tokenizer, stop=("END",))
    streamed = ""
    for t in ids:
        streamed += detok.add(t)
        if detok.stopped:
            break
    streamed += detok.flush()
    assert streamed == "The answer is 42. " and detok.stopped


def test_dummy_weights_stream_token_ids():
    detok = Detokenizer(None)
    assert detok.add(5) == "5" and detok.add(17) == " 17"
