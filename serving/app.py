"""The OpenAI-compatible server: one Ray Serve deployment, FastAPI ingress, owning a Cluster.

    POST /v1/completions         prompt (text or token ids) -> text; `stream: true` for SSE
    POST /v1/chat/completions    messages -> the chat template -> text; `stream: true` for SSE
    GET  /v1/models              the one model served
    GET  /health                 200 while both pools have a live instance, else 503
    GET  /metrics                JSON: request counts by status, latencies, queues, KV blocks and bytes
    GET  /instances              each instance's own stats (blocks, queues, handoffs, reservations)

A request's life in the replica: validate (400 naming the field) -> admit (429 at capacity,
503 without a live pool; both with Retry-After) -> submit to the poll thread -> read its
events -> answer. A handler that ends early (the client went away: Serve cancels it) aborts
the request, which frees its KV on the prefill and the decode instance.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from cluster.cluster import Cluster
from cluster.config import ClusterConfig, load_cluster_config
from engine.request import SamplingParams
from serving.cluster_client import ClusterClient
from serving.detokenize import Detokenizer
from serving.metrics import ServerMetrics
from serving.protocol import (APIError, ChatBody, CompletionBody, completion_response, parse_body,
                              sse, stream_chunk, usage)

CHAT_DEFAULT_MAX_TOKENS = 512   # chat requests without max_tokens: up to this, within the context
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class ServeOptions:
    model_name: str | None = None    # the id clients send as `model`; default: the config's model.name
    max_inflight: int | None = None  # requests admitted at once; default: 2x the decode pools' batch slots
    max_queued: int = 64             # Serve's own queue in front of the replica (503 beyond it)
    retry_after_s: float = 1.0

    def inflight_limit(self, config: ClusterConfig) -> int:
        if self.max_inflight is not None:
            return self.max_inflight
        pools = [config.decode] if config.mode == "disagg" else [config.prefill, config.decode]
        return max(1, 2 * sum(p.instances * p.max_batch_size for p in pools))


api = FastAPI(title="splitserve", description="OpenAI-compatible API over disaggregated prefill/decode pools")


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, config: ClusterConfig, options: ServeOptions) -> None:
        self.config = config
        self.model_name = options.model_name or config.model.name
        self.tokenizer = config.model.source.tokenizer()   # None for dummy weights: token ids in and out
        self.metrics = ServerMetrics(use_ray=True)
        # Cluster.start joins the Ray this replica runs in; the instance actors are owned by (and die with) it.
        self.client = ClusterClient(Cluster.start(config), self.metrics, options.inflight_limit(config),
                                    options.retry_after_s)

    def check_health(self) -> None:
        if not self.client.healthy:
            raise RuntimeError("no live prefill or decode instance")

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    # ---- endpoints ---------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> Response:
        ok = self.client.healthy
        return JSONResponse({"status": "ok" if ok else "unavailable", "inflight": self.client.num_inflight},
                            status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "splitserve", "max_model_len": self.client.max_context}]}

    @api.get("/metrics")
    async def metrics_json(self) -> dict[str, Any]:
        return {**self.metrics.snapshot(), "inflight": self.client.num_inflight,
                "max_inflight": self.client.max_inflight}

    @api.get("/instances")
    async def instances(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.instance_stats)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle("completions", request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle("chat", request, chat=True)

    # ---- one request -------------------------------------------------------------------------------

    async def _handle(self, endpoint: str, request: Request, chat: bool) -> Response:
        try:
            body = parse_body(ChatBody if chat else CompletionBody, await request.body())
            if body.model is not None and body.model != self.model_name:
                raise APIError(404, f"model: {body.model!r} is not served here; use {self.model_name!r}",
                               "model", "model_not_found")
            prompt_ids = self._prompt_ids(body, chat)
            params = self._params(body, len(prompt_ids), chat)
            rid, events = self.client.submit(prompt_ids, params)
        except APIError as exc:
            self.metrics.request(endpoint, "invalid" if exc.status in (400, 404) else "rejected")
            raise
        detok = Detokenizer(self.tokenizer, params.stop)
        if body.stream:
            return StreamingResponse(self._stream(endpoint, rid, events, detok, len(prompt_ids), chat,
                                                  body.include_usage), media_type="text/event-stream")
        return await self._complete(endpoint, rid, events, detok, len(prompt_ids), chat)

    def _prompt_ids(self, body: Any, chat: bool) -> list[int]:
        if chat:
            if self.tokenizer is None or self.tokenizer.chat_template is None:
                raise APIError(400, "messages: this model has no chat template (dummy weights?); "
                               "send token ids to /v1/completions", "messages")
            messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer.encode(text)   # as `splitserve generate` does
        elif isinstance(body.prompt, list):
            vocab = self.config.model.source.model_config().vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
            ids = list(body.prompt)
        else:
            if self.tokenizer is None:
                raise APIError(400, "prompt: this model has no tokenizer (dummy weights); send token ids", "prompt")
            ids = self.tokenizer.encode(body.prompt)
        if not ids:
            raise APIError(400, f"{'messages' if chat else 'prompt'}: is empty", "messages" if chat else "prompt")
        return ids

    def _params(self, body: Any, num_prompt: int, chat: bool) -> SamplingParams:
        room = self.client.max_context - num_prompt
        field = "messages" if chat else "prompt"
        if room < 1:
            raise APIError(400, f"{field}: {num_prompt} tokens leave no room in the {self.client.max_context}-token "
                           "context", field)
        asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        default = min(room, CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        params = body.sampling_params(default)
        if asked is not None and num_prompt + asked > self.client.max_context:
            name = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{name}: {num_prompt} prompt tokens + {asked} exceed the "
                           f"{self.client.max_context}-token context; ask for at most {room}", name)
        return params

    async def _events(self, rid: str, events: asyncio.Queue[dict[str, Any]],
                      detok: Detokenizer) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason or None) as the request runs; raises APIError if it fails."""
        while True:
            e = await events.get()
            kind = e["kind"]
            if kind == "token":
                delta = detok.add(e["token"])
                if detok.stopped:   # a stop string: cut here even if the engine has not seen it yet
                    self.client.abort(rid)
                    yield delta, "stop"
                    return
                if delta:
                    yield delta, None
            elif kind == "finished":
                yield detok.flush(), "stop" if e.get("reason") == "stop" else "length"
                return
            elif kind in ("failed", "aborted"):
                reason = e.get("reason") or kind
                status = 503 if "no live instance" in reason else 500
                raise APIError(status, f"request {kind}: {reason}", None, "server_error",
                               self.client.retry_after_s if status == 503 else None)

    async def _complete(self, endpoint: str, rid: str, events: asyncio.Queue[dict[str, Any]], detok: Detokenizer,
                        num_prompt: int, chat: bool) -> Response:
        status = "aborted"   # if this handler is cancelled (client gone), the finally block aborts
        try:
            finish: str | None = None
            async for _, finish in self._events(rid, events, detok):
                pass
            status = "ok"
            return JSONResponse(completion_response(rid, self.model_name, detok.text, finish, num_prompt,
                                                    len(detok.tokens), chat))
        except APIError:
            status = "failed"
            raise
        finally:
            if status == "aborted":
                self.client.abort(rid)
            self.metrics.request(endpoint, status)

    async def _stream(self, endpoint: str, rid: str, events: asyncio.Queue[dict[str, Any]], detok: Detokenizer,
                      num_prompt: int, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        status = "aborted"
        try:
            if chat:
                yield sse(stream_chunk(rid, self.model_name, "", None, chat, first=True))
            try:
                async for delta, finish in self._events(rid, events, detok):
                    yield sse(stream_chunk(rid, self.model_name, delta, finish, chat))
            except APIError as exc:
                status = "failed"
                yield sse(exc.body())
                return
            if include_usage:
                yield sse(stream_chunk(rid, self.model_name, None, None, chat,
                                        usage_=usage(num_prompt, len(detok.tokens))))
            yield "data: [DONE]\n\n"
            status = "ok"
        finally:
            if status == "aborted":
                self.client.abort(rid)
            self.metrics.request(endpoint, status)


def build_app(config: ClusterConfig, options: ServeOptions = ServeOptions()) -> serve.Application:
    """The Serve application for a cluster config (pure: starts nothing)."""
    limit = options.inflight_limit(config)
    # Serve admits a few more than our limit so that over-limit requests reach the replica and get
    # a 429 with Retry-After; beyond `max_queued` more, Serve itself answers 503.
    return OpenAIServer.options(max_ongoing_requests=limit + 16, max_queued_requests=options.max_queued).bind(
        config, options)


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run serving.app:app_builder config=deploy/local.yaml` and RayService's import_path."""
    known = {"config", "model_name", "max_inflight", "retry_after_s"}
    unknown = set(args) - known
    if unknown or "config" not in args:
        raise ValueError(f"app args: need config=PATH; known: {sorted(known)}; got unknown {sorted(unknown)}")
    options = ServeOptions(model_name=args.get("model_name"),
                           max_inflight=int(args["max_inflight"]) if "max_inflight" in args else None,
                           retry_after_s=float(args.get("retry_after_s", 1.0)))
    return build_app(load_cluster_config(args["config"]), options)


__all__ = ["OpenAIServer", "ServeOptions", "build_app", "app_builder"]
