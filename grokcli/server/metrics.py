"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own.

Counters and histograms are fed by the engine's observer hooks (from the model thread); the
gauges (running, waiting, slots) are read from the engine when Prometheus scrapes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .scheduler import Observer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _EngineGauges:
    """Gauges read from the engine at scrape time."""

    def __init__(self, server_state):
        self._state = server_state

    def collect(self):
        engine = self._state.engine
        snap = engine.snapshot() if engine is not None else {"running": 0, "waiting": 0, "slots_in_use": 0,
                                                             "slots": 0, "compiles_after_warmup": 0}
        for name, key, doc in (
                ("grok_requests_running", "running", "Sequences holding a KV slot (prefilling or decoding)."),
                ("grok_requests_waiting", "waiting", "Sequences waiting for a free KV slot."),
                ("grok_kv_slots_in_use", "slots_in_use", "KV cache slots in use."),
                ("grok_kv_slots", "slots", "KV cache slots (--parallel)."),
                ("grok_compiles_after_warmup", "compiles_after_warmup",
                 "XLA compilations since the warm-up (should stay 0).")):
            yield GaugeMetricFamily(name, doc, value=snap[key])
        yield GaugeMetricFamily("grok_model_ready", "1 once the model is loaded and compiled.",
                                value=1 if engine is not None else 0)


class ServerMetrics(Observer):
    """The server's metrics; also the engine's observer."""

    def __init__(self, server_state):
        self.registry = CollectorRegistry()
        reg = self.registry
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, cpu seconds, open fds
        reg.register(_EngineGauges(server_state))
        self.requests = Counter("grok_http_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=reg)
        self.prompt_tokens = Counter("grok_prompt_tokens", "Prompt tokens received.", registry=reg)
        self.cached_prompt_tokens = Counter("grok_prompt_tokens_cached",
                                            "Prompt tokens whose KV was reused from an earlier request.", registry=reg)
        self.generation_tokens = Counter("grok_generation_tokens", "Tokens generated.", registry=reg)
        self.finished_sequences = Counter("grok_sequences_finished", "Sequences finished, by reason.",
                                          ["finish_reason"], registry=reg)
        self.ttft = Histogram("grok_time_to_first_token_seconds", "Time from request to its first token.",
                              buckets=_TTFT_BUCKETS, registry=reg)
        self.token_latency = Histogram("grok_time_per_output_token_seconds",
                                       "Time of the step that produced each generated token.",
                                       buckets=_TOKEN_BUCKETS, registry=reg)

    # Observer hooks (model thread)
    def prompt(self, tokens: int, cached: int) -> None:
        self.prompt_tokens.inc(tokens)
        self.cached_prompt_tokens.inc(cached)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, count: int, step_seconds: float) -> None:
        self.generation_tokens.inc(count)
        for _ in range(count):
            self.token_latency.observe(step_seconds)

    def finished(self, reason: str) -> None:
        self.finished_sequences.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
