"""`GET /metrics`: the server's counters in Prometheus' text format (through prometheus-client).

Requests by route and status; prompt, generated and cached tokens; time to first token and time per output
token (all counted where the HTTP app runs, which sees every request of every replica); running and waiting
requests and KV memory in use, read from every replica's loop stats at each scrape: summed over the replicas,
and each replica's own under `llama32_replica_*{replica}`. Each app has its own registry, so several servers
in one process (tests) never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the route

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


_STATS = (("running", "requests decoding now"), ("waiting", "requests queued behind them"),
          ("kv_bytes", "KV-cache memory in use, bytes"), ("kv_bytes_total", "KV-cache memory budget, bytes"))


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llama32_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("llama32_prompt_tokens", "prompt tokens of the requests generated for", registry=r)
        self.generation_tokens = Counter("llama32_generation_tokens", "tokens generated (cancelled requests too)",
                                         registry=r)
        self.cached_tokens = Counter("llama32_cached_tokens", "prompt tokens whose keys and values were reused",
                                     registry=r)
        self.ttft = Histogram("llama32_time_to_first_token_seconds", "from submission to the first text",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("llama32_time_per_output_token_seconds", "after the first text, per further token",
                              buckets=_PER_TOKEN, registry=r)
        self.totals = {key: Gauge(f"llama32_{key}", f"{doc} (all replicas)", registry=r) for key, doc in _STATS}
        self.each = {key: Gauge(f"llama32_replica_{key}", doc, ["replica"], registry=r) for key, doc in _STATS}

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def finished(self, gen) -> None:
        """Account one generation (done or cancelled)."""
        self.prompt_tokens.inc(gen.prompt_tokens)
        self.generation_tokens.inc(gen.produced)
        self.cached_tokens.inc(gen.last.get("usage", {}).get("cached_tokens", 0))
        if gen.first is not None:
            self.ttft.observe(gen.first - gen.started)
            if gen.produced > 1 and gen.ended is not None:
                self.tpot.observe((gen.ended - gen.first) / (gen.produced - 1))

    def render(self, replicas: list[dict]) -> bytes:
        """The text of a scrape, the gauges set from `replicas` (each replica's loop stats, with its `id`)."""
        for key in self.totals:
            self.totals[key].set(sum(float(r.get(key, float("nan"))) for r in replicas))
            self.each[key].clear()  # a replica that is gone leaves no series behind
            for r in replicas:
                self.each[key].labels(replica=r["id"]).set(float(r.get(key, float("nan"))))
        return generate_latest(self.registry)
