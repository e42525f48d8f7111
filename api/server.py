"""The OpenAI-compatible HTTP API over the studio's ModelManager: /v1/models, /v1/chat/completions,
/v1/completions (SSE streaming included), /health and /metrics (Prometheus text).

    app = build_api(manager, api_keys=["sk-..."], allow_origins=["*"], max_concurrent_requests=256)
    uvicorn.run(app, host="127.0.0.1", port=23333)

The API asks the manager for the current pipeline on every request, so the model the UI loads is the one it
serves. Admission is bounded: past `max_concurrent_requests` engine requests in flight (a request with n choices
counts n), a request gets 429 with Retry-After at once rather than waiting. A client that goes away aborts its
requests, which frees their KV blocks. This module imports fastapi and pydantic, never gradio.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware

from api.errors import APIError, error_body, install_error_handlers, sse_error
from api.metrics import APIMetrics, render_metrics
from api.schemas import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
)
from api.serving import (
    ChoiceResult,
    ClientDisconnected,
    Job,
    ModelUnloaded,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    generation_config,
    stream_choices,
)
from engine import ImageInputError, PromptTooLongError
from engine.llm_engine import EngineStoppedError
from engine.manager import ModelManager

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20  # a request body past this is refused with 413 before it is read
RETRY_AFTER_S = 1
PROTECTED_PREFIXES = ("/v1", "/metrics")  # what --api-keys guards; /health and the UI stay open
DONE = "data: [DONE]\n\n"
UNLOADED_MESSAGE = "the request was aborted: the model was unloaded or replaced, or the server is stopping; retry"
KNOWN_ROUTES = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"})


class _Admission:
    """Engine requests in flight through the API, bounded. The event loop is the only caller: no lock."""

    def __init__(self, limit: int, metrics: APIMetrics):
        self.limit, self.in_flight, self.metrics = limit, 0, metrics

    def check(self, weight: int) -> None:
        if weight > self.limit:
            raise APIError(400, f"this request needs {weight} concurrent generations (prompts x n) but the server "
                                f"allows {self.limit}; lower n or send fewer prompts", param="n")
        if self.in_flight + weight > self.limit:
            self.metrics.num_rejected += 1
            raise APIError(429, f"the server is busy: {self.in_flight} of {self.limit} concurrent requests are in "
                                f"flight; retry after {RETRY_AFTER_S} s", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def acquire(self, weight: int) -> Callable[[], None]:
        self.check(weight)
        self.in_flight += weight
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= weight

        return release


class _SSEResponse(StreamingResponse):
    """An event stream that always closes its body (aborting what the engine still runs) and releases its
    admission slot, however the response ends: finished, client gone, or server shutting down."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            except BaseException:  # noqa: BLE001 - already closed, or we are being cancelled
                pass
            self._release()


class _Guard:
    """Pure ASGI middleware on the API's paths: Bearer-key check, body-size cap, and status counts for /metrics.
    Pure ASGI (not BaseHTTPMiddleware) so streaming and disconnect detection pass through untouched."""

    def __init__(self, app, api_keys: list[str] | None, metrics: APIMetrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.api_keys = [k.encode() for k in api_keys or [] if k]

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        token = token.strip()
        return scheme.lower() == b"bearer" and any(hmac.compare_digest(token, key) for key in self.api_keys)

    async def __call__(self, scope, receive, send) -> None:
        path, root_path = scope.get("path", ""), scope.get("root_path", "")
        if root_path and path.startswith(root_path):  # behind a proxy prefix (--root-path): path includes it
            path = path[len(root_path):]
        is_api = path == "/health" or any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)
        if scope["type"] != "http" or not is_api:
            await self.app(scope, receive, send)
            return
        route = path if path in KNOWN_ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        status_box = [0]

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            rejection = self._check(scope, path)
            if rejection is not None:
                await rejection(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests[(route, status_box[0] or 500)] += 1

    def _check(self, scope, path: str) -> Response | None:
        headers = dict(scope.get("headers") or [])
        if self.api_keys and path != "/health" and scope["method"] != "OPTIONS" and not self._authorized(headers):
            body = error_body(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
            return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return JSONResponse(error_body(400, "invalid Content-Length header"), status_code=400)
            if too_big:
                return JSONResponse(error_body(413, f"request body over {self.max_body_bytes} bytes"), status_code=413)
        return None


class _API:
    """The routes' shared state and logic."""

    def __init__(self, manager: ModelManager, served_model_name: str | None, max_concurrent_requests: int):
        self.manager = manager
        self.served_model_name = served_model_name
        self.metrics = APIMetrics()
        self.started = int(time.time())
        self.admission = _Admission(max_concurrent_requests, self.metrics)
        self._texts: dict[int, TokenTexts] = {}

    # ---- model --------------------------------------------------------------------------------------------
    def public_name(self) -> str | None:
        current = self.manager.current
        if current is None:
            return None
        return self.served_model_name or current.name

    def resolve(self, requested: str | None):
        """The pipeline serving `requested` and the name to answer with; 503 with nothing loaded, 404 for another."""
        current = self.manager.current
        if current is None:
            raise APIError(503, "no model is loaded: load one in the UI's Model tab or pass MODEL to app.py",
                           code="model_not_loaded")
        names = {current.name, str(current.path), self.served_model_name} - {None}
        if requested is not None and requested not in names:
            raise APIError(404, f"the model '{requested}' does not exist: this server serves '{self.public_name()}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        return current.pipeline, self.public_name()

    def is_current(self, pipe) -> Callable[[], bool]:
        return lambda: self.manager.current is not None and self.manager.current.pipeline is pipe

    def token_texts(self, pipe) -> TokenTexts:
        key = id(pipe.tokenizer)
        texts = self._texts.get(key)
        if texts is None or texts.tokenizer is not pipe.tokenizer:
            self._texts = {key: (texts := TokenTexts(pipe.tokenizer))}
        return texts

    # ---- prompts ------------------------------------------------------------------------------------------
    @staticmethod
    async def encode(pipe, prompt, apply_chat_template: bool, param: str) -> list[int]:
        try:
            return await asyncio.to_thread(pipe.encode, prompt, apply_chat_template)
        except ImageInputError as e:
            raise APIError(400, str(e), param=param, code="image_input_not_supported") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e
        except Exception as e:
            if type(e).__module__.startswith("jinja2"):  # the model's chat template refused the conversation
                raise APIError(400, f"the chat template rejected the messages: {e}", param=param) from e
            raise

    @staticmethod
    def check_prompt(pipe, ids: list[int], param: str) -> None:
        try:
            pipe.check_prompt(ids)  # before the stream starts: a 200 must not turn into an error later
        except PromptTooLongError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e

    @staticmethod
    def max_new_tokens(pipe, requested: int | None, num_prompt_tokens: int) -> int:
        """Up to what fits in session_len; a larger request is clamped (it then finishes with 'length')."""
        room = pipe.session_len - num_prompt_tokens
        return room if requested is None else max(1, min(requested, room))

    @staticmethod
    def make_jobs(req, prompts: list[tuple[list[int], str | list[dict] | None]], max_new: list[int],
                  logprobs: int | None, request_id: str) -> list[Job]:
        n = req.n or 1
        jobs = []
        for p, (ids, raw_prompt) in enumerate(prompts):
            for j in range(n):
                index = p * n + j
                try:
                    gen_config = generation_config(req, max_new[p], index, logprobs)
                except ValueError as e:
                    raise APIError(400, str(e)) from e
                jobs.append(Job(index, p, ids, gen_config, f"{request_id}-{index}", raw_prompt))
        return jobs

    # ---- running ------------------------------------------------------------------------------------------
    async def collect(self, request: Request, pipe, jobs: list[Job]) -> list[ChoiceResult] | None:
        """Run the jobs to the end; None when the client went away first (its requests are then aborted)."""
        results = [ChoiceResult() for _ in jobs]
        try:
            async with aclosing(stream_choices(pipe, jobs, request.is_disconnected, self.is_current(pipe))) as events:
                async for job, out in events:
                    results[job.index].add(out)
        except ClientDisconnected:
            self.metrics.num_client_disconnects += 1
            return None
        except Exception as e:
            raise _engine_error(e) from e
        for result in results:
            if result.finish_reason == "error":
                raise APIError(500, f"the engine failed on this request: {result.error}", code="engine_error")
            if result.finish_reason not in ("stop", "length"):
                raise APIError(503, UNLOADED_MESSAGE, code="model_unloaded")
        return results

    async def run(self, request: Request, pipe, jobs: list[Job], stream: bool,
                  respond: Callable, stream_body: Callable) -> Response:
        release = self.admission.acquire(len(jobs))
        if stream:
            try:
                return _SSEResponse(self._guarded_stream(stream_body(request, pipe, jobs)), release)
            except BaseException:
                release()
                raise
        try:
            results = await self.collect(request, pipe, jobs)
        finally:
            release()
        if results is None:
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        return respond(results)

    async def _guarded_stream(self, body: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's 200 is already sent when a failure happens: send it as an error event, then [DONE].
        A stream cut short (client gone: cancelled by starlette, or noticed by polling) counts as a disconnect."""
        answered = False
        try:
            async with aclosing(body) as chunks:
                async for chunk in chunks:
                    yield chunk
            answered = True
        except ClientDisconnected:
            return
        except Exception as e:  # noqa: BLE001 - reported to the client in the stream
            answered = True
            err = _engine_error(e)
            yield sse_error(err.status, err.message, err.code)
            yield DONE
        finally:
            if not answered:
                self.metrics.num_client_disconnects += 1

    @staticmethod
    def usage(results: list[ChoiceResult], jobs: list[Job]) -> UsageInfo:
        prompt_tokens = {job.prompt_index: result.num_prompt_tokens for job, result in zip(jobs, results)}
        prompt = sum(prompt_tokens.values())
        completion = sum(r.num_generated_tokens for r in results)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, EngineStoppedError | ModelUnloaded):
        return APIError(503, UNLOADED_MESSAGE, code="model_unloaded")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    log.error("request failed in the engine", exc_info=e)
    return APIError(500, f"the engine failed on this request ({type(e).__name__}: {e})", code="engine_error")


def _finish(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


# ---- routes ---------------------------------------------------------------------------------------------------
def _chat_routes(api: _API, router: APIRouter) -> None:
    @router.post("/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        pipe, model = api.resolve(body.model)
        _refuse_unsupported_chat(body)
        api.admission.check(body.n or 1)  # refuse untimely requests before tokenizing them
        messages = []
        has_images = False
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                has_images |= any(part.type == "image_url" for part in content)
                content = [part.model_dump(exclude_none=True) for part in content]
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        ids = await api.encode(pipe, messages, True, "messages")
        api.check_prompt(pipe, ids, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_new = api.max_new_tokens(pipe, body.max_completion_tokens or body.max_tokens, len(ids))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = api.make_jobs(body, [(ids, messages if has_images else None)], [max_new], logprobs, request_id)
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        texts = api.token_texts(pipe)

        def respond(results: list[ChoiceResult]) -> ChatCompletionResponse:
            choices = [
                ChatCompletionChoice(
                    index=job.index,
                    message=ChatResponseMessage(content=r.text),
                    logprobs=ChatChoiceLogprobs(content=chat_logprobs(r.logprobs, texts)) if logprobs is not None
                    else None,
                    finish_reason=_finish(r.finish_reason),
                )
                for job, r in zip(jobs, results)
            ]
            return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                          usage=api.usage(results, jobs))

        def chunk(choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None) -> str:
            data = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
            return f"data: {data.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"

        async def stream_body(request: Request, pipe, jobs: list[Job]) -> AsyncIterator[str]:
            for job in jobs:
                yield chunk([ChatCompletionChunkChoice(index=job.index, delta=DeltaMessage(role="assistant",
                                                                                            content=""))])
            results = [ChoiceResult() for _ in jobs]
            async with aclosing(stream_choices(pipe, jobs, request.is_disconnected, api.is_current(pipe))) as events:
                async for job, out in events:
                    results[job.index].add(out)
                    if out.text or out.token_ids or (logprobs is not None and out.logprobs):
                        lp = ChatChoiceLogprobs(content=chat_logprobs(out.logprobs, texts)) if logprobs is not None \
                            else None
                        yield chunk([ChatCompletionChunkChoice(index=job.index, delta=DeltaMessage(content=out.text),
                                                               logprobs=lp)])
                    if out.finished:
                        _raise_unfinished(out)
                        yield chunk([ChatCompletionChunkChoice(index=job.index, delta=DeltaMessage(),
                                                               finish_reason=_finish(out.finish_reason))])
            if include_usage:
                yield chunk([], api.usage(results, jobs))
            yield DONE

        return await api.run(request, pipe, jobs, bool(body.stream), respond, stream_body)


def _completion_routes(api: _API, router: APIRouter) -> None:
    @router.post("/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request):
        pipe, model = api.resolve(body.model)
        n = body.n or 1
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if body.best_of is not None and body.best_of != n:
            raise APIError(400, "best_of must equal n: this server does not rank candidates", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not computed)", param="echo")
        raw = body.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif isinstance(raw[0], int):
            raw = [raw]
        api.admission.check(len(raw) * n)  # refuse oversized or untimely batches before tokenizing them
        prompts: list[tuple[list[int], str]] = []
        for p in raw:
            ids = await api.encode(pipe, p, False, "prompt") if isinstance(p, str) else list(p)
            api.check_prompt(pipe, ids, "prompt")
            text = p if isinstance(p, str) else ""
            prompts.append((ids, text))
        echo_texts = [_echo_text(pipe, ids, text) if body.echo else "" for ids, text in prompts]
        max_new = [api.max_new_tokens(pipe, body.max_tokens, len(ids)) for ids, _ in prompts]
        logprobs = body.logprobs
        request_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = api.make_jobs(body, [(ids, None) for ids, _ in prompts], max_new, logprobs, request_id)
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        texts = api.token_texts(pipe)

        def respond(results: list[ChoiceResult]) -> CompletionResponse:
            choices = []
            for job, r in zip(jobs, results):
                echo = echo_texts[job.prompt_index]
                lp = completion_logprobs(r.logprobs, texts, len(echo)) if logprobs is not None else None
                choices.append(CompletionChoice(index=job.index, text=echo + r.text, logprobs=lp,
                                                finish_reason=_finish(r.finish_reason)))
            return CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=api.usage(results, jobs))

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            data = CompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
            return f"data: {data.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"

        async def stream_body(request: Request, pipe, jobs: list[Job]) -> AsyncIterator[str]:
            offsets = [len(echo_texts[job.prompt_index]) for job in jobs]
            for job in jobs:
                if echo_texts[job.prompt_index]:
                    lp = CompletionLogprobs() if logprobs is not None else None
                    yield chunk([CompletionChoice(index=job.index, text=echo_texts[job.prompt_index], logprobs=lp)])
            results = [ChoiceResult() for _ in jobs]
            async with aclosing(stream_choices(pipe, jobs, request.is_disconnected, api.is_current(pipe))) as events:
                async for job, out in events:
                    results[job.index].add(out)
                    if out.text or out.token_ids or (logprobs is not None and out.logprobs):
                        lp = None
                        if logprobs is not None:
                            lp = completion_logprobs(out.logprobs, texts, offsets[job.index])
                            offsets[job.index] += sum(len(t) for t in lp.tokens)
                        yield chunk([CompletionChoice(index=job.index, text=out.text, logprobs=lp)])
                    if out.finished:
                        _raise_unfinished(out)
                        yield chunk([CompletionChoice(index=job.index, text="",
                                                      finish_reason=_finish(out.finish_reason))])
            if include_usage:
                yield chunk([], api.usage(results, jobs))
            yield DONE

        return await api.run(request, pipe, jobs, bool(body.stream), respond, stream_body)


def _echo_text(pipe, ids: list[int], text: str) -> str:
    return text or pipe.tokenizer.decode(ids, skip_special_tokens=False)


def _raise_unfinished(out) -> None:
    if out.finish_reason == "error":
        raise APIError(500, f"the engine failed on this request: {out.error}", code="engine_error")
    if out.finish_reason not in ("stop", "length"):
        raise APIError(503, UNLOADED_MESSAGE, code="model_unloaded")


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.tools:
        raise APIError(400, "tool calling is not supported by this server", param="tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool calling is not supported by this server", param="tool_choice")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")


# ---- the app --------------------------------------------------------------------------------------------------
def build_api(manager: ModelManager, *, api_keys: list[str] | None = None, allow_origins: list[str] | None = None,
              max_concurrent_requests: int = 256, served_model_name: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible API as a FastAPI app. Mount a UI on it at "/" (its routes come first) and run it
    with uvicorn. `api_keys`: Bearer keys required on /v1 and /metrics (None: open). `allow_origins`: CORS origins
    (None: no CORS headers). `served_model_name`: the model id clients see (default: the loaded model's name)."""
    if max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests must be at least 1, got {max_concurrent_requests}")
    api = _API(manager, served_model_name, max_concurrent_requests)
    app = FastAPI(title="quant-studio OpenAI-compatible API", version="1.0")
    app.state.api = api
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        current = manager.current
        if current is None:
            return JSONResponse({"status": "no model loaded"}, status_code=503)
        if not current.pipeline.engine.is_alive:
            return JSONResponse({"status": "engine stopped", "model": api.public_name()}, status_code=503)
        return {"status": "ok", "model": api.public_name()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        current = manager.current
        text = render_metrics(api.metrics, api.admission.in_flight, api.admission.limit, api.public_name(),
                              current.pipeline if current is not None else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    router = APIRouter(prefix="/v1")

    def model_card() -> ModelCard | None:
        current = manager.current
        if current is None:
            return None
        return ModelCard(id=api.public_name(), created=api.started,
                         root=str(current.path), max_model_len=current.pipeline.session_len)

    @router.get("/models", response_model=ModelList)
    async def list_models():
        card = model_card()
        return ModelList(data=[card] if card is not None else [])

    @router.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str):
        api.resolve(model_id)
        return model_card()

    _chat_routes(api, router)
    _completion_routes(api, router)
    app.include_router(router)

    app.add_middleware(_Guard, api_keys=api_keys, metrics=api.metrics, max_body_bytes=max_body_bytes)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in allow_origins,
                           expose_headers=["Retry-After"])
    return app
