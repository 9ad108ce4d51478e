"""The serving figures: OpenAI-compatible servers under concurrent streaming
clients, ``llmk serve`` beside llama.cpp's own server (``llama-server``), the same
prompts, the same ``openai`` client, every server started fresh for the run.

Every request is a streaming chat completion (``stream=True``), greedy, and a
token's time is when its chunk reaches the client. The figures, each measured
``runs`` times with the servers' runs interleaved:

- **load**: N clients, each running ``rounds`` requests of ``tokens`` tokens back
  to back. *Aggregate tokens/s* is every generated token over the wall time from
  the first request sent to the last token received; *TTFT* (time to first
  token: from sending a request to its first content token) is given as the
  p50 and p95 of the run's requests.
- **interference**: 8 clients streaming (each sends its next request when an
  answer ends); then one request with a ~4,000-token prompt arrives. The figure
  is the *longest wait between consecutive tokens of any of those streams while
  that prompt is prefilled* (from its arrival to its first token), beside the
  waits before it arrived and the long request's TTFT.
- **prefix reuse**: a ~1,500-token system prompt sent twice, one request after
  the other, with different questions: the second request's TTFT as a fraction
  of the first's.

The prompts are real text (the paragraphs of ``llmk/data/*.txt``, repeated to
length), and each starts with its own request number, so no request finds
another's prompt in a server's cache except where the figure is about that
(prefix reuse); the numbers run the same way on every server. Generated tokens
are the server's own count (``usage``, asked for with
``stream_options={"include_usage": true}``) where a server gives it in a stream
(the warm-up request finds out), else the content chunks received.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data"
#: The interference figure: streams running when the long prompt arrives, its size
#: in characters (~4,000 tokens of this text), and the most tokens of one streamed answer.
STREAMS = 8
LONG_PROMPT_CHARS = 18_300
STREAM_TOKENS = 512
#: Requests one of those clients may send, one after the other, while the figure runs.
CHAIN = 100
#: Seconds the 8 streams run, all of them past their first token, before the long prompt arrives.
SETTLE_SECONDS = 1.0
#: The prefix-reuse figure: the shared system prompt (~1,500 tokens of this text).
PREFIX_CHARS = 6_600
QUESTIONS = ("What is the main subject of the document?", "Which numbers does the document mention?")
#: The figures ``measure`` can take, in the order each run takes them.
PARTS = ("load", "interference", "prefix")

Messages = list[dict[str, str]]


# -- prompts --


def paragraphs() -> list[str]:
    """The paragraphs of ``llmk/data/*.txt``, in order."""
    return [p.strip() for path in sorted(DATA.glob("*.txt")) for p in path.read_text().split("\n\n") if p.strip()]


def text(seed: int, chars: int) -> str:
    """At least ``chars`` characters of real text: the paragraphs from number ``seed`` on, cycling."""
    parts = paragraphs()
    chosen: list[str] = []
    while sum(len(p) + 2 for p in chosen) < chars:
        chosen.append(parts[(seed + len(chosen)) % len(parts)])
    return "\n\n".join(chosen)


def sentences() -> list[str]:
    """The sentences of those paragraphs, in order."""
    return [found.strip() for p in paragraphs() for found in re.findall(r"[^.!?]+[.!?]+(?=\s|$)", p)]


def short_prompt(number: int) -> Messages:
    """Request ``number`` of the load figure: continue a sentence (15–60 tokens with
    the request number and the instruction), so that generating, not prefilling,
    is most of the work."""
    every = sentences()
    return [{"role": "user", "content": f"Request {number}. Continue this text: {every[number % len(every)]}"}]


def long_prompt(number: int) -> Messages:
    """The interference figure's late request: summarise ~4,000 tokens of text."""
    return [{"role": "user", "content": f"Request {number}. Summarise this text:\n\n{text(number, LONG_PROMPT_CHARS)}"}]


def prefix_prompt(number: int, question: str) -> Messages:
    """A question about a ~1,500-token document given as the system prompt; the
    document (and its first line, with ``number``) is the same for both questions."""
    system = f"Session {number}. Answer questions about this document.\n\n{text(number, PREFIX_CHARS)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


# -- statistics on what the clients saw --


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``, linearly interpolated
    between the two nearest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def waits(times: list[float]) -> list[tuple[float, float]]:
    """Consecutive token arrivals of one stream, as (earlier, later) pairs."""
    return list(zip(times, times[1:]))


def longest_wait(streams: list[list[float]], start: float, end: float) -> float | None:
    """The longest wait between consecutive tokens of any stream that overlaps
    ``[start, end]``; None when no stream was waiting in that window. A wait that
    began before ``start`` or ended after ``end`` counts whole: a client waits
    all of it."""
    found = [b - a for times in streams for a, b in waits(times) if b > start and a < end]
    return max(found, default=None)


def steady_wait(streams: list[list[float]], start: float, end: float) -> float | None:
    """The median wait between consecutive tokens of the streams, over the waits
    that lie within ``[start, end]``."""
    found = [b - a for times in streams for a, b in waits(times) if a >= start and b <= end]
    return percentile(found, 50) if found else None


# -- the clients --


@dataclass
class Stream:
    """One streamed completion as its client saw it (``time.perf_counter`` seconds)."""

    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # the arrival of each content chunk
    usage: int | None = None  # completion tokens, as the server counted them
    prompt_tokens: int | None = None

    @property
    def generated(self) -> int:
        return self.usage if self.usage is not None else len(self.times)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent


class Client:
    """The ``openai`` client on one server; finds out on its first request (the
    warm-up) whether the server counts a stream's tokens (``include_usage``)."""

    def __init__(self, url: str) -> None:
        import openai

        self.api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        self.numbers = 0
        try:
            self.usage = True
            self.usage = self.stream(short_prompt(self.reserve(1)), 4).usage is not None
        except openai.BadRequestError:  # the server refuses stream_options
            self.usage = False
            self.stream(short_prompt(self.reserve(1)), 4)

    def reserve(self, count: int) -> int:
        """The first of ``count`` request numbers that no earlier request used."""
        first, self.numbers = self.numbers, self.numbers + count
        return first

    def stream(self, messages: Messages, tokens: int, record: Stream | None = None,
               stop: Callable[[Stream], bool] | None = None) -> Stream:
        """Stream one greedy chat completion of at most ``tokens`` tokens into
        ``record``; reading stops (and the request is closed) once ``stop`` says so."""
        record = record or Stream()
        options = {"stream_options": {"include_usage": True}} if self.usage else {}
        record.sent = time.perf_counter()
        response = self.api.chat.completions.create(model="bench", messages=messages, max_tokens=tokens,  # type: ignore
                                                    temperature=0, stream=True, **options)
        with response:
            for chunk in response:
                if chunk.choices and chunk.choices[0].delta.content:
                    record.times.append(time.perf_counter())
                if chunk.usage:
                    record.usage, record.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
                if stop and stop(record):
                    break
        return record


def load(client: Client, clients: int, rounds: int, tokens: int) -> dict[str, float]:
    """``clients`` clients, each running ``rounds`` requests back to back:
    aggregate generated tokens/s, and TTFT p50 and p95 (seconds)."""
    first = client.reserve(clients * rounds)

    def work(index: int) -> list[Stream]:
        return [client.stream(short_prompt(first + index * rounds + r), tokens) for r in range(rounds)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        streams = [s for done in pool.map(work, range(clients)) for s in done]
    answered = [s for s in streams if s.times]
    ended = max(s.times[-1] for s in answered)
    ttfts = [s.ttft for s in answered]
    return {"tokens_per_s": sum(s.generated for s in streams) / (ended - started),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95)}


def interference(client: Client) -> dict[str, float]:
    """8 clients streaming, then a ~4,000-token prompt: the longest wait between two
    tokens of any stream from its arrival to its first token (``max_wait_s``), the
    median wait before it arrived (``steady_wait_s``), its TTFT (``long_ttft_s``),
    how many streams ran in that time (``streams``) and its size (``long_prompt_tokens``,
    where the server counts it). A client whose answer ends sends its next request,
    so 8 streams run until the long prompt's first token; only waits within an
    answer count, not a new request's TTFT."""
    first = client.reserve(STREAMS * CHAIN + 1)
    chains: list[list[Stream]] = [[] for _ in range(STREAMS)]
    window = {"end": math.inf}

    def past_window(record: Stream) -> bool:
        return bool(record.times) and record.times[-1] > window["end"]

    def keep_streaming(index: int) -> None:
        while window["end"] == math.inf and len(chains[index]) < CHAIN:
            chains[index].append(Stream())
            client.stream(short_prompt(first + index * CHAIN + len(chains[index])), STREAM_TOKENS, chains[index][-1],
                          past_window)

    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        running = [pool.submit(keep_streaming, i) for i in range(STREAMS)]
        while not all(chain and chain[0].times for chain in chains):
            if any(f.done() for f in running):
                break
            time.sleep(0.01)
        settled = time.perf_counter()
        time.sleep(SETTLE_SECONDS)
        try:
            late = client.stream(long_prompt(first + STREAMS * CHAIN), 4)  # to its end: its size comes last
        except Exception:
            window["end"] = -math.inf  # the clients stop at their next token
            raise
        window["end"] = late.times[0] if late.times else -math.inf
        for f in running:
            f.result()
    arrived, started = late.sent, late.times[0]
    streams = [r.times for chain in chains for r in chain]
    during = sum(1 for times in streams if times and times[0] < started and times[-1] > arrived)
    figures = {"long_ttft_s": started - arrived, "streams": float(during)}
    longest, steady = longest_wait(streams, arrived, started), steady_wait(streams, settled, arrived)
    if longest is not None:
        figures["max_wait_s"] = longest
    if steady is not None:
        figures["steady_wait_s"] = steady
    if late.prompt_tokens:
        figures["long_prompt_tokens"] = float(late.prompt_tokens)
    return figures


def prefix_reuse(client: Client) -> dict[str, float]:
    """A ~1,500-token system prompt sent twice with different questions, one
    request after the other: both TTFTs and the second's as a fraction of the first's."""
    number = client.reserve(1)
    first, second = (client.stream(prefix_prompt(number, q), 4) for q in QUESTIONS)
    figures = {"prefix_first_ttft_s": first.ttft, "prefix_second_ttft_s": second.ttft,
               "prefix_ratio": second.ttft / first.ttft}
    if first.prompt_tokens:
        figures["prefix_prompt_tokens"] = float(first.prompt_tokens)
    return figures


# -- the servers --


@dataclass(frozen=True)
class Server:
    """A server to measure: its name in the report, how it is started (shown in
    the report) and a context manager that starts it and yields its base URL."""

    name: str
    command: str
    start: Callable[[], contextlib.AbstractContextManager[str]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, path: str, timeout: float = 900) -> None:
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


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def llmk_model(source: str, backend: str, passes: list[str], clients: int, **options: Any) -> dict[str, Any]:
    """The config of ``llmk serve``'s one model, ``bench``: ``max_batch_size`` at
    least ``clients`` (every client in the batch) and 32, plus any engine options
    given (``prefill_chunk``, ...), which win."""
    return {"source": source, "backend": backend, "passes": passes, "max_batch_size": max(32, clients), **options}


@contextlib.contextmanager
def llmk_server(python: str, model: dict[str, Any], cache_dir: str | None,
                ray: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """``llmk serve`` with one model, ``bench`` (``llmk_model``); yields its base URL.
    With ``ray`` (the config's ``ray:`` section), ``llmk serve --ray`` on a Ray cluster
    it starts on this machine; ``env`` is added to the server's environment."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "llmk.yaml"
        section = f"ray: {json.dumps(ray)}\n" if ray is not None else ""
        config.write_text(f"server: {{port: 0}}\n{section}models:\n  bench: {json.dumps(model)}\n")
        args = [python, "-m", "llmk.cli"] + (["--cache-dir", cache_dir] if cache_dir else [])
        args += ["serve", "--config", str(config)] + (["--ray"] if ray is not None else [])
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env={**os.environ, **(env or {})})
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
            _stop(process)


def llama_server_command(binary: str | Path, gguf: str | Path, *, port: int, threads: int, slots: int,
                         context: int) -> list[str]:
    """llama.cpp's server as its users run it for concurrent clients: a slot per
    client (``--parallel``), continuous batching, one KV pool shared by every slot
    (``--kv-unified``: a slot may take all of ``--ctx-size``, so a long prompt fits
    while the short ones take little), every core for generation and prompts,
    prompt caching (on by default) with reuse of shifted chunks (``--cache-reuse``).
    Batch sizes and flash attention stay at their defaults. Where the CPU has AMX, weights
    are not repacked (``--no-repack``), as llmk loads them: llama.cpp's AMX kernel crashes."""
    from llmk_backend_llamacpp.backend import uses_extra_buffers

    return [str(binary), "--model", str(gguf), "--alias", "bench", "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(threads), "--threads-batch", str(threads), "--parallel", str(slots),
            "--ctx-size", str(context), "--kv-unified", "--cont-batching", "--cache-reuse", "256", "--no-webui",
            *(() if uses_extra_buffers() else ("--no-repack",))]


def llama_server_context(slots: int) -> int:
    """``--ctx-size`` for ``slots`` slots: 16,384 tokens, or 512 a slot where that is
    more; with the unified pool, the long prompt and the 8 streams take ~10,000."""
    return max(16_384, 512 * slots)


@contextlib.contextmanager
def llama_server(command: list[str]) -> Iterator[str]:
    """Run ``llama-server`` (``llama_server_command``); yields its base URL. Its
    log's last lines are in the error if it fails to start."""
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait(url, process, "/health")
            except RuntimeError as error:
                log.seek(0)
                raise RuntimeError(f"{error}: {' | '.join(log.read().strip().splitlines()[-3:])}") from None
            yield url
        finally:
            _stop(process)


def llama_server_plan(binary: str | Path, gguf: Path, threads: int, clients: int) -> Server:
    """llama-server on the GGUF file, a slot for each of ``clients`` clients and at
    least one for each request of the interference figure (no request queues for a slot)."""
    slots = max(clients, STREAMS + 1)
    command = llama_server_command(binary, gguf, port=_free_port(), threads=threads, slots=slots,
                                   context=llama_server_context(slots))
    shown = [Path(a).name if a in (str(binary), str(gguf)) else a for a in command]
    return Server(f"llama-server ({gguf.name.rsplit('.', 2)[-2]} GGUF)", shlex.join(shown),
                  lambda: llama_server(command))


def llmk_plan(python: str, model: dict[str, Any], cache_dir: str | None,
              ray: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Server:
    passes = " ".join(model.get("passes") or []) or "none"
    if ray is not None:
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        return Server(f"llmk serve --ray ({model.get('backend')} {passes}{', ' + shown if shown else ''})",
                      f"{shown + ' ' if shown else ''}llmk serve --ray, ray: {json.dumps(ray)}, "
                      f"model: {json.dumps(model)}", lambda: llmk_server(python, model, cache_dir, ray, env))
    return Server(f"llmk serve ({model.get('backend')} {passes})", f"llmk serve, model: {json.dumps(model)}",
                  lambda: llmk_server(python, model, cache_dir))


@dataclass
class Measured:
    """One server's figures: each figure's values, one a run; and what failed."""

    figures: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # "start" or a part -> the error that stopped it

    @property
    def error(self) -> str | None:
        return "; ".join(f"{part}: {error}" for part, error in self.errors.items()) or None


def measure(servers: list[Server], client_counts: list[int], *, runs: int, rounds: int, tokens: int,
            parts: tuple[str, ...] = PARTS) -> list[Measured]:
    """Every server started (each fresh, all at once) and warmed up with one request,
    then ``runs`` runs of each part, the servers' runs interleaved. Figures are
    named ``tokens_per_s@8``, ``ttft_p50_s@8``, ``max_wait_s``, ``prefix_ratio``...
    A part that fails on a server is left out there from then on; the others go on."""
    results = [Measured() for _ in servers]
    with contextlib.ExitStack() as stack:
        clients: list[Client | None] = []
        for server, result in zip(servers, results):
            try:
                clients.append(Client(stack.enter_context(server.start())))
            except Exception as error:
                result.errors["start"] = f"{type(error).__name__}: {error}"
                clients.append(None)
        for _ in range(runs):
            for client, result in zip(clients, results):
                for part in parts if client else ():
                    if part in result.errors:
                        continue
                    try:
                        found = _part(client, part, client_counts, rounds, tokens)
                    except Exception as error:
                        result.errors[part] = f"{type(error).__name__}: {error}"
                        continue
                    for name, value in found.items():
                        result.figures.setdefault(name, []).append(value)
    return results


def _part(client: Client, part: str, client_counts: list[int], rounds: int, tokens: int) -> dict[str, float]:
    if part == "load":
        return {f"{name}@{clients}": value for clients in client_counts
                for name, value in load(client, clients, rounds, tokens).items()}
    if part == "interference":
        found = interference(client)
        time.sleep(0.5)  # the server closes the streams the figure cut short
        return found
    return prefix_reuse(client)
