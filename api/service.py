"""The routes' shared state and the one request skeleton both completion families run on.

`Service` resolves the model, tokenizes with a character budget, builds one engine request (Job) per choice and
runs them through `Service.run`: collected into one response, or streamed as SSE over the same event loop. An
endpoint family only says how its chunks and responses look (an `Endpoint`); the finish-reason check, errors
inside a stream (an error event, then [DONE]), disconnects and shutdown are handled here once.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from api.errors import UNLOADED_MESSAGE, APIError, from_engine_error, sse_error
from api.guard import Admission
from api.limits import RequestLimits
from api.metrics import APIMetrics
from api.schemas import UsageInfo
from api.serving import (
    ChoiceResult,
    ClientDisconnected,
    Job,
    TokenTexts,
    generation_config,
    prompt_chars,
    stream_choices,
)
from engine.errors import EngineUnavailableError, ImageInputError, ImagesBusyError, PromptTooLongError
from engine.inputs import RequestInput
from engine.llm_engine import RequestOutput
from studio.manager import ModelManager

log = logging.getLogger("api")

DONE = "data: [DONE]\n\n"
BIG_REQUEST_TOKENS = 2**15  # after an answer of this many tokens' outputs (x logprob entries), memory goes back


def return_memory() -> None:
    """Give freed heap back to the operating system after a big answer (glibc keeps it otherwise: RSS stays up).
    Blocking (it walks the heap, without the GIL): call it from a worker thread."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason for a finished choice (the engine's abort / error never reach a client as such)."""
    return reason if reason in ("stop", "length") else None


def check_finished(reason: str | None, error: str | None) -> None:
    """A choice that ended other than stop / length is an error for the whole response."""
    if reason == "error":
        raise APIError(500, f"the engine failed on this request: {error}", code="engine_error")
    if reason not in ("stop", "length"):
        raise APIError(503, UNLOADED_MESSAGE, code="model_unloaded")


def answer(response, big: bool):
    """A response model as the route's answer; after a big one, the freed memory goes back to the OS once it is
    sent (a background task)."""
    if not big:
        return response
    return JSONResponse(response.model_dump(mode="json"), background=BackgroundTask(return_memory))


class Endpoint:
    """What one endpoint family's responses look like. Subclasses fill the chunk and response builders."""

    include_usage: bool = False

    def head(self, jobs: list[Job]) -> list[str]:
        """Chunks sent before any token (chat: the assistant role; completions: the echoed prompt)."""
        return []

    def delta(self, job: Job, out: RequestOutput) -> str | None:
        raise NotImplementedError

    def finish(self, job: Job, reason: str) -> str:
        raise NotImplementedError

    def usage_chunk(self, usage: UsageInfo) -> str:
        raise NotImplementedError

    def response(self, results: list[ChoiceResult], usage: UsageInfo):
        raise NotImplementedError


class _SSEResponse(StreamingResponse):
    """An event stream that always closes its body (aborting what the engine still runs) and releases its
    admission slot, however the response ends: finished, client gone, or server shutting down."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], trim: bool = False):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release, self._trim = release, trim

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            except BaseException:  # noqa: BLE001 - already closed, or we are being cancelled
                pass
            self._release()
            if self._trim:
                try:
                    asyncio.get_running_loop().run_in_executor(None, return_memory)
                except RuntimeError:  # the server is shutting down: its memory goes back anyway
                    pass


class Service:
    def __init__(self, manager: ModelManager, served_model_name: str | None, max_concurrent_requests: int,
                 limits: RequestLimits | None = None):
        self.manager = manager
        self.limits = limits or RequestLimits()
        self.served_model_name = served_model_name
        self.metrics = APIMetrics()
        self.started = int(time.time())
        self.admission = Admission(max_concurrent_requests, self.metrics)
        self.stopping = False  # set when the server begins to shut down: running requests end with an error
        self._texts: dict[int, TokenTexts] = {}

    # ---- model --------------------------------------------------------------------------------------------
    def public_name(self) -> str | None:
        current = self.manager.current
        if current is None:
            return None
        return self.served_model_name or current.name

    def resolve(self, requested: str | None):
        """The pipeline serving `requested` and the name to answer with; 503 with nothing loaded, 404 for another."""
        if self.stopping:
            raise APIError(503, "the server is shutting down; retry later", code="server_shutting_down")
        current = self.manager.current
        if current is None:
            raise APIError(503, "no model is loaded: load one in the UI's Model tab or pass MODEL to app.py",
                           code="model_not_loaded")
        names = {current.name, self.served_model_name} - {None}
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
    async def encode(self, pipe, prompt, apply_chat_template: bool, param: str) -> list[int] | RequestInput:
        """Token ids of a prompt, or the RequestInput of one with images: built once, off the event loop (images on
        the engine's bounded image workers: 429 when they are full), checked, then submitted as it is by every
        choice. A text too long for the session by its characters alone is refused before it is tokenized (a
        token stands for at most `max_token_chars` characters), so a huge prompt costs no CPU."""
        budget = pipe.session_len * self.token_texts(pipe).max_token_chars
        num_chars = prompt_chars(prompt)
        if num_chars > budget:
            raise APIError(400, f"the prompt has {num_chars} characters, more than {pipe.session_len} tokens can "
                                f"hold (session_len is {pipe.session_len})", param=param,
                           code="context_length_exceeded")
        try:
            return await pipe.build_input(prompt, apply_chat_template)
        except ImagesBusyError as e:
            raise APIError(429, str(e), param=param, code="images_busy") from e
        except EngineUnavailableError as e:  # unloaded or swapped while the images were prepared
            raise from_engine_error(e) from e
        except ImageInputError as e:
            raise APIError(400, str(e), param=param, code="image_input_not_supported") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e
        except Exception as e:
            if type(e).__module__.startswith("jinja2"):  # the model's chat template refused the conversation
                raise APIError(400, f"the chat template rejected the messages: {e}", param=param) from e
            raise

    @staticmethod
    def check_prompt(pipe, ids: list[int] | RequestInput, param: str) -> None:
        try:
            pipe.check_prompt(ids)  # before the stream starts: a 200 must not turn into an error later
        except PromptTooLongError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e

    def max_new_tokens(self, pipe, requested: int | None, num_prompt_tokens: int, n: int = 1,
                       top_logprobs: int | None = None, stream: bool = True) -> int:
        """Up to what fits in session_len (a larger request is clamped: it then finishes with 'length'), within the
        request limits (api/limits.py: a 400 past them; unset, the largest that fits)."""
        room = pipe.session_len - num_prompt_tokens
        return self.limits.fit_max_tokens(requested, room, n, top_logprobs, stream)

    @staticmethod
    def make_jobs(pipe, req, prompts: list[tuple[list[int] | RequestInput, str | list[dict] | None]],
                  max_new: list[int], logprobs: int | None, request_id: str) -> list[Job]:
        """One Job per (prompt, choice); every generation setting is checked against the model here, at the door."""
        n = req.n or 1
        jobs = []
        for p, (ids, raw_prompt) in enumerate(prompts):
            for j in range(n):
                index = p * n + j
                try:
                    gen_config = generation_config(req, max_new[p], index, logprobs)
                    pipe.check_prompt(ids, gen_config)
                except ValueError as e:
                    raise APIError(400, str(e)) from e
                jobs.append(Job(index, p, ids, gen_config, f"{request_id}-{index}", raw_prompt, group=request_id))
        return jobs

    @staticmethod
    def usage(results: list[ChoiceResult], jobs: list[Job]) -> UsageInfo:
        prompt_tokens = {job.prompt_index: result.num_prompt_tokens for job, result in zip(jobs, results)}
        prompt = sum(prompt_tokens.values())
        completion = sum(r.num_generated_tokens for r in results)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # ---- running: the one skeleton ------------------------------------------------------------------------
    def events(self, request: Request, pipe, jobs: list[Job]):
        return stream_choices(pipe, jobs, request.is_disconnected, self.is_current(pipe),
                              is_stopping=lambda: self.stopping)

    async def run(self, request: Request, pipe, jobs: list[Job], stream: bool, endpoint: Endpoint,
                  release: Callable[[], None] | None = None, big: bool = False) -> Response:
        """Run the jobs under an admission slot (`release`: one already taken, e.g. for scoring first). After a big
        request (`big`, or outputs of BIG_REQUEST_TOKENS or more) the freed memory goes back to the OS once the
        answer is sent."""
        release = release or self.admission.acquire(len(jobs))
        if stream:
            could_be_big = sum(job.gen_config.max_new_tokens * (1 + (job.gen_config.logprobs or 0))
                               for job in jobs) >= BIG_REQUEST_TOKENS
            try:
                return _SSEResponse(self._guarded_stream(self._stream(request, pipe, jobs, endpoint)), release,
                                    trim=big or could_be_big)
            except BaseException:
                release()
                raise
        try:
            results = await self._collect(request, pipe, jobs)
        finally:
            release()
        if results is None:
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        big = big or sum(r.num_generated_tokens * (1 + (job.gen_config.logprobs or 0))
                         for job, r in zip(jobs, results)) >= BIG_REQUEST_TOKENS
        return answer(endpoint.response(results, self.usage(results, jobs)), big)

    async def _collect(self, request: Request, pipe, jobs: list[Job]) -> list[ChoiceResult] | None:
        """Run the jobs to the end; None when the client went away first (its requests are then aborted)."""
        results = [ChoiceResult() for _ in jobs]
        try:
            async with aclosing(self.events(request, pipe, jobs)) as events:
                async for job, out in events:
                    results[job.index].add(out)
        except ClientDisconnected:
            self.metrics.num_client_disconnects += 1
            return None
        except Exception as e:
            raise from_engine_error(e) from e
        for result in results:
            check_finished(result.finish_reason, result.error)
        return results

    async def _stream(self, request: Request, pipe, jobs: list[Job], endpoint: Endpoint) -> AsyncIterator[str]:
        for chunk in endpoint.head(jobs):
            yield chunk
        results = [ChoiceResult() for _ in jobs]
        async with aclosing(self.events(request, pipe, jobs)) as events:
            async for job, out in events:
                results[job.index].add(out)
                chunk = endpoint.delta(job, out)
                if chunk is not None:
                    yield chunk
                if out.finished:
                    check_finished(out.finish_reason, out.error)
                    yield endpoint.finish(job, out.finish_reason)
        if endpoint.include_usage:
            yield endpoint.usage_chunk(self.usage(results, jobs))
        yield DONE

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
            err = from_engine_error(e)
            yield sse_error(err.status, err.message, err.code)
            yield DONE
        finally:
            if not answered:
                self.metrics.num_client_disconnects += 1

