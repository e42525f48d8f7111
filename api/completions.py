"""POST /v1/completions: raw text or token-id prompts (one or a batch) -> n continuations each, as one JSON
response or an SSE stream of text_completion events; `echo` prepends the prompt.

`echo` + `logprobs` also returns the prompt's own token logprobs (the first is null), scored by the engine
(Pipeline.score), as OpenAI's legacy API did; with `max_tokens: 0` nothing is generated: the prompt is only scored
(perplexity from a client)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from api.errors import APIError, from_engine_error
from api.schemas import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from api.service import BIG_REQUEST_TOKENS, DONE, Endpoint, Service, answer, finish_reason, return_memory
from api.serving import ChoiceResult, Job, TokenTexts, completion_logprobs, merge_logprobs


class CompletionEndpoint(Endpoint):
    def __init__(self, request_id: str, model: str, logprobs: int | None, texts: TokenTexts, include_usage: bool,
                 jobs: list[Job], echo_texts: list[str], prompt_logprobs: list[list[dict]] | None = None,
                 special_ids: frozenset[int] = frozenset()):
        self.request_id, self.model, self.logprobs, self.texts = request_id, model, logprobs, texts
        self.include_usage, self.created, self.jobs, self.echo_texts = include_usage, int(time.time()), jobs, echo_texts
        self.offsets = [len(echo_texts[job.prompt_index]) for job in jobs]  # each choice's text length so far
        # echo + logprobs: each prompt's scored tokens, in the completions' column shape
        self.prompt_lp = ([completion_logprobs(e, texts, 0, special_ids) for e in prompt_logprobs]
                          if prompt_logprobs else None)

    def _echo_logprobs(self, prompt_index: int) -> CompletionLogprobs | None:
        if self.logprobs is None:
            return None
        return self.prompt_lp[prompt_index] if self.prompt_lp is not None else CompletionLogprobs()

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        data = CompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                               usage=usage)
        return f"data: {data.model_dump_json(exclude=None if self.include_usage else {'usage'})}\n\n"

    def head(self, jobs: list[Job]) -> list[str]:
        return [self._chunk([CompletionChoice(index=job.index, text=self.echo_texts[job.prompt_index],
                                              logprobs=self._echo_logprobs(job.prompt_index))])
                for job in jobs if self.echo_texts[job.prompt_index]]

    def delta(self, job: Job, out) -> str | None:
        if not (out.text or out.token_ids or (self.logprobs is not None and out.logprobs)):
            return None
        lp = None
        if self.logprobs is not None:
            lp = completion_logprobs(out.logprobs, self.texts, self.offsets[job.index])
            self.offsets[job.index] += sum(len(t) for t in lp.tokens)
        return self._chunk([CompletionChoice(index=job.index, text=out.text, logprobs=lp)])

    def finish(self, job: Job, reason: str) -> str:
        return self._chunk([CompletionChoice(index=job.index, text="", finish_reason=finish_reason(reason))])

    def usage_chunk(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> CompletionResponse:
        choices = []
        for job, r in zip(self.jobs, results):
            echo = self.echo_texts[job.prompt_index]
            lp = completion_logprobs(r.logprobs, self.texts, len(echo)) if self.logprobs is not None else None
            if echo and self.prompt_lp is not None:
                lp = merge_logprobs(self.prompt_lp[job.prompt_index], lp)
            choices.append(CompletionChoice(index=job.index, text=echo + r.text, logprobs=lp,
                                            finish_reason=finish_reason(r.finish_reason)))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=usage)


def add_completion_routes(service: Service, router: APIRouter) -> None:
    @router.post("/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request):
        pipe, model = service.resolve(body.model)
        n = body.n or 1
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if body.best_of is not None and body.best_of != n:
            raise APIError(400, "best_of must equal n: this server does not rank candidates", param="best_of")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it is for scoring a prompt, with echo (and logprobs)",
                           param="max_tokens")
        raw = body.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif isinstance(raw[0], int):
            raw = [raw]
        weight = len(raw) * n
        service.admission.check(weight)  # refuse oversized or untimely batches before tokenizing them
        token_id_total = sum(len(p) for p in raw if not isinstance(p, str))
        service.limits.check_prompt_tokens(token_id_total * n, pipe.session_len)
        prompts: list[tuple[list[int], str]] = []
        for p in raw:
            ids = await service.encode(pipe, p, False, "prompt") if isinstance(p, str) else list(p)
            service.check_prompt(pipe, ids, "prompt")
            prompts.append((ids, p if isinstance(p, str) else ""))
        num_prompt_tokens = sum(len(ids) for ids, _ in prompts) * n
        service.limits.check_prompt_tokens(num_prompt_tokens, pipe.session_len)
        scoring = bool(body.echo and body.logprobs is not None)
        if scoring:
            service.limits.check_scoring_size(num_prompt_tokens, body.logprobs)
        echo_texts = [(text or pipe.tokenizer.decode(ids, skip_special_tokens=False)) if body.echo else ""
                      for ids, text in prompts]
        max_new = [service.max_new_tokens(pipe, body.max_tokens, len(ids), len(prompts) * n, body.logprobs,
                                          bool(body.stream)) for ids, _ in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = service.make_jobs(pipe, body, [(ids, None) for ids, _ in prompts], max_new, body.logprobs, request_id)
        prompt_logprobs = None
        release = None
        big = scoring and num_prompt_tokens * (1 + body.logprobs) >= BIG_REQUEST_TOKENS
        if scoring:  # scoring is engine work too: it holds its admission slots like generation
            release = service.admission.acquire(weight)
            try:
                prompt_logprobs = [await asyncio.to_thread(pipe.score, input_ids=ids, top_logprobs=body.logprobs)
                                   for ids, _ in prompts]
            except BaseException as e:
                release()
                if isinstance(e, Exception):
                    raise from_engine_error(e) from e
                raise
        try:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            endpoint = CompletionEndpoint(request_id, model, body.logprobs, service.token_texts(pipe), include_usage,
                                          jobs, echo_texts, prompt_logprobs, frozenset(pipe.tokenizer.all_special_ids))
            if body.max_tokens == 0:  # scoring only: the echoed prompts (and their logprobs), nothing generated
                return scored(endpoint, jobs, service.usage, bool(body.stream), include_usage, big)
        except BaseException:
            if release is not None:
                release()
            raise
        finally:
            if body.max_tokens == 0 and release is not None:
                release()  # (a second call does nothing)
        return await service.run(request, pipe, jobs, bool(body.stream), endpoint, release, big)


def scored(endpoint: CompletionEndpoint, jobs: list[Job], usage_of, stream: bool, include_usage: bool, big: bool):
    """The answer of a scoring-only request (max_tokens 0): the echoed prompts and their logprobs, built at once."""
    results = [ChoiceResult(finish_reason="length", num_prompt_tokens=len(job.input_ids)) for job in jobs]
    usage = usage_of(results, jobs)
    if not stream:
        return answer(endpoint.response(results, usage), big)
    chunks = endpoint.head(jobs) + [endpoint.finish(job, "length") for job in jobs]
    chunks += [endpoint.usage_chunk(usage)] if include_usage else []
    return StreamingResponse(iter(chunks + [DONE]), media_type="text/event-stream",
                             background=BackgroundTask(return_memory) if big else None)
