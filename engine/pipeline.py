"""The user-facing API over the engine: batched sync calls, sync streaming, and an asyncio stream that the
API server and the UI share.

    pipe = pipeline("path/to/model", EngineConfig(quant_policy=8))
    pipe(["Hi", [{"role": "user", "content": "Tell a story"}]], GenerationConfig(max_new_tokens=64))
    for delta in pipe.stream([{"role": "user", "content": "hi"}]): print(delta.text, end="")
    async for delta in pipe.generate(messages, gen_config): ...   # cancelling the loop aborts the request

A prompt is a string (sent as one user turn through the chat template), a list of OpenAI-style messages,
or token ids via `input_ids=`. Pass `apply_chat_template=False` for raw completion of a string. Vision-language
models (LLaVA) also take `(text, image)` / `(text, [images])` and messages with image_url parts
(engine/vision_input.py); text-only models refuse images with ImageInputError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import EngineConfig, GenerationConfig
from engine.errors import ImageInputError  # noqa: F401 - re-exported
from engine.inputs import RequestInput
from engine.llm_engine import LLMEngine, RequestOutput
from engine.vision.workers import ImageWorkers
from engine.vision_input import VisionPrompter

Prompt = str | list[dict] | tuple
NO_IMAGES = "this model takes no images: send text only, or load a vision-language model"


@dataclass
class Response:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    input_token_len: int = 0
    generate_token_len: int = 0
    index: int = 0
    logprobs: list[dict] = field(default_factory=list)
    error: str | None = None


def message_text(content) -> str:
    """OpenAI content (a string or a list of parts) -> text; image parts are refused by text-only models."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind in ("image_url", "image"):
                raise ImageInputError(NO_IMAGES)
            else:
                raise ValueError(f"unsupported message content part {part!r}")
        return "".join(texts)
    if content is None:
        return ""
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


class Pipeline:
    def __init__(self, model_path: str | Path, engine_config: EngineConfig | None = None):
        self.engine = LLMEngine(model_path, engine_config or EngineConfig())
        self.tokenizer = self.engine.tokenizer
        self.model_path = self.engine.model_path
        self.model_name = self.model_path.name
        self.vision = None  # vision-language models: prompts with images -> RequestInput
        self.image_workers = None  # ... built on these threads, off the event loop (engine/vision/workers.py)
        if self.engine.image_processor is not None:
            config = self.engine.config
            self.vision = VisionPrompter(self.tokenizer, self.engine.chat_template, self.engine.image_processor,
                                         self.engine.spec, config, self.engine.device, self.engine.dtype)
            self.image_workers = ImageWorkers(config.image_workers, config.max_images_in_flight,
                                              config.max_image_bytes_in_flight)

    # ---- prompts --------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict]) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self.vision is not None:
            return self.vision.chat_text(messages)
        clean = []
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message role must be system, user or assistant, got {m.get('role')!r}")
            clean.append({"role": m["role"], "content": message_text(m.get("content"))})
        return self.tokenizer.apply_chat_template(
            clean, chat_template=self.engine.chat_template, add_generation_prompt=True, tokenize=False
        )

    def encode(self, prompt: Prompt, apply_chat_template: bool = True) -> list[int]:
        """Token ids of a prompt (for an image, as many placeholder ids as it has feature rows)."""
        prompt_input = self.prompt_input(prompt, apply_chat_template)
        return prompt_input.token_ids if isinstance(prompt_input, RequestInput) else prompt_input

    def prompt_input(self, prompt: Prompt, apply_chat_template: bool = True) -> list[int] | RequestInput:
        """What the engine takes for a prompt: token ids, or a RequestInput when the prompt holds images."""
        try:
            if self.vision is not None:
                built = self.vision.build(prompt, apply_chat_template)
                return built if built.mm_items else built.token_ids
            if isinstance(prompt, tuple):
                raise ImageInputError(f"{NO_IMAGES} ((text, image) prompts are for vision-language models; a batch "
                                      "of prompts is a list)")
            return self._encode(prompt, apply_chat_template)
        except TypeError as e:  # e.g. lone surrogates, which the Rust tokenizer cannot take
            raise ValueError(f"the prompt could not be tokenized: {e}") from e

    async def build_input(self, prompt: Prompt, apply_chat_template: bool = True) -> list[int] | RequestInput:
        """`prompt_input` without blocking the event loop: a prompt with images is built once on the image workers
        (bounded: ImagesBusyError when they are full), so the caller can check it and submit that same object (as
        `input_ids=`, to as many requests as it likes); a text prompt is tokenized on the default executor."""
        if self.vision is not None:
            num_images, num_bytes = self.vision.image_load(prompt)
            if num_images:
                return await self.image_workers.run(self.prompt_input, prompt, apply_chat_template,
                                                    num_images=num_images, num_bytes=num_bytes)
        elif isinstance(prompt, str) and len(prompt) < 4096:
            return self.prompt_input(prompt, apply_chat_template)  # short text: not worth a thread hop
        return await asyncio.to_thread(self.prompt_input, prompt, apply_chat_template)

    def prompt_inputs(self, prompts: list[Prompt], apply_chat_template: bool = True) -> list:
        """prompt_input of each prompt; those with images are built on the image workers side by side."""
        if self.vision is None:
            return [self.prompt_input(p, apply_chat_template) for p in prompts]
        futures = [self.image_workers.executor.submit(self.prompt_input, p, apply_chat_template) for p in prompts]
        return [f.result() for f in futures]

    def check_prompt(self, input_ids: list[int] | RequestInput, gen_config: GenerationConfig | None = None) -> None:
        """Raise BadInputError / PromptTooLongError now for ids (and settings) the engine cannot serve, before
        anything is submitted or a stream starts."""
        if isinstance(input_ids, RequestInput):
            input_ids = input_ids.token_ids
        self.engine.check_prompt_ids(input_ids)
        if gen_config is not None:
            gen_config.check_for_model(self.engine.spec.vocab_size)

    def _encode(self, prompt: Prompt, apply_chat_template: bool) -> list[int]:
        if isinstance(prompt, str) and apply_chat_template:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list):
            text = self.apply_chat_template(prompt)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        raise ValueError(f"a prompt is a string or a list of messages, got {type(prompt).__name__}")

    def _submit(self, prompt, gen_config, callback, request_id, apply_chat_template, input_ids, group=None) -> str:
        ids = input_ids if input_ids is not None else self.prompt_input(prompt, apply_chat_template)
        ids = ids if isinstance(ids, RequestInput) else list(ids)
        return self.engine.add_request(ids, gen_config or GenerationConfig(), callback, request_id, group=group)

    # ---- sync -----------------------------------------------------------------------------------------
    def __call__(self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | None = None,
                 apply_chat_template: bool = True):
        """One prompt -> one Response; a list of prompts -> a list of Responses, run as one batch."""
        single = isinstance(prompts, str | tuple) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
        )
        batch = [prompts] if single else list(prompts)
        gen_config = gen_config or GenerationConfig()
        # the whole batch is checked before any of it is submitted: a bad prompt raises with nothing left running
        batch_ids = self.prompt_inputs(batch, apply_chat_template)
        for ids in batch_ids:
            self.check_prompt(ids, gen_config)
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        submitted = []
        try:
            for i, ids in enumerate(batch_ids):
                submitted.append(self._submit(None, gen_config, lambda out, i=i: outputs.put((i, out)), None,
                                              apply_chat_template, ids))
        except BaseException:
            for rid in submitted:
                self.engine.abort(rid)
            raise
        responses = [Response("", [], None, index=i) for i in range(len(batch))]
        remaining = len(batch)
        while remaining:
            i, out = outputs.get()
            _accumulate(responses[i], out)
            remaining -= out.finished
        return responses[0] if single else responses

    def stream(self, prompt: Prompt, gen_config: GenerationConfig | None = None, *,
               apply_chat_template: bool = True, input_ids: list[int] | RequestInput | None = None
               ) -> Iterator[Response]:
        """Yield deltas (text and token ids since the last one); leaving the loop early aborts the request."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        rid = self._submit(prompt, gen_config, outputs.put, None, apply_chat_template, input_ids)
        finished = False
        try:
            while not finished:
                out = outputs.get()
                finished = out.finished
                yield _as_response(out)
        finally:
            if not finished:
                self.engine.abort(rid)

    # ---- async ----------------------------------------------------------------------------------------
    async def generate(self, prompt: Prompt | None, gen_config: GenerationConfig | None = None, *,
                       request_id: str | None = None, apply_chat_template: bool = True,
                       input_ids: list[int] | RequestInput | None = None,
                       group: str | None = None) -> AsyncIterator[RequestOutput]:
        """Async stream of RequestOutput deltas. Cancelling or closing it aborts the request at once. `input_ids`
        may be a RequestInput from `build_input` (images prepared once, shared by every choice); given a prompt,
        it is built here, off the event loop. Requests given one `group` share one fair share of the batch (an API
        request's n choices)."""
        loop = asyncio.get_running_loop()
        if input_ids is None:
            input_ids = await self.build_input(prompt, apply_chat_template)
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(out: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the consumer's event loop has closed: nobody is listening any more
                pass

        rid = self._submit(prompt, gen_config, deliver, request_id, apply_chat_template, input_ids, group)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(rid)

    # ---- scoring --------------------------------------------------------------------------------------
    def score(self, text: str | None = None, *, input_ids: list[int] | None = None, top_logprobs: int = 0,
              add_special_tokens: bool = True) -> list[dict]:
        """Per-token log-probabilities of a given text (or ids) under this engine, no generation: entries
        {"token_id", "logprob", "top": [(id, logprob), ...], "text"}; the first token's logprob is None.
        studio/quality.py turns them into perplexity; /v1/completions serves them as `echo` + `logprobs`."""
        if (text is None) == (input_ids is None):
            raise ValueError("score takes a text or input_ids, exactly one of them")
        if input_ids is None:
            if not isinstance(text, str):
                raise ValueError(f"the text to score must be a string, got {type(text).__name__}")
            input_ids = self.encode(text, apply_chat_template=False) if add_special_tokens else \
                self.tokenizer.encode(text, add_special_tokens=False)
        entries = self.engine.score(input_ids, top_logprobs)
        for entry in entries:
            entry["text"] = self.tokenizer.decode([entry["token_id"]], skip_special_tokens=False)
        return entries

    # ---- state ----------------------------------------------------------------------------------------
    def memory(self) -> dict:
        report = self.engine.memory()
        if self.vision is not None:  # prepared images remembered by hash, decode counts, the workers' load
            report.update(self.vision.memory())
            report.update(self.image_workers.stats())
        return report

    @property
    def session_len(self) -> int:
        return self.engine.session_len

    def close(self) -> None:
        if self.image_workers is not None:
            self.image_workers.shutdown()
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_response(out: RequestOutput) -> Response:
    return Response(out.text, list(out.token_ids), out.finish_reason, out.num_prompt_tokens,
                    out.num_generated_tokens, logprobs=list(out.logprobs), error=out.error)


def _accumulate(response: Response, out: RequestOutput) -> None:
    response.text += out.text
    response.token_ids += out.token_ids
    response.logprobs += out.logprobs
    response.finish_reason = out.finish_reason
    response.input_token_len = out.num_prompt_tokens
    response.generate_token_len = out.num_generated_tokens
    response.error = out.error


def pipeline(model_path: str | Path, engine_config: EngineConfig | None = None, **overrides) -> Pipeline:
    """`overrides`: EngineConfig fields set over engine_config, e.g. pipeline(path, vision_tower="clip-folder")."""
    if overrides:
        engine_config = dataclasses.replace(engine_config or EngineConfig(), **overrides)
    return Pipeline(model_path, engine_config)
