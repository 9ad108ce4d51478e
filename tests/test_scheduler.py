"""Continuous batching: requests join the running batch between decode steps,
up to max_batch_size, leave it when done or cancelled, and get the same tokens
they would alone. The fake backend for the policy; the tiny llama for each real
backend's ``merge``."""

from __future__ import annotations

import threading

import pytest

import llmk
from llmk.scheduler import QueueFullError
from llmk.testing import load_fake

PROMPTS = ["Hello", "The cat sat on the mat and", "Once upon a time", "a b c d e f g h"]


def alone(handle, prompt, max_tokens):
    return handle.generate(prompt, max_tokens=max_tokens, temperature=0).token_ids


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


def test_a_late_request_joins_the_running_batch(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.005})
    expected = {p: alone(handle, p, 12) for p in PROMPTS[:2]}
    scheduler = handle.version.engine.scheduler
    scheduler.batch_sizes.clear()
    first = handle.stream(PROMPTS[0], max_tokens=12, temperature=0)
    ids = list(next(first).token_ids)  # the first request is decoding now
    second = handle.generate(PROMPTS[1], max_tokens=12, temperature=0)
    ids += [t for chunk in first for t in chunk.token_ids]
    assert ids == expected[PROMPTS[0]] and second.token_ids == expected[PROMPTS[1]]
    assert 2 in scheduler.batch_sizes  # they shared decode steps


@pytest.mark.parametrize("merge", [True, False])
def test_concurrent_requests_get_what_they_get_alone(kernel, merge):
    handle = load_fake(kernel, "m", options={"delay": 0.002, "merge": merge}, max_batch_size=3)
    expected = [alone(handle, p, 10) for p in PROMPTS]
    got = run_all(lambda p: alone(handle, p, 10), PROMPTS * 2)
    assert got == expected * 2
    sizes = handle.version.engine.scheduler.batch_sizes
    assert max(sizes) <= 3  # max_batch_size holds
    if merge:
        assert max(sizes) > 1


def test_a_closed_stream_leaves_the_batch(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.002})
    scheduler = handle.version.engine.scheduler
    stream = handle.stream("Hello", max_tokens=10_000, temperature=0)
    next(stream)
    stream.close()
    steps = scheduler.steps
    threading.Event().wait(0.05)
    assert scheduler.steps - steps <= 1 and scheduler.in_flight == 0
    assert handle.status()["active_requests"] == 0


def test_a_request_past_its_deadline_ends_with_timeout(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.01})
    engine = handle.version.engine
    request = engine.submit(engine.prompt_ids("Hello"), llmk.SamplingParams(max_tokens=1000), timeout=0.05)
    chunks = list(request)
    assert chunks[-1].finish_reason == "timeout" and 0 < len(chunks) < 1000


def test_a_full_queue_is_refused(kernel):
    handle = load_fake(kernel, "m", options={"delay": 0.02}, max_batch_size=1)
    engine = handle.version.engine
    engine.scheduler.max_queue = 1
    params = llmk.SamplingParams(max_tokens=50, temperature=0)
    running = engine.submit(engine.prompt_ids("Hello"), params)
    next(iter(running))  # admitted: the queue is empty again
    waiting = engine.submit(engine.prompt_ids("Hello"), params)
    with pytest.raises(QueueFullError, match="'m' has 1 requests waiting"):
        engine.submit(engine.prompt_ids("Hello"), params)
    running.cancel()
    waiting.cancel()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_merge_on_each_backend_keeps_greedy_output(backend, tiny_llama, tmp_path):
    with llmk.Kernel(cache_dir=tmp_path, autoload=False) as kernel:
        handle = kernel.load("m", source=str(tiny_llama), backend=backend, max_batch_size=4)
        expected = [alone(handle, p, 16) for p in PROMPTS]
        scheduler = handle.version.engine.scheduler
        scheduler.batch_sizes.clear()
        # Staggered: each request starts once the previous one is decoding, so it
        # is merged into a batch whose cache is longer or shorter than its own.
        streams, ids = [], []
        for prompt in PROMPTS:
            stream = handle.stream(prompt, max_tokens=16, temperature=0)
            first = next(stream)
            streams.append(stream)
            ids.append(list(first.token_ids))
        for index, stream in enumerate(streams):
            ids[index] += [t for chunk in stream for t in chunk.token_ids]
        assert ids == expected
        assert max(scheduler.batch_sizes) > 1
