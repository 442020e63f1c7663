"""``GET /metrics``: the server's state in Prometheus' text format, under vLLM's metric names
where the meaning is the same (so dashboards built for vLLM read this server too).

Each engine has its own :class:`~prometheus_client.CollectorRegistry` (never the process-wide
one), so several servers in one process (tests, embedding) do not collide. The worker thread
observes each token as it is picked (time to first token, inter-token latency, end-to-end
latency, token counters); gauges and adapter counts are read from the engine at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ("model_name", "engine")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class Metrics:
    """One engine's metrics; :meth:`token` is called by the worker for each token a row gets."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.labels = (engine.base_name, "0")
        reg = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg).labels(*self.labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, LABELS, registry=reg).labels(*self.labels)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.", E2E_BUCKETS)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens processed.")
        self.success = Counter(
            "vllm:request_success", "Finished requests by finish reason.", [*LABELS, "finished_reason"], registry=reg
        )
        reg.register(EngineState(engine, self.labels))

    def token(self, request: Any, now: float | None = None) -> None:
        """Record the token ``request`` just got (and its end, when it finished)."""
        now = time.monotonic() if now is None else now
        if request.first_token_at is None:
            request.first_token_at = now
            self.ttft.observe(now - request.submitted)
            self.prompt_tokens.inc(len(request.prompt_ids))
        else:
            self.itl.observe(now - request.last_token_at)
        request.last_token_at = now
        self.generation_tokens.inc()
        if request.finish_reason is not None:
            self.e2e.observe(now - request.submitted)
            self.success.labels(*self.labels, request.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineState(Collector):
    """Read at each scrape: requests running and waiting, the adapters they use (vLLM's
    ``lora_requests_info``), adapters loaded, loads and evictions so far."""

    def __init__(self, engine: Any, labels: tuple[str, str]) -> None:
        self.engine, self.labels = engine, labels

    def collect(self) -> Iterator[Any]:
        engine, store = self.engine, self.engine.store
        running, waiting = engine.running_requests(), list(engine.waiting)
        yield gauge("vllm:num_requests_running", "Requests in the batch (decoding or prefilling).", len(running), self)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to join the batch.", len(waiting), self)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests (the value: when this was read).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        names = [adapter_names(running), adapter_names(waiting)]
        info.add_metric([str(store.max_loaded or len(store.servable)), *names], time.time())
        yield info
        yield gauge("deltatune:adapters_loaded", "Adapters loaded in the model now.", len(store.recent), self)
        for name, doc, value in (
            ("deltatune:adapter_loads", "Adapter loads (on demand, at start or by API).", store.loads),
            ("deltatune:adapter_evictions", "Adapters unloaded to make room for another.", store.evictions),
        ):
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(list(self.labels), value)
            yield family


def gauge(name: str, doc: str, value: float, state: EngineState) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=LABELS)
    family.add_metric(list(state.labels), value)
    return family


def adapter_names(requests: list[Any]) -> str:
    from deltatune.constants import BASE_ADAPTER

    return ",".join(sorted({r.adapter for r in requests if r.adapter != BASE_ADAPTER}))
