"""What the daemon reports: Prometheus metrics at ``/metrics`` and one
``http.request`` log event per request.

Three sources, each counted once:
- the kernel's ``request_finished`` and ``model_loaded`` hooks (``Metrics`` is a
  plugin object): tokens, time to first token, time per output token, queue
  wait and load seconds, per model;
- a collector that reads ``kernel.status()`` and ``kernel.metrics()`` at scrape
  time: queue depth, running generations, memory and state per model, the KV and
  prefix caches, speculative decoding (drafted and accepted tokens, verification
  steps, tokens per decoding step), and the lifecycle counters (loads, swaps and
  rollbacks by result, evictions by reason);
- ``RequestLog``, an ASGI middleware: HTTP requests by model, endpoint and
  status, their duration, and the log event.

Every metric lives in the daemon's own registry, so that two apps in one
process never share counters.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmk.hookspecs import hookimpl
from llmk.logs import get_logger

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from llmk.kernel import Kernel
    from llmk.monitor import RequestRecord

log = get_logger("llmk.server")

PREFIX = "llmk"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)
_LOAD = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def note(request: Request, **fields: Any) -> None:
    """Add fields (``model``, ``tokens_in``, ``tokens_out``, ``finish_reason``...)
    to the request's log event and metrics labels."""
    request.scope.setdefault(PREFIX, {}).update(fields)


class Metrics:
    """The daemon's Prometheus registry; pass it to ``Kernel(plugins=[...])``,
    then ``bind(kernel)``."""

    __name__ = "llmk-server-metrics"  # its plugin name

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by model, endpoint and status",
                                     ["model", "endpoint", "status"], registry=r)
        self.http_seconds = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                      "HTTP request duration, streams until their end", ["endpoint"],
                                      buckets=_LATENCY, registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Model requests by finish reason (error, rejected...)",
                                ["model", "result"], registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens read (prompt) and generated (completion)",
                              ["model", "kind"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to the first generated token",
                              ["model"], buckets=_LATENCY, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Time per generated token after the first",
                              ["model"], buckets=_PER_TOKEN, registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited before its prefill",
                                    ["model"], buckets=_LATENCY, registry=r)
        self.load_seconds = Histogram(f"{PREFIX}_model_load_seconds", "Model load time, start to ready",
                                      ["model"], buckets=_LOAD, registry=r)
        self.reloads = Counter(f"{PREFIX}_config_reloads", "Configuration reloads by result", ["result"],
                               registry=r)

    def bind(self, kernel: Kernel) -> None:
        """Report the kernel's state at every scrape."""
        self.registry.register(_KernelCollector(kernel))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- kernel hooks ---------------------------------------------------------------
    @hookimpl
    def request_finished(self, name: str, record: RequestRecord) -> None:
        result = "error" if record.error else "rejected" if record.rejected else (record.finish_reason or "ok")
        self.requests.labels(name, result).inc()
        self.tokens.labels(name, "prompt").inc(record.tokens_in)
        self.tokens.labels(name, "completion").inc(record.tokens_out)
        if record.finish_reason is None:  # embedding or scoring: no generation latencies
            return
        self.queue_wait.labels(name).observe(record.queue_wait)
        if record.ttft is not None:
            self.ttft.labels(name).observe(record.ttft)
        if record.tpot is not None:
            self.tpot.labels(name).observe(record.tpot)

    @hookimpl
    def model_loaded(self, name: str, seconds: float) -> None:
        self.load_seconds.labels(name).observe(seconds)


class _KernelCollector:
    """Gauges and lifecycle counters read from the kernel when scraped."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        queued = gauge("queue_depth", "Generations waiting for a batch slot and KV cache room", ["model"])
        running = gauge("requests_running", "Generations admitted: prefilling or decoding", ["model"])
        prefilling = gauge("requests_prefilling", "Generations whose prompt is still being computed", ["model"])
        pending = gauge("prefill_tokens_pending", "Prompt tokens admitted and not computed yet", ["model"])
        stalled = gauge("engine_stalled_seconds", "Seconds a model's engine has had work and made no progress "
                        "(the watchdog fails its requests past server.stall_timeout)", ["model"])
        kv = gauge("kv_cache_tokens", "KV cache positions: capacity, used by running sequences, reserved for "
                   "them to grow into, and cached prefixes no sequence holds", ["model", "kind"])
        prefix = CounterMetricFamily(f"{PREFIX}_prefix_cache_tokens", "Prompt tokens looked up in the prefix "
                                     "cache, and those found there (not computed again)", labels=["model", "kind"])
        drafted = CounterMetricFamily(f"{PREFIX}_spec_draft_tokens", "Speculative decoding: draft tokens sent "
                                      "for verification", labels=["model"])
        accepted = CounterMetricFamily(f"{PREFIX}_spec_accepted_tokens", "Speculative decoding: draft tokens the "
                                       "model agreed with (kept)", labels=["model"])
        verified = CounterMetricFamily(f"{PREFIX}_spec_verify_steps", "Speculative decoding: sequence-steps that "
                                       "verified drafts", labels=["model"])
        decode_steps = CounterMetricFamily(f"{PREFIX}_decode_steps", "Sequence-steps that decoded (with or "
                                           "without drafts)", labels=["model"])
        decode_tokens = CounterMetricFamily(f"{PREFIX}_decode_tokens", "Tokens those decoding steps emitted",
                                            labels=["model"])
        acceptance = gauge("spec_acceptance_rate", "Share of draft tokens accepted, since the model loaded",
                           ["model"])
        per_step = gauge("spec_tokens_per_step", "Tokens a decoding sequence gains per engine step, since the "
                         "model loaded (1 without speculation)", ["model"])
        active = gauge("requests_active", "Requests holding a model version (any kind)", ["model", "version"])
        memory = gauge("model_memory_bytes", "Memory a model version holds", ["model", "version", "backend"])
        state = gauge("model_state", "1 for the state each model version is in", ["model", "version", "state"])
        for status in self.kernel.status():
            model, version = status["name"], str(status["version"])
            state.add_metric([model, version, status["state"]], 1)
            memory.add_metric([model, version, status["backend"]], status["memory_bytes"])
            active.add_metric([model, version], status["active_requests"])
            if status["current"]:
                queued.add_metric([model], status["queued"])
                running.add_metric([model], status["running"])
                prefilling.add_metric([model], status["prefilling"])
                pending.add_metric([model], status["prefill_tokens_pending"])
                stalled.add_metric([model], status["stalled_seconds"])
                if "kv_capacity_tokens" in status:
                    for kind in ("capacity", "used", "reserved", "cached"):
                        kv.add_metric([model, kind], status[f"kv_{kind}_tokens"])
                    prefix.add_metric([model, "looked_up"], status["prefix_cache_prompt_tokens"])
                    prefix.add_metric([model, "reused"], status["prefix_cache_reused_tokens"])
                if "spec_draft_tokens" in status:
                    drafted.add_metric([model], status["spec_draft_tokens"])
                    accepted.add_metric([model], status["spec_accepted_tokens"])
                    verified.add_metric([model], status["spec_verify_steps"])
                    decode_steps.add_metric([model], status["decode_steps"])
                    decode_tokens.add_metric([model], status["decode_tokens"])
                    acceptance.add_metric([model], status["spec_acceptance_rate"])
                    per_step.add_metric([model], status["spec_tokens_per_step"])
        yield from (queued, running, prefilling, pending, stalled, kv, prefix, drafted, accepted, verified,
                    decode_steps, decode_tokens, acceptance, per_step, active, memory, state)

        figures = self.kernel.metrics()
        for key, label, doc in (("loads", "result", "Model loads by result"),
                                ("swaps", "result", "Hot-swaps by result (ok, rolled_back)"),
                                ("swap_modes", "mode", "Hot-swaps by mode (alongside, replace)"),
                                ("evictions", "reason", "Evictions by reason (memory, expired)"),
                                ("updates", "result", "Periodic updates by result (swapped, rejected, failed)")):
            family = CounterMetricFamily(f"{PREFIX}_model_{key}", doc, labels=[label])
            for value, count in sorted(figures[key].items()):
                family.add_metric([value], count)
            yield family
        budget = figures["memory"]
        yield GaugeMetricFamily(f"{PREFIX}_memory_used_bytes", "Memory the loaded models hold, as budgeted",
                                value=budget["used_bytes"])
        if budget["budget_bytes"] is not None:
            yield GaugeMetricFamily(f"{PREFIX}_memory_budget_bytes", "The kernel's memory budget",
                                    value=budget["budget_bytes"])


class RequestLog:
    """ASGI middleware: count every HTTP request and log it as one
    ``http.request`` event, with what the handler ``note``d (a stream is
    logged when it ends)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        fields: dict[str, Any] = scope.setdefault(PREFIX, {})
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"  # never the raw path: unbounded labels
            model = fields.pop("model", "")
            self.metrics.http_requests.labels(model, endpoint, str(status)).inc()
            self.metrics.http_seconds.labels(endpoint).observe(seconds)
            if endpoint not in ("/metrics", "/health", "/ready", "/console/state"):  # probes and polls: noise
                log.info("http.request", request_id=uuid.uuid4().hex[:16], method=scope["method"],
                         endpoint=endpoint, status=status, model=model or None, seconds=round(seconds, 4),
                         client=(scope.get("client") or ("",))[0], **fields)
