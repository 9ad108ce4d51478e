"""Aggregate throughput of OpenAI-compatible servers with 1, 4 and 8 concurrent
clients: ``llmk serve`` and the peers' servers, the same prompts, the same
``openai`` client.

Each client runs ``rounds`` greedy completions of ``tokens`` tokens back to
back; a figure is generated tokens (as the server's ``usage`` counts them) per
second of wall time, from the first request sent to the last answer received.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PROMPTS = ["Once upon a time", "The capital of France is", "Write a short poem about the sea.",
           "Explain gravity to a child.", "List three colours:", "My favourite food is",
           "In the year 2050,", "The best way to learn is"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, path: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before it was ready")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} was not ready after {timeout:g}s")
        time.sleep(0.5)


@contextlib.contextmanager
def llmk_server(python: str, source: str, backend: str, passes: list[str], cache_dir: str | None,
                max_batch_size: int = 8) -> Iterator[str]:
    """``llmk serve`` with one model, ``bench``; yields its base URL."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "llmk.yaml"
        model = {"source": source, "backend": backend, "passes": passes, "max_batch_size": max_batch_size}
        config.write_text(f"server: {{port: 0}}\nmodels:\n  bench: {json.dumps(model)}\n")
        args = [python, "-m", "llmk.cli"] + (["--cache-dir", cache_dir] if cache_dir else [])
        process = subprocess.Popen([*args, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                match = re.search(r"listening on (http://\S+)", line)
                if match:
                    url = match.group(1)
                    break
            else:
                raise RuntimeError("llmk serve exited before it listened")
            _wait(url, process, "/ready")
            yield url
        finally:
            process.terminate()
            process.wait(60)


@contextlib.contextmanager
def llama_cpp_server(python: str, gguf: Path, threads: int) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on the GGUF file; yields its base URL."""
    port = _free_port()
    process = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench", "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
         # Its default lets each new request cut the running one short; every client must get its whole answer.
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, process, "/v1/models")
        yield url
    finally:
        process.terminate()
        process.wait(60)


def throughput(url: str, clients: int, rounds: int, tokens: int) -> float:
    """Generated tokens per second, all clients together."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def work(index: int) -> int:
        done = 0
        for r in range(rounds):
            prompt = PROMPTS[(index + r) % len(PROMPTS)]
            response = client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0)
            done += response.usage.completion_tokens
        return done

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(work, range(clients)))
    return total / (time.perf_counter() - started)


def measure(url: str, client_counts: list[int], *, runs: int, rounds: int, tokens: int) -> dict[int, list[float]]:
    """Every client count ``runs`` times, interleaved, after one warm-up request."""
    throughput(url, 1, 1, 4)
    figures: dict[int, list[float]] = {n: [] for n in client_counts}
    for _ in range(runs):
        for clients in client_counts:
            figures[clients].append(throughput(url, clients, rounds, tokens))
    return figures
