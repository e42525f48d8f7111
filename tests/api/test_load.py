"""Load: 64 concurrent streaming clients send 200 requests (chat and text completions, mixed prompt and reply
lengths, greedy and seeded sampling; fixed seed), and about 15% of them hang up mid-stream.

Every request that finished must have received exactly its own complete output, nothing lost, mixed up or
repeated: its streamed text, finish reason and token count equal those of the same request sent again without
streaming afterwards (greedy, or sampled with the same seed: both deterministic). Every hang-up must have aborted
its engine request, and at the end no KV block is held. Loopback only; bounded (a hard timeout) and self-stopping.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.api.conftest import MODEL_NAME, wait_until_idle

NUM_REQUESTS = 200
CONCURRENCY = 64
DISCONNECT_RATE = 0.15
HARD_TIMEOUT_S = 240
WORDS = ("the model reads a prompt and predicts the next token quantization paged attention cache block river "
         "mountain bread tea train Paris Tokyo 你好 世界 café 🙂 def return 42 3.14 hello world story dragon").split()


@dataclass
class Spec:
    index: int
    route: str  # "chat" | "completion"
    prompt: str
    max_tokens: int
    sampled: bool
    disconnect_after: int | None  # content chunks to read before hanging up; None: read to the end

    def body(self, stream: bool) -> dict:
        body = {"model": MODEL_NAME, "max_tokens": self.max_tokens, "stream": stream}
        if self.route == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.sampled:
            body.update(temperature=0.8, top_p=0.95, seed=1000 + self.index)
        else:
            body["temperature"] = 0
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.disconnect_after is not None:
            body["ignore_eos"] = True  # long enough that the hang-up comes while it still runs
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.route == "chat" else "/v1/completions"


@dataclass
class Outcome:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    ids: set = field(default_factory=set)
    done: bool = False
    hung_up: bool = False
    error: str | None = None


def make_specs(seed: int = 20240607) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(NUM_REQUESTS):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        disconnect = rng.random() < DISCONNECT_RATE
        specs.append(Spec(
            index=i,
            route=rng.choice(("chat", "completion")),
            prompt=f"Request {i}: {words}",
            max_tokens=rng.randint(200, 400) if disconnect else rng.randint(1, 48),
            sampled=rng.random() < 0.5,
            disconnect_after=rng.randint(1, 4) if disconnect else None,
        ))
    return specs


def _content(route: str, event: dict) -> str:
    text = ""
    for choice in event.get("choices", []):
        if route == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def stream_one(client: httpx.AsyncClient, spec: Spec) -> Outcome:
    out = Outcome()
    async with client.stream("POST", spec.path, json=spec.body(stream=True)) as response:
        if response.status_code != 200:
            out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return out
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                out.done = True
                break
            event = json.loads(data)
            if "error" in event:
                out.error = str(event["error"])
                break
            out.ids.add(event["id"])
            delta = _content(spec.route, event)
            out.text += delta
            chunks += bool(delta)
            for choice in event["choices"]:
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if event.get("usage"):
                out.completion_tokens = event["usage"]["completion_tokens"]
            if spec.disconnect_after is not None and chunks >= spec.disconnect_after:
                out.hung_up = True
                break  # leaving the `async with` closes the connection mid-stream
    return out


async def reference(client: httpx.AsyncClient, spec: Spec) -> dict:
    response = await client.post(spec.path, json=spec.body(stream=False))
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if spec.route == "chat" else choice["text"]
    return {"text": text, "finish_reason": choice["finish_reason"], "completion_tokens": body["usage"][
        "completion_tokens"]}


async def run_load(base_url: str, specs: list[Spec]) -> dict[int, Outcome]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def one(spec: Spec) -> tuple[int, Outcome]:
            async with gate:
                return spec.index, await stream_one(client, spec)

        return dict(await asyncio.gather(*(one(s) for s in specs)))


async def run_references(base_url: str, specs: list[Spec]) -> dict[int, dict]:
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

        async def one(spec: Spec) -> tuple[int, dict]:
            async with gate:
                return spec.index, await reference(client, spec)

        return dict(await asyncio.gather(*(one(s) for s in specs)))


@pytest.mark.slow
@pytest.mark.timeout(HARD_TIMEOUT_S + 60)
def test_load_concurrent_streams_with_disconnects(base_url, pipe):
    wait_until_idle(pipe)
    specs = make_specs()
    stats = pipe.engine.stats
    aborted0, errors0 = stats.num_aborted, stats.num_errors

    start = time.monotonic()
    outcomes = asyncio.run(asyncio.wait_for(run_load(base_url, specs), HARD_TIMEOUT_S))
    load_s = time.monotonic() - start

    assert len(outcomes) == NUM_REQUESTS
    failed = {i: o.error for i, o in outcomes.items() if o.error}
    assert not failed, failed
    hung_up = [s for s in specs if outcomes[s.index].hung_up]
    completed = [s for s in specs if not outcomes[s.index].hung_up]
    assert len(hung_up) == sum(s.disconnect_after is not None for s in specs) >= 15
    for spec in completed:
        out = outcomes[spec.index]
        assert out.done, f"request {spec.index} ended without [DONE]"
        assert len(out.ids) == 1, f"request {spec.index} got chunks of several responses: {out.ids}"
    all_ids = [next(iter(outcomes[s.index].ids)) for s in completed]
    assert len(set(all_ids)) == len(all_ids), "two requests shared a response id"

    # every hang-up aborted its request, and everything was freed
    wait_until_idle(pipe, timeout_s=30)
    assert stats.num_aborted - aborted0 == len(hung_up)
    assert stats.num_errors == errors0

    # each finished stream got exactly its own whole output
    refs = asyncio.run(asyncio.wait_for(run_references(base_url, completed), HARD_TIMEOUT_S))
    mismatches = []
    for spec in completed:
        out, ref = outcomes[spec.index], refs[spec.index]
        got = {"text": out.text, "finish_reason": out.finish_reason, "completion_tokens": out.completion_tokens}
        if got != ref:
            mismatches.append((spec.index, spec.route, spec.sampled, got, ref))
    assert not mismatches, f"{len(mismatches)} of {len(completed)} streams differ, first: {mismatches[:3]}"
    wait_until_idle(pipe, timeout_s=30)
    assert pipe.memory()["used_kv_blocks"] == 0
    print(f"\nload: {NUM_REQUESTS} requests ({len(hung_up)} hang-ups) at {CONCURRENCY} concurrent in {load_s:.1f} s")
