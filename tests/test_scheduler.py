"""The engine loop (``llmk.scheduler``) on the fake backend: token-budget steps with
chunked prefill, continuous batching without per-join copies, KV admission,
prefix caching, cancellation between chunks, failure isolation and thread-free
async streaming. The fake runner computes its logits from what its KV cache
holds (``FakeRunner``), so a wrong block, position or reused prefix shows up as
a token that differs from ``runner.expected(...)``."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from conftest import wait_for

import llmk
from llmk.scheduler import QueueFullError
from llmk.testing import load_fake

PROMPTS = ["Hello", "The cat sat on the mat and", "Once upon a time", "a b c d e f g h"]
LONG = " ".join(llmk.testing.tiny_corpus()[:4])  # ~70 tokens


def ids_of(handle, prompt):
    return handle.version.engine.prompt_ids(prompt)


def expected(handle, prompt, max_tokens):
    return handle.version.engine.runner.expected(ids_of(handle, prompt), max_tokens)


def run_all(function, items):
    results: dict = {}

    def target(index, item):
        try:
            results[index] = function(item)
        except Exception as error:  # noqa: BLE001 - handed to the test
            results[index] = error

    threads = [threading.Thread(target=target, args=(i, item)) for i, item in enumerate(items)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return [results[i] for i in range(len(items))]


@pytest.mark.parametrize("contiguous", [False, True])
def test_concurrent_requests_get_what_they_get_alone(kernel, contiguous):
    handle = load_fake(kernel, "m", options={"delay": 0.002, "contiguous": contiguous, "memory_span": 1000},
                       max_batch_size=3, prefill_chunk=8)
    got = run_all(lambda p: handle.generate(p, max_tokens=10, temperature=0).token_ids, [*PROMPTS, LONG] * 2)
    assert got == [expected(handle, p, 10) for p in [*PROMPTS, LONG] * 2]
    steps = handle.version.engine.runner.steps
    assert max(len(step) for step in steps) <= 3  # max_batch_size holds
    assert max(len(step) for step in steps) > 1  # and requests shared steps


def test_a_late_request_joins_the_running_batch(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.001})
    engine = handle.version.engine
    first = engine.submit(ids_of(handle, PROMPTS[0]), llmk.SamplingParams(max_tokens=2000, temperature=0))
    next(iter(first))  # decoding now, and for another ~2 s
    second = handle.generate(PROMPTS[1], max_tokens=12, temperature=0)
    assert first.finished is None  # still running: the second one joined it
    first.cancel()
    assert second.token_ids == expected(handle, PROMPTS[1], 12)
    # Joining cost the newcomer's prompt only: no step re-ran the first sequence's prompt.
    slot_of_first = engine.runner.steps[0][0][0]
    assert all(count == 1 for step in engine.runner.steps[1:] for slot, _, count, _ in step if slot == slot_of_first)
    assert any(len(step) == 2 for step in engine.runner.steps)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.001, "memory_span": 1000}, prefill_chunk=8)
    engine = handle.version.engine
    runner = engine.runner
    streaming = engine.submit(ids_of(handle, "Hello"), llmk.SamplingParams(max_tokens=2000, temperature=0))
    next(iter(streaming))
    calls = len(runner.steps)
    long_ids = ids_of(handle, LONG)
    result = handle.generate(LONG, max_tokens=3, temperature=0)
    streaming.cancel()
    assert result.token_ids == runner.expected(long_ids, 3)
    steps = runner.steps[calls:]
    slot = next(s for step in steps for s, start, count, _ in step if start == 0 and count > 1)  # the long one
    chunks = [(start, count) for step in steps for s, start, count, _ in step if s == slot and start < len(long_ids)]
    assert sum(count for _, count in chunks) == len(long_ids)  # the whole prompt, once
    assert chunks[0] == (0, 8) and max(count for _, count in chunks) <= 8  # never more than the budget
    assert all(start + count == following for (start, count), (following, _) in zip(chunks, chunks[1:]))
    assert chunks[-2][1] < 8  # later tokens attend to more positions: they count for more of the budget
    # Every step that computed a chunk also decoded the other stream.
    assert all(len(step) == 2 for step in steps if any(s == slot and start < len(long_ids) for s, start, _, _ in step))


def test_gauges_show_a_prefill_in_progress(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.05}, prefill_chunk=4)
    engine = handle.version.engine
    request = engine.submit(ids_of(handle, LONG), llmk.SamplingParams(max_tokens=2, temperature=0))
    wait_for(lambda: engine.backlog()["prefilling"] == 1 and engine.backlog()["prefill_tokens_pending"] > 0)
    status = handle.status()
    assert status["running"] == 1 and status["prefilling"] == 1
    assert 0 < status["prefill_tokens_pending"] < len(ids_of(handle, LONG))
    request.cancel()
    assert list(request)[-1].finish_reason == "cancelled"
    wait_for(lambda: engine.backlog() == {"queued": 0, "running": 0, "prefilling": 0,
                                          "prefill_tokens_pending": 0})


@pytest.mark.parametrize("reason", ["cancelled", "timeout"])
def test_a_long_prefill_stops_within_one_chunk(kernel, reason):
    handle = load_fake(kernel, "m", options={"delay": 0.02}, prefill_chunk=4)
    engine, runner = handle.version.engine, handle.version.engine.runner
    prompt = ids_of(handle, LONG * 4)
    request = engine.submit(prompt, llmk.SamplingParams(max_tokens=2, temperature=0),
                            timeout=0.2 if reason == "timeout" else None)
    wait_for(lambda: len(runner.steps) >= 2)
    if reason == "cancelled":
        request.cancel()
        stopped_at = len(runner.steps)
    chunks = list(request)
    assert chunks[-1].finish_reason == reason and not any(c.token_ids for c in chunks)
    wait_for(lambda: engine.backlog()["running"] == 0)
    computed = sum(count for step in runner.steps for _, _, count, _ in step)
    assert computed < len(prompt)  # it never finished the prompt
    if reason == "cancelled":
        assert len(runner.steps) <= stopped_at + 1
    assert engine.cache_stats()["kv_used_tokens"] == 0 and engine.cache_stats()["kv_reserved_tokens"] == 0


def test_a_closed_stream_leaves_the_batch(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.002})
    engine = handle.version.engine
    stream = handle.stream("Hello", max_tokens=10_000, temperature=0)
    next(stream)
    stream.close()
    wait_for(lambda: engine.backlog()["running"] == 0)
    steps = engine.scheduler.steps
    threading.Event().wait(0.05)
    assert engine.scheduler.steps == steps  # nothing runs for it any more
    assert handle.status()["active_requests"] == 0


def test_a_request_past_its_deadline_ends_with_timeout(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.01})
    engine = handle.version.engine
    request = engine.submit(ids_of(handle, "Hello"), llmk.SamplingParams(max_tokens=1000), timeout=0.05)
    chunks = list(request)
    assert chunks[-1].finish_reason == "timeout" and 0 < len(chunks) < 1000


def test_a_full_queue_is_refused(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.02}, max_batch_size=1)
    engine = handle.version.engine
    engine.scheduler.max_queue = 1
    params = llmk.SamplingParams(max_tokens=50, temperature=0)
    running = engine.submit(ids_of(handle, "Hello"), params)
    next(iter(running))  # admitted: the queue is empty again
    waiting = engine.submit(ids_of(handle, "Hello"), params)
    with pytest.raises(QueueFullError, match=r"'m' has 1 requests waiting, its queue limit \(1 beyond a full batch\)"):
        engine.submit(ids_of(handle, "Hello"), params)
    running.cancel()
    waiting.cancel()


# -- the KV cache -----------------------------------------------------------------------


def test_admission_waits_for_kv_room_instead_of_overcommitting(kernel):
    # Room for one sequence of 64 positions at a time (blocks of 4).
    handle = load_fake(kernel, "m", options={"delay": 0.002}, kv_cache=64, max_batch_size=4)
    engine = handle.version.engine
    params = llmk.SamplingParams(max_tokens=40, temperature=0)
    first = engine.submit(ids_of(handle, PROMPTS[1]), params)
    next(iter(first))
    second = engine.submit(ids_of(handle, PROMPTS[2]), params)
    assert engine.backlog()["queued"] == 1 and engine.backlog()["running"] == 1  # waiting for room
    rest = [c for c in first]
    stats = engine.cache_stats()
    assert stats["kv_used_tokens"] + stats["kv_reserved_tokens"] <= stats["kv_capacity_tokens"]
    ids = [t for c in second for t in c.token_ids]
    assert ids == expected(handle, PROMPTS[2], 40) and rest[-1].finish_reason == "length"


def test_a_request_larger_than_the_whole_cache_is_refused_at_once(kernel):
    handle = load_fake(kernel, "m", kv_cache=32)
    with pytest.raises(llmk.OptionsError, match="needs .* tokens of KV cache; model 'm' has room for 32"):
        handle.generate(LONG, max_tokens=10)
    assert handle.generate("Hi", max_tokens=4).completion_tokens == 4


@pytest.mark.parametrize("contiguous", [False, True])
def test_a_repeated_prefix_is_reused_exactly(kernel, contiguous):
    handle = load_fake(kernel, "m", options={"contiguous": contiguous, "memory_span": 10_000})
    engine = handle.version.engine
    system = LONG
    first = handle.generate(system + " What is the river?", max_tokens=8, temperature=0)
    calls = len(engine.runner.steps)
    second = handle.generate(system + " Who is the baker?", max_tokens=8, temperature=0)
    assert first.token_ids == expected(handle, system + " What is the river?", 8)
    assert second.token_ids == expected(handle, system + " Who is the baker?", 8)
    stats = engine.cache_stats()
    shared = len(ids_of(handle, system)) // 4 * 4
    assert stats["prefix_cache_reused_tokens"] >= shared - 4
    # The second prompt's first step started after the reused prefix.
    ((_, start, count, _),) = engine.runner.steps[calls]
    assert start == stats["prefix_cache_reused_tokens"]
    assert start + count == len(ids_of(handle, system + " Who is the baker?"))


def test_a_prefix_cached_in_another_slot_is_copied(kernel):
    # Contiguous layout: the slot holding the prefix is busy, so the prefix is copied.
    handle = load_fake(kernel, "m", options={"contiguous": True, "memory_span": 10_000, "delay": 0.002},
                       max_batch_size=2, kv_cache=4096)
    engine = handle.version.engine
    handle.generate(LONG + " one", max_tokens=2, temperature=0)
    busy = engine.submit(ids_of(handle, LONG + " two"), llmk.SamplingParams(max_tokens=1000, temperature=0))
    next(iter(busy))  # it took the slot that holds the prefix, for another ~2 s
    third = handle.generate(LONG + " three", max_tokens=8, temperature=0)
    assert busy.finished is None
    busy.cancel()
    assert third.token_ids == expected(handle, LONG + " three", 8)
    assert engine.runner.copies  # copied, not recomputed
    assert engine.cache_stats()["prefix_cache_reused_tokens"] >= 2 * (len(ids_of(handle, LONG)) // 4 * 4 - 4)


def test_a_submitter_never_waits_on_a_prefix_copy(kernel, monkeypatch):
    # A copy is a runner call; while the engine makes one, requests still queue (an
    # event loop that submits must not stall on the runner).
    handle = load_fake(kernel, "m", options={"contiguous": True, "memory_span": 10_000, "delay": 0.002},
                       max_batch_size=2, kv_cache=4096)
    engine = handle.version.engine
    handle.generate(LONG + " one", max_tokens=2, temperature=0)
    busy = engine.submit(ids_of(handle, LONG + " two"), llmk.SamplingParams(max_tokens=1000, temperature=0))
    next(iter(busy))  # it holds the slot with the prefix: the next one copies it
    copying, go_on = threading.Event(), threading.Event()
    copy_blocks = engine.runner.copy_blocks

    def held_copy(pairs):
        copying.set()
        go_on.wait(60)
        copy_blocks(pairs)

    monkeypatch.setattr(engine.runner, "copy_blocks", held_copy)
    third = engine.submit(ids_of(handle, LONG + " three"), llmk.SamplingParams(max_tokens=4, temperature=0))
    assert copying.wait(60)
    queued = []
    submitter = threading.Thread(target=lambda: queued.append(
        engine.submit(ids_of(handle, "Hello"), llmk.SamplingParams(max_tokens=4, temperature=0))))
    submitter.start()
    submitter.join(30)
    backlog = engine.backlog()
    go_on.set()
    assert queued, "submit waited for the engine's copy"
    assert (backlog["queued"], backlog["running"]) == (2, 1)  # the one being admitted still counts as queued
    busy.cancel()
    assert [t for c in third for t in c.token_ids] == expected(handle, LONG + " three", 4)
    assert [t for c in queued[0] for t in c.token_ids] == expected(handle, "Hello", 4)


def test_prefix_caching_can_be_turned_off(kernel):
    handle = load_fake(kernel, "m", prefix_caching=False)
    handle.generate(LONG, max_tokens=2)
    handle.generate(LONG, max_tokens=2)
    assert handle.version.engine.cache_stats()["prefix_cache_reused_tokens"] == 0


# -- failures -------------------------------------------------------------------------------


def test_a_failing_step_fails_only_the_requests_it_concerns(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.002, "fail_on_token": 2, "memory_span": 1000})
    engine = handle.version.engine
    others = [engine.submit(ids_of(handle, p), llmk.SamplingParams(max_tokens=30, temperature=0))
              for p in PROMPTS[1:]]
    bad = engine.submit([*ids_of(handle, "Hello"), 2], llmk.SamplingParams(max_tokens=30, temperature=0))
    with pytest.raises(ValueError, match="fail_on_token"):
        list(bad)
    for prompt, request in zip(PROMPTS[1:], others):
        assert [t for c in request for t in c.token_ids] == expected(handle, prompt, 30)
    wait_for(lambda: engine.backlog()["running"] == 0)
    assert engine.cache_stats()["kv_used_tokens"] == 0  # the failed request's cache was freed
    assert handle.generate("Hi", max_tokens=3).completion_tokens == 3  # and the model still serves


def test_a_processor_that_raises_fails_its_request_only(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.002})

    def broken(output_ids, logits):
        raise RuntimeError("broken processor")

    other = handle.version.engine.submit(ids_of(handle, "Hello"), llmk.SamplingParams(max_tokens=20, temperature=0))
    with pytest.raises(RuntimeError, match="broken processor"):
        handle.generate("Hi", max_tokens=5, logits_processors=[broken])
    assert [t for c in other for t in c.token_ids] == expected(handle, "Hello", 20)


def test_an_engine_that_is_closed_fails_its_readers(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.01})
    engine = handle.version.engine
    request = engine.submit(ids_of(handle, "Hello"), llmk.SamplingParams(max_tokens=1000))
    next(iter(request))
    threading.Thread(target=engine.scheduler.close).start()
    with pytest.raises(llmk.LlmkError, match="unloaded"):
        list(request)


# -- sampling hooks -------------------------------------------------------------------------


def test_a_token_mask_constrains_every_step(kernel):
    handle = load_fake(kernel, "m")
    runner = handle.version.engine.runner
    allowed = runner.text_ids[:5]
    mask = np.zeros(runner.vocab_size, dtype=bool)
    mask[allowed] = True
    result = handle.generate("Hello", max_tokens=12, temperature=0, logits_processors=[llmk.TokenMask(lambda _: mask)])
    assert len(result.token_ids) == 12 and set(result.token_ids) <= set(allowed)
    sampled = handle.generate("Hello", max_tokens=12, temperature=1.0, seed=3,
                              logits_processors=[llmk.TokenMask(lambda _: mask)])
    assert set(sampled.token_ids) <= set(allowed)


def test_a_mask_that_allows_nothing_is_an_error(kernel):
    handle = load_fake(kernel, "m")
    nothing = np.zeros(handle.version.engine.runner.vocab_size, dtype=bool)
    with pytest.raises(llmk.OptionsError, match="allows no token"):
        handle.generate("Hello", max_tokens=3, logits_processors=[llmk.TokenMask(lambda _: nothing)])


# -- async streaming ----------------------------------------------------------------------


def test_async_streams_need_no_thread_per_request(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.001}, max_batch_size=16)

    async def main():
        async def one(prompt):
            return [t async for c in handle.astream(prompt, max_tokens=20, temperature=0) for t in c.token_ids]

        before = threading.active_count()
        tasks = [asyncio.create_task(one(p)) for p in PROMPTS * 4]
        await asyncio.sleep(0.05)
        during = threading.active_count()
        return await asyncio.gather(*tasks), during - before

    results, extra_threads = asyncio.run(main())
    assert results == [expected(handle, p, 20) for p in PROMPTS * 4]
    assert extra_threads <= 1  # the model's engine thread, nothing per request


def test_an_async_stream_left_early_is_cancelled(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.002})
    engine = handle.version.engine

    async def main():
        stream = handle.astream("Hello", max_tokens=10_000, temperature=0)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    wait_for(lambda: engine.backlog()["running"] == 0)
    assert handle.status()["active_requests"] == 0


def test_async_stream_start_raises_bad_input_before_the_first_chunk(kernel):
    handle = load_fake(kernel, "m", options={"max_context": 16})

    async def main():
        stream = handle.astream("The cat walks to the river " * 5, max_tokens=2)
        with pytest.raises(llmk.OptionsError, match="context"):
            await stream.start()

    asyncio.run(main())
    assert handle.status()["rejected"] == 1 and handle.status()["active_requests"] == 0
