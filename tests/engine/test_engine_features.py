"""Engine behaviour beyond plain correctness: prefix caching, preemption under a tiny cache, chunked prefill,
stop strings, seeded sampling, cancellation, and the errors users get for bad input."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from engine import GenerationConfig, ModelLoadError, PromptTooLongError, UnsupportedModelError, pipeline
from tests.engine.conftest import PROMPTS, greedy, small_config, wait_until, within

LONG_PREFIX = "System: you answer questions about the history of the sea and its ships, briefly. " * 3


def test_prefix_cache_reuses_blocks_and_keeps_output(make_pipe, llama_gqa_path):
    cached = make_pipe(llama_gqa_path)
    uncached = make_pipe(llama_gqa_path, enable_prefix_caching=False)
    first = [{"role": "user", "content": LONG_PREFIX + "Who built the first ship?"}]
    second = [{"role": "user", "content": LONG_PREFIX + "When did steam ships appear?"}]
    assert len(cached.encode(second)) > 3 * 16
    cached(first, greedy(8))
    hits_before = cached.engine.block_manager.num_prefix_hits
    out = cached(second, greedy(16))
    assert cached.engine.block_manager.num_prefix_hits - hits_before >= 2
    assert out.token_ids == uncached(second, greedy(16)).token_ids
    # the same prompt again: every full block but the last token's is reused
    again = cached(second, greedy(16))
    assert again.token_ids == out.token_ids


def test_preemption_under_tiny_cache_gives_identical_output(make_pipe, llama_path):
    prompts = [p for p in PROMPTS] * 2
    roomy = make_pipe(llama_path)
    expected = [o.token_ids for o in roomy(prompts, greedy(40))]
    # 12 blocks of 16 tokens: every request fits alone, but 8 of them at once do not
    tiny = make_pipe(llama_path, num_gpu_blocks=12)
    outs = tiny(prompts, greedy(40))
    assert tiny.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert tiny.engine.block_manager.num_free_blocks == 12


def test_chunked_prefill_gives_identical_output(make_pipe, llama_gqa_path):
    whole = make_pipe(llama_gqa_path)
    chunked = make_pipe(llama_gqa_path, max_prefill_token_num=16)
    prompt = PROMPTS[3]
    assert len(whole.encode(prompt)) > 3 * 16
    assert chunked(prompt, greedy(16)).token_ids == whole(prompt, greedy(16)).token_ids


def test_stop_string_spanning_tokens_ends_the_reply_before_it(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path)
    full = pipe("Tell me about the sea", greedy(48))
    tok = pipe.tokenizer
    # find a stop string that starts inside one token and ends inside a later one
    pieces = [tok.decode(full.token_ids[: i + 1], skip_special_tokens=True) for i in range(len(full.token_ids))]
    boundary = next(i for i in range(4, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2
                    and len(pieces[i - 1]) - len(pieces[i - 2]) >= 2)
    stop = pieces[boundary][len(pieces[boundary - 1]) - 1 : len(pieces[boundary - 1]) + 1]
    assert len(stop) == 2
    expected = full.text[: full.text.index(stop)]
    out = pipe("Tell me about the sea", greedy(48, stop_words=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == expected
    assert stop not in out.text
    streamed = "".join(d.text for d in pipe.stream("Tell me about the sea", greedy(48, stop_words=[stop])))
    assert streamed == expected


def test_stop_token_ids_and_min_new_tokens(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path)
    free = pipe("Hello", greedy(20))
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = pipe("Hello", GenerationConfig(max_new_tokens=20, stop_token_ids=[stop_id], ignore_eos=True))
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    held = pipe("Hello", GenerationConfig(max_new_tokens=20, min_new_tokens=12, stop_token_ids=[stop_id],
                                          ignore_eos=True))
    assert held.generate_token_len >= 12
    assert stop_id not in held.token_ids[:12]


def test_seeded_sampling_is_reproducible_in_any_batch(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path)
    cfg = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.95, top_k=50,
                           ignore_eos=True, seed=1234)
    alone = pipe("Once upon a time", cfg)
    batched = pipe(["Something else entirely", "Once upon a time", "Hi"], cfg)[1]
    assert alone.token_ids == batched.token_ids
    other = pipe("Once upon a time", GenerationConfig(**{**cfg.__dict__, "seed": 99}))
    assert other.token_ids != alone.token_ids
    greedy_out = pipe("Once upon a time", greedy(24))
    assert alone.token_ids != greedy_out.token_ids  # it really sampled
    top1 = pipe("Once upon a time", GenerationConfig(max_new_tokens=24, do_sample=True, top_k=1, ignore_eos=True))
    assert top1.token_ids == greedy_out.token_ids


def test_utf8_streaming_never_emits_broken_characters(demo_model_path):
    from transformers import AutoTokenizer

    from engine.tokenizer import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_path))
    text = "Chinese: 你好，世界！ emoji: 🙂👍🏽🎉 accents: café naïve. 汉字和表情😀混合"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:", add_special_tokens=False))
    deltas = [detok.add([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert sum(1 for d in deltas if d == "") > 0  # some tokens held back mid-character


def test_streamed_deltas_add_up_to_the_whole_reply(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path)
    cfg = GenerationConfig(max_new_tokens=40, do_sample=True, seed=7, ignore_eos=True)
    deltas = list(pipe.stream("Write something", cfg))
    whole = pipe("Write something", cfg)
    assert "".join(d.text for d in deltas) == whole.text
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_cancellation_frees_blocks_at_once_and_others_continue(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path)
    manager = pipe.engine.block_manager

    async def main():
        survivor = asyncio.create_task(_collect(pipe, greedy(30)))
        stream = pipe.generate("Cancel me", greedy(400))
        got = 0
        async for out in stream:
            got += len(out.token_ids)
            if got >= 5:
                break
        await stream.aclose()  # the consumer goes away
        return await survivor

    survivor_ids = asyncio.run(main())
    assert len(survivor_ids) == 30
    assert wait_until(lambda: manager.num_used_blocks == 0)
    assert pipe.engine.stats.num_aborted == 1


async def _collect(pipe, cfg):
    ids = []
    async for out in pipe.generate("I keep going", cfg):
        ids += out.token_ids
    return ids


def test_sync_stream_abandoned_midway_is_aborted(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path)
    stream = pipe.stream("Go on", greedy(400))
    next(stream)
    stream.close()
    assert wait_until(lambda: pipe.engine.block_manager.num_used_blocks == 0)


def test_prompt_longer_than_session_is_a_clear_error(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path, session_len=64)
    long_prompt = "word " * 200
    with pytest.raises(PromptTooLongError, match="session_len is 64"):
        pipe(long_prompt, greedy(4))
    assert pipe("short", greedy(4)).generate_token_len == 4  # and the engine still serves
    # a reply is cut at session_len, with finish_reason length
    out = pipe("short", greedy(500))
    assert out.finish_reason == "length" and out.input_token_len + out.generate_token_len == 64


def test_prompt_larger_than_whole_cache_is_a_clear_error(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path, num_gpu_blocks=2)
    with pytest.raises(PromptTooLongError, match="KV cache holds 32"):
        pipe("word " * 100, greedy(4))


def test_bad_model_folders_get_clear_errors(tmp_path, llama_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        pipeline(tmp_path / "nope", small_config())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no config.json.*a model folder holds config.json") as info:
        pipeline(tmp_path / "empty", small_config())
    assert "notes.txt" not in str(info.value)  # an error never lists a folder's entries
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((llama_path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPTBigCodeForCausalLM.*supported: LlamaForCausalLM"):
        pipeline(odd, small_config())
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((llama_path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        pipeline(noweights, small_config())


def test_internlm2_tokenizer_code_needs_trust_remote_code(tmp_path, internlm2_paths):
    import shutil

    from engine import TokenizerLoadError

    path = tmp_path / "il2"
    shutil.copytree(internlm2_paths[0], path)
    (path / "tokenizer.json").unlink()
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(TokenizerLoadError, match="--trust-remote-code"):
        pipeline(path, small_config())


def test_many_concurrent_streams(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path, max_batch_size=8)
    results = {}

    def run(i):
        results[i] = pipe(f"request number {i}", greedy(12 + i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(16))
    assert all(results[i].generate_token_len == 12 + i for i in range(16))
    assert pipe.engine.block_manager.num_used_blocks == 0
    mem = pipe.memory()
    assert mem["num_kv_blocks"] == mem["free_kv_blocks"] and mem["kv_bytes_per_token"] > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_overlapped_and_sequential_steps_agree(make_pipe, demo_model_path, overlap):
    """Launching step N+1 before step N's tokens are read must change nothing: tokens, text, counts, stops."""
    reference = make_pipe(demo_model_path, overlap_scheduling=False)
    pipe = make_pipe(demo_model_path, overlap_scheduling=overlap, num_gpu_blocks=20)
    cfgs = [greedy(30), GenerationConfig(max_new_tokens=25, do_sample=True, seed=3, ignore_eos=True),
            greedy(40, stop_words=["e"]), GenerationConfig(max_new_tokens=12, repetition_penalty=1.3),
            greedy(7)]
    prompts = PROMPTS + ["one more"]
    expected = [reference(p, c) for p, c in zip(prompts, cfgs)]
    results = {}

    def run(i):
        results[i] = pipe(prompts[i], cfgs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cfgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, exp in enumerate(expected):
        got = results[i]
        assert (got.token_ids, got.text, got.finish_reason, got.generate_token_len) == (
            exp.token_ids, exp.text, exp.finish_reason, exp.generate_token_len), i
    assert wait_until(lambda: pipe.engine.block_manager.num_used_blocks == 0)


def test_reply_cut_mid_character_keeps_the_partial_character(make_pipe, demo_model_path):
    """A reply whose last token ends inside a multi-byte character: the text still covers every token."""
    pipe = make_pipe(demo_model_path)
    tok = pipe.tokenizer
    emoji_ids = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji_ids) > 1
    from engine.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tok, [1])
    assert detok.add(emoji_ids[:1]) == ""  # held back: half a character
    assert detok.flush() == tok.decode(emoji_ids[:1])  # at the end it is released, not dropped


def test_engine_shutdown_ends_queued_requests(demo_model_path):
    from engine import pipeline as make

    pipe = make(demo_model_path, small_config())
    outputs = []
    pipe.engine.add_request(pipe.encode("hi"), greedy(400), outputs.append)
    pipe.close()
    assert outputs and outputs[-1].finished and outputs[-1].finish_reason in ("abort", "length")
    assert not pipe.engine.is_alive


def test_requests_racing_shutdown_end_or_are_refused(demo_model_path):
    # submitters racing the loop's exit: each request is refused (EngineStoppedError) or gets its final update,
    # none is queued after the loop took its last commands; calls after it are refused too, never left waiting
    from engine import pipeline as make
    from engine.errors import EngineStoppedError

    pipe = make(demo_model_path, small_config())
    ids = pipe.encode("hi")
    accepted, refused, ended = [], [], []
    go = threading.Event()

    def submit():
        go.wait()
        while True:
            try:
                accepted.append(pipe.engine.add_request(ids, greedy(4), lambda out: out.finished and ended.append(out)))
            except EngineStoppedError:
                refused.append(True)
                return

    threads = [threading.Thread(target=submit, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    go.set()
    assert wait_until(lambda: len(accepted) >= 20, timeout=60)
    pipe.close()
    for t in threads:
        t.join(timeout=60)
    assert len(refused) == 4
    assert wait_until(lambda: len(ended) == len(accepted), timeout=60), f"{len(accepted) - len(ended)} lost"
    with pytest.raises(EngineStoppedError):
        within(60, pipe.engine.run_on_engine_thread, lambda: None)


def test_a_crashed_loop_fails_its_requests_and_refuses_more(demo_model_path, monkeypatch):
    # a bug that escapes the step loop kills it: the request it held ends with an error saying why, later ones
    # and calls are refused with it, and nothing waits forever
    from engine import pipeline as make
    from engine.errors import EngineStoppedError

    pipe = make(demo_model_path, small_config())
    try:
        def broken():
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(pipe.engine.scheduler, "schedule", broken)
        out = within(60, pipe, "hi", greedy(4))
        assert out.finish_reason == "error" and "scheduler bug" in out.error
        assert wait_until(lambda: not pipe.engine._thread.is_alive(), timeout=60)
        assert not pipe.engine.is_alive and "scheduler bug" in pipe.engine.fatal_error
        with pytest.raises(EngineStoppedError, match="scheduler bug"):
            within(60, pipe, "hi", greedy(4))
        with pytest.raises(EngineStoppedError, match="scheduler bug"):
            within(60, pipe.engine.run_on_engine_thread, lambda: None)
    finally:
        pipe.close()


def test_unencodable_prompt_is_a_value_error(make_pipe, demo_model_path):
    pipe = make_pipe(demo_model_path)
    with pytest.raises(ValueError):
        pipe("bad \ud800 surrogate", greedy(4))


def test_min_new_tokens_bans_only_ids_that_would_end_the_sequence(make_pipe, demo_model_path):
    # greedy with min_new_tokens and ignore_eos (what benchmarks send) needs no per-row sampling tensors: EOS cannot
    # end such a sequence, so nothing is banned and the argmax-only fast path runs; without ignore_eos EOS is banned
    from engine.sequence import SamplingState, Sequence

    runner = make_pipe(demo_model_path).engine.runner

    def batch(eos, **kw):
        gc = GenerationConfig(max_new_tokens=8, min_new_tokens=8, **kw)
        return runner.sampling_batch([Sequence([5, 6], SamplingState(gc, 0, frozenset(eos)), 64, 16)])

    fast = batch([], ignore_eos=True)
    assert fast.all_greedy and fast.temperatures is None and fast.banned_ids is None
    held = batch([2])
    assert held.banned_ids is not None and held.banned_ids.tolist() == [[2]]
    stop = batch([], ignore_eos=True, stop_token_ids=[7])
    assert stop.banned_ids.tolist() == [[7]]
