"""The FastAPI application: OpenAI-compatible endpoints over an `Engine`.

    app = create_app(ServerSettings(model_name="grok-1"))
    app.state.grok.ready(engine)   # /health answers 503 until then

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streamed as server-sent
events when `stream` is true), GET /v1/models, GET /health, GET /metrics. Errors are OpenAI's
`{"error": {...}}` bodies; an unexpected failure is logged to stderr and answered with a
generic 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..sampling_params import SamplingParams
from . import schemas
from .chat import DEFAULT_TEMPLATE, get_template
from .metrics import CONTENT_TYPE, ServerMetrics
from .scheduler import DoneOut, EngineClosed, QueueFull, Sequence, TokenOut
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("grokcli.server")

DEFAULT_MAX_BODY_BYTES = 2 * 2**20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions API's default


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer needs to know; the engine has its own EngineConfig."""

    model_name: str = "grok-1"  # the id clients pass as `model` (and /v1/models lists)
    api_key: str | None = None  # require `Authorization: Bearer <key>` on /v1/* when set
    chat_template: str = DEFAULT_TEMPLATE  # how chat messages become a prompt
    max_tokens: int | None = None  # the most tokens one choice may ask for (None: the context)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    retry_after_s: int = 1  # Retry-After on 503 when the queue is full

    def __post_init__(self) -> None:
        get_template(self.chat_template)  # ValueError for an unknown name
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


class ServerState:
    """The app's mutable state: the engine once it is ready, or why it is not."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.engine = None
        self.tokenizer = None
        self.failure: str | None = None  # loading failed: /health says so
        self.metrics = ServerMetrics(self)
        self.started = int(time.time())
        self.fingerprint = f"grokcli-{__version__}"

    def ready(self, engine) -> None:
        self.tokenizer = engine.tokenizer
        self.engine = engine

    def failed(self, message: str) -> None:
        self.failure = message


# ---------------------------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: reads a request body up to `limit` bytes (413 beyond) and hands it on."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                return await self._too_large(send)
            chunks.append(body)
            if not message.get("more_body"):
                break
        whole = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # later messages: the client's disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        body = json.dumps(error_body(f"request body too large (limit {self.limit} bytes)",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; `app.state.grok` is its ServerState (call `.ready(engine)` once loaded)."""
    settings = settings or ServerSettings()
    state = ServerState(settings)
    app = FastAPI(title="grokcli", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.grok = state
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(state, request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                    str(exc.detail))
        return _error_response(state, request, ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error_response(state, request, ApiError(500, "internal server error (logged on the server)"))

    @app.get("/health")
    async def health():
        if state.failure:
            return JSONResponse({"status": "error", "message": state.failure}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.engine.alive:
            return JSONResponse({"status": "error", "message": state.engine.error or "the engine stopped"},
                                status_code=503)
        return {"status": "ok", **state.engine.snapshot()}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(state, request)
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(state, request)
        req = schemas.parse(CompletionRequest, await _json(request))
        return await _complete(state, request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(state, request)
        req = schemas.parse(ChatCompletionRequest, await _json(request))
        return await _chat(state, request, req)

    return app


_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _error_response(state: ServerState, request: Request, exc: ApiError) -> JSONResponse:
    path = request.url.path
    endpoint = path if path in _ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
    state.metrics.requests.labels(endpoint, str(exc.status)).inc()  # a fixed label set, whatever the path
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _authorize(state: ServerState, request: Request) -> None:
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8")):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def _json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e).split(':')[0]})",
                       code="invalid_json") from None


def _model_card(state: ServerState) -> dict:
    engine = state.engine
    return {"id": state.settings.model_name, "object": "model", "created": state.started, "owned_by": "grokcli",
            "max_model_len": engine.context if engine is not None else None,
            "chat_template": state.settings.chat_template}


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.settings.model_name:
        raise ApiError(404, f"The model '{name}' does not exist: this server serves "
                            f"'{state.settings.model_name}' (GET /v1/models)", param="model",
                       code="model_not_found")


def _engine(state: ServerState):
    if state.failure:
        raise ApiError(503, f"the model could not be loaded: {state.failure}", code="model_unavailable")
    engine = state.engine
    if engine is None:
        raise ApiError(503, "the model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "5"})
    return engine


# ---------------------------------------------------------------------------------------------
# From a request to sequences for the engine.


def _sampling(state: ServerState, req, engine, prompt_len: int, max_tokens: int | None, default_max: int | None,
              logprobs: int, stop: tuple[str, ...], param: str) -> SamplingParams:
    context = engine.context
    if prompt_len + 1 > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, but the prompt is "
                            f"{prompt_len} tokens (plus at least 1 for the completion). Shorten the prompt.",
                       param=param, code="context_length_exceeded")
    limit = state.settings.max_tokens or context
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = min(default_max or room, room, limit)
    elif max_tokens > limit:
        raise ApiError(400, f"max_tokens is {max_tokens} but this server allows at most {limit}",
                       param="max_tokens", code="invalid_value")
    elif max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, but {prompt_len + max_tokens} "
                            f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion). "
                            "Shorten the prompt or lower max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    seed = secrets.randbits(32) if req.seed is None else req.seed & 0xFFFFFFFF
    return SamplingParams(
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else float(req.top_p),
        min_p=float(req.min_p or 0.0),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        seed=seed, max_tokens=max_tokens, stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs)


def _stops(req) -> tuple[str, ...]:
    stop = req.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > schemas.MAX_STOP:
        raise ApiError(400, f"at most {schemas.MAX_STOP} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", param="stop")
    return stops


def _unsupported(req) -> None:
    """400 for OpenAI parameters whose non-default values this server cannot honour."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)",
                           param=name, code="unsupported_parameter")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")


def _encode_prompts(state: ServerState, prompt) -> list[list[int]]:
    vocab = state.engine.cfg.vocab_size
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        ids = state.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, f"{where} is empty: give at least one token", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"{where} holds token id {bad}, outside the vocabulary (0..{vocab - 1})",
                           param="prompt")
        out.append(ids)
    return out


class _Run:
    """The sequences of one HTTP request and the queue their events arrive on."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, n: int):
        self.engine = engine
        self.loop = loop
        self.n = n  # choices per prompt
        self.prompt_tokens = 0  # counted once per prompt, as OpenAI counts them
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.done: dict[int, DoneOut] = {}

    def sink(self, index: int):
        def put(event):
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass
        return put

    def start(self, retry_after: int) -> None:
        try:
            self.engine.submit_many(self.seqs)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", code="server_busy",
                           headers={"Retry-After": str(retry_after)}) from None
        except EngineClosed as e:
            raise ApiError(503, f"the server is not taking requests: {e}", code="server_unavailable") from None

    async def events(self, request: Request | None) -> AsyncIterator[tuple[int, object]]:
        """(choice index, TokenOut | DoneOut) until every sequence is done; cancels them all if
        the consumer stops early or, when `request` is given, the client goes away (a streaming
        response is cancelled by Starlette itself when its client disconnects)."""
        try:
            while len(self.done) < len(self.seqs):
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if isinstance(event, DoneOut):
                    self.done[index] = event
                yield index, event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for i, seq in enumerate(self.seqs):
            if i not in self.done:
                self.engine.cancel(seq)


def _prepare(state: ServerState, req, prompts: list[list[int]], max_tokens, default_max,
             logprobs: int, stop: tuple[str, ...], param: str) -> _Run:
    engine = state.engine
    n = req.n or 1
    run = _Run(engine, asyncio.get_running_loop(), n)
    run.prompt_tokens = sum(len(ids) for ids in prompts)
    for p_index, ids in enumerate(prompts):
        params = _sampling(state, req, engine, len(ids), max_tokens, default_max, logprobs, stop, param)
        for j in range(n):
            index = p_index * n + j
            # Choice j samples as row j of `generate_batch([prompt] * n)` would (same seed).
            run.seqs.append(Sequence(ids, params, run.sink(index), tokenizer=engine.tokenizer, key_index=j))
    return run


def _finish_reason(done: DoneOut) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _usage(run: _Run) -> dict:
    prompt = run.prompt_tokens
    completion = sum(len(d.token_ids) for d in run.done.values())
    cached = sum(d.cached_tokens for d in run.done.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _check_failed(run: _Run) -> None:
    failed = [d for d in run.done.values() if d.finish_reason == "error"]
    if failed:
        raise ApiError(500, failed[0].error or "generation failed", code="generation_failed")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _streaming(state: ServerState, endpoint: str, body: AsyncIterator[str]) -> StreamingResponse:
    async def guarded():
        try:
            async for chunk in body:
                yield chunk
        except ApiError as e:  # an error after the response started: an error event, then [DONE]
            yield _sse(e.body())
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("unexpected error while streaming %s", endpoint)
            yield _sse(error_body("internal server error (logged on the server)", "server_error"))
        yield "data: [DONE]\n\n"

    state.metrics.requests.labels(endpoint, "200").inc()
    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------------
# /v1/completions


async def _complete(state: ServerState, request: Request, req: CompletionRequest):
    _check_model(state, req.model)
    _engine(state)  # 503 while loading
    _unsupported(req)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(400, "best_of must equal n (choices are not ranked)", param="best_of",
                       code="unsupported_parameter")
    if req.echo and req.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported (prompt log-probabilities are not computed)",
                       param="echo", code="unsupported_parameter")
    prompts = _encode_prompts(state, req.prompt)
    logprobs = req.logprobs or 0
    run = _prepare(state, req, prompts, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, logprobs,
                   _stops(req), "prompt")
    echo = {i: state.tokenizer.decode(prompts[i // run.n]) if req.echo else "" for i in range(len(run.seqs))}
    run.start(state.settings.retry_after_s)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.settings.model_name,
            "system_fingerprint": state.fingerprint}
    want_lp = req.logprobs is not None

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body():
            offsets = {i: len(echo[i]) for i in echo}
            started = set()
            async for index, event in run.events(None):
                text = ""
                if index not in started:
                    started.add(index)
                    text = echo[index]
                if isinstance(event, TokenOut):
                    if not (text or event.text or want_lp):
                        continue
                    choice = {"index": index, "text": text + event.text, "logprobs": None, "finish_reason": None}
                    if want_lp:
                        choice["logprobs"] = _completion_logprobs(state, [event], offsets[index] + len(text))
                    offsets[index] += len(text) + len(event.text)
                else:
                    if event.finish_reason == "error":
                        raise ApiError(500, event.error or "generation failed", code="generation_failed")
                    choice = {"index": index, "text": text + event.final_text, "logprobs": None,
                              "finish_reason": _finish_reason(event)}
                yield _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
            if len(run.done) == len(run.seqs) and include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(run)})

        return _streaming(state, "/v1/completions", body())

    tokens: dict[int, list[TokenOut]] = {i: [] for i in range(len(run.seqs))}
    async for index, event in run.events(request):
        if isinstance(event, TokenOut):
            tokens[index].append(event)
    if len(run.done) < len(run.seqs):
        return Response(status_code=499)  # the client left; nobody reads this
    _check_failed(run)
    choices = []
    for i in range(len(run.seqs)):
        done = run.done[i]
        choices.append({"index": i, "text": echo[i] + done.text, "finish_reason": _finish_reason(done),
                        "logprobs": _completion_logprobs(state, tokens[i], len(echo[i])) if want_lp else None})
    state.metrics.requests.labels("/v1/completions", "200").inc()
    return {**head, "choices": choices, "usage": _usage(run)}


def _completion_logprobs(state: ServerState, events: list[TokenOut], offset: int) -> dict:
    tok = state.tokenizer
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        out["tokens"].append(tok.token_text(e.token_id))
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({t.text: t.logprob for t in e.top_logprobs or ()})
        out["text_offset"].append(offset)
        offset += len(e.text)
    return out


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions


async def _chat(state: ServerState, request: Request, req: ChatCompletionRequest):
    _check_model(state, req.model)
    _engine(state)  # 503 while loading
    _unsupported(req)
    if req.tools:
        raise ApiError(400, "tools are not supported: Grok-1 is a base model without tool calling", param="tools",
                       code="unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "give max_completion_tokens or max_tokens, not both", param="max_tokens")
    template = get_template(state.settings.chat_template)
    prompt = template.render([(m.role, m.text()) for m in req.messages])
    ids = state.tokenizer.encode(prompt)
    stops = tuple(dict.fromkeys(_stops(req) + template.stop))
    logprobs = (req.top_logprobs or 0) if req.logprobs else 0
    # The engine returns the chosen token's logprob only alongside at least one alternative.
    run = _prepare(state, req, [ids], req.max_completion_tokens or req.max_tokens, None,
                   max(logprobs, 1) if req.logprobs else 0, stops, "messages")
    run.start(state.settings.retry_after_s)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": state.settings.model_name,
            "system_fingerprint": state.fingerprint, "chat_template": template.name}

    def lp_entries(events):
        return [_chat_logprob(state, e, logprobs) for e in events]

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        async def body():
            for i in range(len(run.seqs)):
                yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **extra})
            async for index, event in run.events(None):
                if isinstance(event, TokenOut):
                    if not (event.text or req.logprobs):
                        continue
                    choice = {"index": index, "delta": {"content": event.text}, "finish_reason": None,
                              "logprobs": {"content": lp_entries([event]), "refusal": None} if req.logprobs else None}
                else:
                    if event.finish_reason == "error":
                        raise ApiError(500, event.error or "generation failed", code="generation_failed")
                    delta = {"content": event.final_text} if event.final_text else {}
                    choice = {"index": index, "delta": delta, "logprobs": None,
                              "finish_reason": _finish_reason(event)}
                yield _sse({**chunk, "choices": [choice], **extra})
            if len(run.done) == len(run.seqs) and include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(run)})

        return _streaming(state, "/v1/chat/completions", body())

    tokens: dict[int, list[TokenOut]] = {i: [] for i in range(len(run.seqs))}
    async for index, event in run.events(request):
        if isinstance(event, TokenOut):
            tokens[index].append(event)
    if len(run.done) < len(run.seqs):
        return Response(status_code=499)
    _check_failed(run)
    choices = []
    for i in range(len(run.seqs)):
        done = run.done[i]
        choices.append({"index": i, "message": {"role": "assistant", "content": done.text},
                        "finish_reason": _finish_reason(done),
                        "logprobs": {"content": lp_entries(tokens[i]), "refusal": None} if req.logprobs else None})
    state.metrics.requests.labels("/v1/chat/completions", "200").inc()
    return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(run)}


def _chat_logprob(state: ServerState, e: TokenOut, top_n: int) -> dict:
    text = state.tokenizer.token_text(e.token_id)
    return {"token": text, "logprob": e.logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode("utf-8"))}
                             for t in (e.top_logprobs or ())[:top_n]]}
