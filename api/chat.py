"""POST /v1/chat/completions: messages (text, and image parts for vision models) -> one assistant reply per choice,
as one JSON response or an SSE stream of chat.completion.chunk events."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from api.errors import APIError
from api.schemas import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from api.service import Endpoint, Service, finish_reason
from api.serving import ChoiceResult, Job, TokenTexts, chat_logprobs


class ChatEndpoint(Endpoint):
    def __init__(self, request_id: str, model: str, logprobs: int | None, texts: TokenTexts, include_usage: bool,
                 jobs: list[Job] | None = None):
        self.request_id, self.model, self.logprobs, self.texts = request_id, model, logprobs, texts
        self.include_usage, self.created, self.jobs = include_usage, int(time.time()), jobs or []

    def _chunk(self, choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None) -> str:
        data = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)
        return f"data: {data.model_dump_json(exclude=None if self.include_usage else {'usage'})}\n\n"

    def _logprobs(self, entries: list[dict]) -> ChatChoiceLogprobs | None:
        return ChatChoiceLogprobs(content=chat_logprobs(entries, self.texts)) if self.logprobs is not None else None

    def head(self, jobs: list[Job]) -> list[str]:
        return [self._chunk([ChatCompletionChunkChoice(index=job.index, delta=DeltaMessage(role="assistant",
                                                                                           content=""))])
                for job in jobs]

    def delta(self, job: Job, out) -> str | None:
        if not (out.text or out.token_ids or (self.logprobs is not None and out.logprobs)):
            return None
        return self._chunk([ChatCompletionChunkChoice(index=job.index, delta=DeltaMessage(content=out.text),
                                                      logprobs=self._logprobs(out.logprobs))])

    def finish(self, job: Job, reason: str) -> str:
        return self._chunk([ChatCompletionChunkChoice(index=job.index, delta=DeltaMessage(),
                                                      finish_reason=finish_reason(reason))])

    def usage_chunk(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)

    def response(self, results: list[ChoiceResult], usage: UsageInfo) -> ChatCompletionResponse:
        choices = [ChatCompletionChoice(index=job.index, message=ChatResponseMessage(content=r.text),
                                        logprobs=self._logprobs(r.logprobs),
                                        finish_reason=finish_reason(r.finish_reason))
                   for job, r in zip(self.jobs, results)]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                      usage=usage)


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.tools:
        raise APIError(400, "tool calling is not supported by this server", param="tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool calling is not supported by this server", param="tool_choice")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")


def add_chat_routes(service: Service, router: APIRouter) -> None:
    @router.post("/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        pipe, model = service.resolve(body.model)
        refuse_unsupported(body)
        service.admission.check(body.n or 1)  # refuse untimely requests before tokenizing them
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = [part.model_dump(exclude_none=True) for part in content]
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        ids = await service.encode(pipe, messages, True, "messages")  # images prepared here, once for every choice
        service.check_prompt(pipe, ids, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        n = body.n or 1
        service.limits.check_prompt_tokens(len(ids) * n, pipe.session_len, "messages")
        max_new = service.max_new_tokens(pipe, body.max_completion_tokens or body.max_tokens, len(ids), n, logprobs,
                                         bool(body.stream))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = service.make_jobs(pipe, body, [(ids, None)], [max_new], logprobs, request_id)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        endpoint = ChatEndpoint(request_id, model, logprobs, service.token_texts(pipe), include_usage, jobs)
        return await service.run(request, pipe, jobs, bool(body.stream), endpoint)
