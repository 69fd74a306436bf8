"""Prometheus metrics under vLLM's names with a ``deltaserve:`` prefix, in a per-app registry.

* Gauges (running / waiting requests, KV-cache and state-slot usage as fractions 0..1, as vLLM's
  ``kv_cache_usage_perc``) and the preemption counter are read from ``engine.usage()`` at scrape time,
  so they can never drift from the engine's own bookkeeping.
* Token counters, ``request_success_total{finished_reason}`` and the TTFT / e2e / queue-time histograms
  are fed by AsyncEngine's ``on_finish`` hook (engine thread; prometheus_client is thread-safe), once
  per finished request -- aborted ones included, under ``finished_reason="abort"``.
* Inter-token latency is measured where the tokens reach the server's event loop (one observation per
  engine output after the first token), which is what a streaming client experiences.

Every series carries ``model_name`` (the served name), as vLLM's do, so existing dashboards work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from deltaserve.engine.request import RequestOutput

P = "deltaserve:"
# vLLM's buckets, so that dashboards' quantile panels behave the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineGauges(Collector):
    """Reads ``engine.usage()`` when Prometheus scrapes; zeros while the model is still loading."""

    def __init__(self, usage: Callable[[], dict | None], model_name: str):
        self.usage, self.model_name = usage, model_name

    def collect(self) -> Iterator:
        u = self.usage() or {}
        kv = 1 - u["kv_free"] / u["kv_total"] if u.get("kv_total") else 0.0
        slots = 1 - u["slots_free"] / u["slots_total"] if u.get("slots_total") else 0.0
        for name, doc, value in (
            ("num_requests_running", "Requests in the running batch.", u.get("running", 0)),
            ("num_requests_waiting", "Requests waiting to be scheduled.", u.get("waiting", 0)),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", kv),
            ("state_slots_usage_perc", "Fraction of GDN state slots in use (1 = full).", slots),
        ):
            g = GaugeMetricFamily(P + name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        c = CounterMetricFamily(P + "num_preemptions", "Requests preempted (and later recomputed).",
                                labels=["model_name"])
        c.add_metric([self.model_name], u.get("preemptions", 0))
        yield c


class ServerMetrics:
    def __init__(self, model_name: str, usage: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels, reg = ["model_name"], self.registry
        reg.register(_EngineGauges(usage, model_name))
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens of finished requests.", labels,
                                         registry=reg).labels(model_name)
        self._success = Counter(P + "request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=reg)
        for reason in ("stop", "length", "abort"):  # export zeros so rate() works from the start
            self._success.labels(model_name, reason)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between consecutive token outputs.", labels,
                             buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=REQUEST_BUCKETS, registry=reg).labels(model_name)
        self.queue = Histogram(P + "request_queue_time_seconds", "Arrival to first scheduled.", labels,
                               buckets=REQUEST_BUCKETS, registry=reg).labels(model_name)

    def on_finish(self, out: RequestOutput) -> None:
        """Called in the engine thread for every finished (or aborted) request."""
        m = out.metrics or {}
        self.prompt_tokens.inc(m.get("prompt_tokens", len(out.prompt_token_ids)))
        self.generation_tokens.inc(m.get("completion_tokens", len(out.token_ids)))
        self._success.labels(self.model_name, out.finish_reason or "abort").inc()
        if m.get("ttft") is not None:
            self.ttft.observe(m["ttft"])
        if m.get("e2e") is not None:
            self.e2e.observe(m["e2e"])
        if m.get("queue") is not None:
            self.queue.observe(m["queue"])

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
