"""The server's Prometheus metrics (names after vLLM's, prefixed llmrun:)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("llmrun:num_requests_running", "Requests prefilling or decoding", registry=r)
        self.waiting = Gauge("llmrun:num_requests_waiting", "Requests queued for a slot", registry=r)
        self.slots_used = Gauge("llmrun:kv_slots_in_use", "KV cache slots held by running requests", registry=r)
        self.slots = Gauge("llmrun:kv_slots", "KV cache slots (--parallel)", registry=r)
        self.prompt_tokens = Counter("llmrun:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("llmrun:prompt_tokens_cached", "Prompt tokens reused from the KV cache",
                                     registry=r)
        self.generation_tokens = Counter("llmrun:generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("llmrun:requests", "Finished requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("llmrun:time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("llmrun:inter_token_latency_seconds", "Between consecutive tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llmrun:e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)

    def sample_scheduler(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.slots_used.set(running)

    def text(self) -> bytes:
        return generate_latest(self.registry)
