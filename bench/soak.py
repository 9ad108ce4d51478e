"""Soak test: a real ``llmk serve`` under a mixed load for N minutes, with
hot-swaps and config reloads under it; reports every request by outcome, the
lost ones, the 5xx, and how the daemon's memory grows per request.

    python bench/soak.py [--minutes 5] [--clients 4] [--model tiny|SOURCE] [--embed-model tiny|SOURCE|none]
                         [--backend torch] [--swap-backend onnxruntime] [--swap-every 20] [--reload-every 45]
                         [--warmup 30] [--cache-dir DIR] [--json FILE]

The load, from ``--clients`` threads, each picking at random: chat completions,
streamed chat completions, completions, embeddings, bad requests (unknown model,
malformed JSON, missing field, negative max_tokens, embeddings from the chat
model, a wrong admin token: each must be a 4xx), and streams the client drops
after the first chunk. Beside it, one admin thread alternates hot-swaps of the
chat model between ``--backend`` and ``--swap-backend`` (``PUT
/admin/models/chat``) and config reloads (the file is edited, then ``POST
/admin/reload``: the embedding model's batch size flips, so each reload swaps it,
and puts the chat model back to the file's spec).

Outcomes: ``2xx``/``4xx``/``5xx`` by status code (an error event inside a stream
counts by its type), ``disconnect`` for the streams this client dropped on
purpose, ``lost`` for a request without an answer (connection error, timeout) or
a stream that ended without ``data: [DONE]``. The daemon's RSS (psutil) is
sampled every 2 s; growth per request is measured from the end of the warm-up.

The default model is the tiny Llama (and tiny BERT) that ``llmk.testing``
builds into a temporary directory in a second or two, so it runs anywhere,
offline; ``--model builtin:smollm2 --embed-model builtin:minilm`` soaks the
real ones. Exit status 1 when any request was lost, got a 5xx, or a bad request
was not refused with a 4xx.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TOKEN = "soak-admin-token"
KINDS = ("chat", "chat-stream", "completion", "embedding", "bad-request", "disconnect")
WEIGHTS = {"chat": 25, "chat-stream": 25, "completion": 15, "embedding": 15, "bad-request": 10, "disconnect": 10}
PROMPTS = ["The cat", "Once upon a time", "Hello! How are you?", "The capital of France is",
           "Write a short answer, then explain how you found it.", "The river ran past the village"]


# -- the daemon ------------------------------------------------------------------------------------------


class Daemon:
    """``llmk serve`` in a child process; its output is kept (the last lines) for the report."""

    def __init__(self, config: Path, cache_dir: Path | None, ready_timeout: float = 900):
        command = [sys.executable, "-m", "llmk.cli"]
        if cache_dir is not None:
            command += ["--cache-dir", str(cache_dir)]
        command += ["serve", "--config", str(config), "--port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "LLMK_ADMIN_TOKEN": TOKEN})
        self.lines: list[str] = []
        self.url: str | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(ready_timeout) or self.url is None:
            self.stop()
            raise SystemExit("llmk serve did not start:\n" + "".join(self.lines[-40:]))
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{self.url}/ready", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise SystemExit("the models did not load:\n" + "".join(self.lines[-40:]))
            time.sleep(0.5)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            del self.lines[:-2000]
            match = re.search(r"listening on (http://\S+)", line)
            if match and self.url is None:
                self.url = match.group(1)
                self._listening.set()
        self._listening.set()

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return None
        return self.process.returncode


# -- the load ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    #: Unexpected outcomes by message (numbers as N): the times they happened and the request kinds.
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    start: float = field(default_factory=time.monotonic)
    done: int = 0
    harness_errors: int = 0

    def add(self, kind: str, outcome: str, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.outcomes[kind][outcome] += 1
            self.latencies[kind].append(seconds)
            self.done += 1
            if unexpected(kind, outcome):
                message = error_message(detail)
                entry = self.failures.setdefault(f"{outcome}: {re.sub(r'[0-9]+', 'N', message)[:200]}",
                                                 {"times": [], "kinds": Counter(), "example": message[:300]})
                entry["times"].append(time.monotonic() - self.start)
                entry["kinds"][kind] += 1


def error_message(detail: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the text itself."""
    try:
        error = json.loads(detail)
    except ValueError:
        return detail.strip()
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]
    return str(error.get("message", error)) if isinstance(error, dict) else detail.strip()


def unexpected(kind: str, outcome: str) -> bool:
    """Lost, a 5xx, a well-formed request refused (4xx), a bad one not refused."""
    if outcome in ("lost", "5xx"):
        return True
    if kind == "bad-request":
        return outcome != "4xx"
    if kind == "disconnect":
        return outcome != "disconnect"
    return outcome != "2xx"


def status_class(code: int) -> str:
    return f"{code // 100}xx"


def read_stream(response: httpx.Response, drop_after_first: bool = False) -> tuple[str, str]:
    """Read an SSE answer: ``2xx`` with its ``[DONE]``, ``4xx``/``5xx`` for an error
    event, ``lost`` when it ends without ``[DONE]``, ``disconnect`` when dropped."""
    if response.status_code != 200:
        response.read()
        return status_class(response.status_code), response.text
    error = None
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return (error or "2xx"), ""
        if drop_after_first:
            response.close()  # the client goes away mid-stream
            return "disconnect", ""
        chunk = json.loads(data)
        if "error" in chunk:
            error = "5xx" if chunk["error"].get("type") == "server_error" else "4xx"
            detail = json.dumps(chunk["error"])
            if error == "5xx":
                return error, detail
    return "lost", "the stream ended without data: [DONE]"


class Load:
    def __init__(self, url: str, chat: str, embed: str | None, tally: Tally, timeout: float, seed: int):
        self.chat_model, self.embed_model, self.tally, self.timeout = chat, embed, tally, timeout
        self.random = random.Random(seed)
        self.client = httpx.Client(base_url=url, timeout=timeout)

    def one(self) -> None:
        kinds = [k for k in KINDS if k != "embedding" or self.embed_model]
        kind = self.random.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
        started = time.perf_counter()
        try:
            outcome, detail = getattr(self, kind.replace("-", "_"))()
        except (httpx.HTTPError, json.JSONDecodeError) as error:  # no answer, or a broken one
            outcome, detail = "lost", repr(error)
        except Exception:  # a bug of this script, not of the daemon: say so, and go on
            traceback.print_exc()
            with self.tally.lock:
                self.tally.harness_errors += 1
            return
        self.tally.add(kind, outcome, time.perf_counter() - started, detail)

    def _messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.random.choice(PROMPTS)}]

    def _tokens(self) -> int:
        return self.random.randint(4, 32)

    def chat(self) -> tuple[str, str]:
        response = self.client.post("/v1/chat/completions", json={
            "model": self.chat_model, "messages": self._messages(), "max_tokens": self._tokens(),
            "temperature": self.random.choice([0.0, 0.8])})
        ok = response.status_code == 200 and response.json()["choices"][0]["finish_reason"] is not None
        return (status_class(response.status_code) if response.status_code != 200 or ok else "lost"), response.text

    def chat_stream(self, drop: bool = False) -> tuple[str, str]:
        body = {"model": self.chat_model, "messages": self._messages(), "max_tokens": self._tokens(), "stream": True}
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            return read_stream(response, drop_after_first=drop)

    def disconnect(self) -> tuple[str, str]:
        return self.chat_stream(drop=True)

    def completion(self) -> tuple[str, str]:
        response = self.client.post("/v1/completions", json={
            "model": self.chat_model, "prompt": self.random.choice(PROMPTS), "max_tokens": self._tokens()})
        return status_class(response.status_code), response.text

    def embedding(self) -> tuple[str, str]:
        texts = self.random.sample(PROMPTS, self.random.randint(1, 4))
        response = self.client.post("/v1/embeddings", json={"model": self.embed_model, "input": texts})
        if response.status_code == 200 and len(response.json()["data"]) != len(texts):
            return "lost", "fewer vectors than texts"
        return status_class(response.status_code), response.text

    def bad_request(self) -> tuple[str, str]:
        which = self.random.randrange(6)
        if which == 0:
            response = self.client.post("/v1/chat/completions", json={"model": "no-such-model",
                                                                      "messages": self._messages()})
        elif which == 1:
            response = self.client.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [',
                                        headers={"content-type": "application/json"})
        elif which == 2:
            response = self.client.post("/v1/chat/completions", json={"model": self.chat_model})
        elif which == 3:
            response = self.client.post("/v1/completions", json={"model": self.chat_model, "prompt": "x",
                                                                 "max_tokens": -1})
        elif which == 4:
            response = self.client.post("/v1/embeddings", json={"model": self.chat_model, "input": "x"})
        else:
            response = self.client.put(f"/admin/models/{self.chat_model}", json={"source": "x"},
                                       headers={"Authorization": "Bearer wrong-token"})
        return status_class(response.status_code), f"bad request {which}: {response.status_code} {response.text}"


# -- admin: hot-swaps and reloads -------------------------------------------------------------------------


@dataclass
class Admin:
    url: str
    config_path: Path
    config: dict[str, Any]
    chat_specs: list[dict[str, Any]]
    start: float
    results: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    #: Every call: (started, ended) in seconds from the start, what, the chat model's backend after it.
    timeline: list[tuple[float, float, str, str]] = field(default_factory=list)

    def swap(self, number: int) -> None:
        spec = self.chat_specs[number % len(self.chat_specs)]
        self._call("swap", "PUT", "/admin/models/chat", spec["backend"], json=spec)

    def reload(self, number: int) -> None:
        embed = self.config["models"].get("embed")
        if embed is not None:
            embed["max_batch_size"] = 8 if number % 2 else 16
            self.config_path.write_text(json.dumps(self.config, indent=1))  # YAML is a superset of JSON
        # A reload also puts the chat model back to the file's spec.
        self._call("reload", "POST", "/admin/reload", self.config["models"]["chat"]["backend"])

    def backend_at(self, t: float, initial: str) -> tuple[str, bool]:
        """The chat model's backend at ``t``, and whether an admin call was running then (or ended < 2 s before)."""
        backend, near = initial, False
        for started, ended, _, after in self.timeline:
            if ended <= t:
                backend = after
            if started <= t <= ended + 2.0:
                near = True
        return backend, near

    def _call(self, what: str, method: str, path: str, backend_after: str, **kwargs: Any) -> None:
        began = time.monotonic() - self.start
        started = time.perf_counter()
        try:
            response = httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=600, **kwargs)
            outcome = "ok" if response.status_code == 200 else f"{response.status_code}"
            if response.status_code != 200:
                self.failures.append(f"{what}: {response.status_code} {response.text[:300]}")
            elif what == "reload" and response.json().get("failed"):
                outcome = "partial"
                self.failures.append(f"reload: {response.json()['failed']}")
        except httpx.HTTPError as error:
            outcome = "no answer"
            self.failures.append(f"{what}: {error!r}")
        self.results[what][outcome] += 1
        self.seconds[what].append(time.perf_counter() - started)
        self.timeline.append((began, time.monotonic() - self.start, what, backend_after))


# -- the run -----------------------------------------------------------------------------------------------


def prepare_models(args: argparse.Namespace, workdir: Path) -> tuple[str, str | None]:
    chat, embed = args.model, args.embed_model
    if chat == "tiny" or embed == "tiny":
        from llmk.testing import build_tiny_bert, build_tiny_llama

        if chat == "tiny":
            chat = str(build_tiny_llama(workdir / "tiny-llama"))
        if embed == "tiny":
            embed = str(build_tiny_bert(workdir / "tiny-bert"))
    return chat, (None if embed == "none" else embed)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    chat_source, embed_source = prepare_models(args, workdir)
    chat = {"source": chat_source, "backend": args.backend, "max_batch_size": 8}
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "admin_token_env": "LLMK_ADMIN_TOKEN", "watch_config": False},
        "models": {"chat": dict(chat)},
    }
    if embed_source:
        config["models"]["embed"] = {"source": embed_source, "backend": args.embed_backend, "max_batch_size": 16}
    config_path = workdir / "llmk.yaml"
    config_path.write_text(json.dumps(config, indent=1))
    cache_dir = Path(args.cache_dir) if args.cache_dir else (workdir / "cache" if args.model == "tiny" else None)

    print(f"soak: starting llmk serve ({chat_source}, backend {args.backend})", file=sys.stderr)
    started_at = time.monotonic()
    daemon = Daemon(config_path, cache_dir)
    print(f"soak: serving at {daemon.url} after {time.monotonic() - started_at:.0f}s; "
          f"running {args.minutes:g} min", file=sys.stderr)
    specs = [chat, {**chat, "backend": args.swap_backend or args.backend,
                    "max_batch_size": 8 if args.swap_backend else 4}]
    start = time.monotonic()
    admin = Admin(daemon.url, config_path, config, [specs[1], specs[0]], start)
    tally = Tally(start=start)
    stop = threading.Event()
    samples: list[tuple[float, int, int]] = []  # (seconds, requests answered, rss)
    end = start + args.minutes * 60

    def client(number: int) -> None:
        load = Load(daemon.url, "chat", "embed" if embed_source else None, tally, args.timeout, args.seed + number)
        while not stop.is_set():
            load.one()

    def admin_loop() -> None:
        swaps = reloads = 0
        next_swap, next_reload = start + args.swap_every, start + args.reload_every
        while not stop.wait(0.2):
            now = time.monotonic()
            if args.swap_every and now >= next_swap:
                admin.swap(swaps)
                swaps += 1
                next_swap = time.monotonic() + args.swap_every
            if args.reload_every and now >= next_reload:
                admin.reload(reloads)
                reloads += 1
                next_reload = time.monotonic() + args.reload_every

    def sampler() -> None:
        while not stop.wait(2.0):
            try:
                samples.append((time.monotonic() - start, tally.done, daemon.rss()))
            except Exception:  # noqa: BLE001 - the daemon died: the report says so
                return

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    threads += [threading.Thread(target=admin_loop, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for thread in threads:
        thread.start()
    while time.monotonic() < end and daemon.process.poll() is None:
        time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(args.timeout + 30)
    alive = daemon.process.poll() is None
    time.sleep(2.0)
    final_rss = daemon.rss() if alive else None
    exit_code = daemon.stop()
    elapsed = time.monotonic() - start
    return {"tally": tally, "admin": admin, "samples": samples, "final_rss": final_rss, "alive": alive,
            "exit_code": exit_code, "elapsed": elapsed, "chat_source": chat_source, "embed_source": embed_source,
            "daemon_tail": "".join(daemon.lines[-30:])}


def memory_figures(samples: list[tuple[float, int, int]], final_rss: int | None, warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s[0] >= warmup]
    if len(after) < 2:
        return {}
    first, last = after[0], after[-1]
    requests = last[1] - first[1]
    xs, ys = [s[1] for s in after], [s[2] for s in after]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
    return {"rss_after_warmup": first[2], "rss_last_sample": last[2], "rss_final": final_rss,
            "rss_max": max(ys), "rss_min": min(ys), "requests_after_warmup": requests,
            "growth": last[2] - first[2], "growth_per_request": (last[2] - first[2]) / requests if requests else None,
            "slope_per_request": slope, "samples": len(after)}


def mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def report(args: argparse.Namespace, result: dict[str, Any], command: str) -> tuple[str, dict[str, Any], bool]:
    from llmk.bench.report import machine

    tally: Tally = result["tally"]
    admin: Admin = result["admin"]
    m = machine()
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [f"Command: `{command}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Python {m['python']}; {versions}", "",
             f"Ran {result['elapsed'] / 60:.1f} min, {args.clients} clients; chat model `{result['chat_source']}` "
             f"(swapped between {args.backend} and {args.swap_backend or args.backend}), embedding model "
             f"`{result['embed_source'] or 'none'}`.", "",
             "| requests | sent | 2xx | 4xx | 5xx | disconnects | lost | p50 (ms) | p95 (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    totals: Counter = Counter()
    for kind in KINDS:
        counts = tally.outcomes.get(kind, Counter())
        sent = sum(counts.values())
        if not sent:
            continue
        totals.update(counts)
        times = sorted(tally.latencies[kind])
        p50, p95 = times[len(times) // 2] * 1000, times[min(len(times) - 1, int(len(times) * 0.95))] * 1000
        lines.append(f"| {kind} | {sent} | {counts['2xx']} | {counts['4xx']} | {counts['5xx']} | "
                     f"{counts['disconnect']} | {counts['lost']} | {p50:.0f} | {p95:.0f} |")
    lines.append(f"| **all** | **{sum(totals.values())}** | {totals['2xx']} | {totals['4xx']} | **{totals['5xx']}** | "
                 f"{totals['disconnect']} | **{totals['lost']}** | | |")
    lines += ["", "| admin call | calls | ok | failed | p50 (s) | max (s) |", "|---|---|---|---|---|---|"]
    for what in ("swap", "reload"):
        counts = admin.results.get(what, Counter())
        if counts:
            times = sorted(admin.seconds[what])
            lines.append(f"| {what} | {sum(counts.values())} | {counts['ok']} | {sum(counts.values()) - counts['ok']} "
                         f"| {times[len(times) // 2]:.1f} | {times[-1]:.1f} |")
    memory = memory_figures(result["samples"], result["final_rss"], args.warmup)
    if memory:
        lines += ["", "| daemon RSS | value |", "|---|---|",
                  f"| after the {args.warmup:g} s warm-up | {mib(memory['rss_after_warmup'])} |",
                  f"| last sample under load | {mib(memory['rss_last_sample'])} |",
                  f"| min – max under load | {mib(memory['rss_min'])} – {mib(memory['rss_max'])} |",
                  f"| after the load stopped | {mib(memory['rss_final'])} |",
                  f"| requests after the warm-up | {memory['requests_after_warmup']} |",
                  f"| growth per request (last − first sample) | {memory['growth_per_request'] or 0:.0f} B |",
                  f"| growth per request (least-squares slope, {memory['samples']} samples) | "
                  f"{memory['slope_per_request']:.0f} B |"]
    lost, errors = totals["lost"], totals["5xx"]
    wrong = sum(n for kind, counts in tally.outcomes.items() for outcome, n in counts.items()
                if unexpected(kind, outcome) and outcome not in ("lost", "5xx"))
    lines += ["", f"Lost requests: {lost}. 5xx: {errors}. Well-formed requests refused, or bad ones not refused "
                  f"with a 4xx: {wrong}. Daemon exit status after SIGTERM: {result['exit_code']}."]
    failures = []
    if tally.failures:
        lines += ["", "| unexpected answer (numbers as N) | count | requests | first – last (s) | chat backend "
                      "then | during a swap or reload (or < 2 s after) |", "|---|---|---|---|---|---|"]
        for message, entry in sorted(tally.failures.items(), key=lambda item: -len(item[1]["times"])):
            times = entry["times"]
            where = [admin.backend_at(t, args.backend) for t in times]
            backends = Counter(b for b, _ in where)
            near = sum(1 for _, n in where if n)
            kinds = ", ".join(f"{k} {n}" for k, n in entry["kinds"].most_common())
            lines.append(f"| {message.replace('|', '/')} | {len(times)} | {kinds} | {min(times):.0f} – "
                         f"{max(times):.0f} | {', '.join(f'{b} {n}' for b, n in backends.most_common())} | "
                         f"{near} of {len(times)} |")
            failures.append({"message": entry["example"], "count": len(times), "kinds": dict(entry["kinds"]),
                             "backends": dict(backends), "near_admin_call": near,
                             "first_s": min(times), "last_s": max(times)})
    if admin.failures:
        lines += ["", "Admin calls that failed:"] + [f"- {f}" for f in admin.failures[:5]]
    if tally.harness_errors:
        lines += ["", f"**{tally.harness_errors} requests failed inside this script** (tracebacks on stderr)."]
    ok = (lost == 0 and errors == 0 and wrong == 0 and result["alive"] and not admin.failures
          and not tally.harness_errors)
    data = {"command": command, "machine": m, "minutes": result["elapsed"] / 60, "clients": args.clients,
            "outcomes": {k: dict(v) for k, v in tally.outcomes.items()},
            "admin": {k: dict(v) for k, v in admin.results.items()}, "admin_failures": admin.failures,
            "admin_timeline": admin.timeline, "failures": failures,
            "memory": memory, "lost": lost, "5xx": errors, "unexpected": wrong, "ok": ok,
            "exit_code": result["exit_code"]}
    if not result["alive"]:
        lines += ["", "The daemon died during the run:", "```", result["daemon_tail"], "```"]
    return "\n".join(lines), data, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads (default 4)")
    parser.add_argument("--model", default="tiny", help="chat model source, or tiny (default: llmk.testing's)")
    parser.add_argument("--embed-model", default="tiny", help="embedding model source, tiny (default) or none")
    parser.add_argument("--backend", default="torch", help="the chat model's backend (default torch)")
    parser.add_argument("--swap-backend", default="onnxruntime",
                        help="hot-swaps alternate the chat model to this backend and back (default onnxruntime; "
                             "empty: the same backend with another max_batch_size)")
    parser.add_argument("--embed-backend", default="torch")
    parser.add_argument("--swap-every", type=float, default=20.0, help="seconds between hot-swaps (0: none)")
    parser.add_argument("--reload-every", type=float, default=45.0, help="seconds between reloads (0: none)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before memory is measured")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it is lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None,
                        help="llmk's cache (default: a temporary one for tiny models, else llmk's own)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args()
    command = shlex.join(["python", "bench/soak.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="llmk-soak-") as workdir:
        result = run(args, Path(workdir))
    text, data, ok = report(args, result, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
