"""Prometheus metrics of the server: vLLM's names under a `recursa:` prefix, and recursa's own.

vLLM's meaning, recursa's prefix: `recursa:num_requests_running`, `num_requests_waiting`,
`kv_cache_usage_perc` (0..1), `prompt_tokens_total`, `generation_tokens_total`,
`request_success_total{finished_reason}` (stop, length, abort), histograms
`time_to_first_token_seconds`, `inter_token_latency_seconds`, `e2e_request_latency_seconds`.
recursa's own: `mean_exit_depth` (executed depth, in stage passes, per output token),
`tokens_per_stage_run` (how full depth-wise batching keeps each stage run), the histogram
`exit_depth` (the depth behind each output token), `kv_bytes_per_token_written` vs
`kv_bytes_per_token_reserved` (what adaptive depth saves in KV traffic), and
`request_errors_total{kind}` (timeout, error).

Each server has its own CollectorRegistry (no global state). The engine thread writes the
figures; `GET /metrics` renders them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily

P = "recursa:"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _DepthHistogram:
    """exit_depth as a histogram built at scrape time from plain counts (the engine thread only bumps ints)."""

    def __init__(self, depth: int):
        self.counts = [0] * (depth + 1)   # counts[d]: output tokens predicted after d stage passes

    def describe(self):
        return []

    def collect(self):
        buckets, total, weighted = [], 0, 0
        for d, c in enumerate(self.counts):
            total += c
            weighted += d * c
            if d:
                buckets.append((str(d), total))
        buckets.append(("+Inf", total))
        h = HistogramMetricFamily(P + "exit_depth", "depth (stage passes) behind each output token")
        h.add_metric([], buckets, weighted)
        yield h


class Metrics:
    def __init__(self, model_depth: int):
        self.registry = r = CollectorRegistry()
        self.running = Gauge(P + "num_requests_running", "requests in the engine's running batch", registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "requests accepted and waiting for the engine", registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "share of KV blocks in use (0..1)", registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "generated tokens", registry=r)
        self.success = Counter(P + "request_success", "finished requests", ["finished_reason"], registry=r)
        self.errors = Counter(P + "request_errors", "requests ended by the server", ["kind"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "time between output tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.mean_depth = Gauge(P + "mean_exit_depth", "mean executed depth (stage passes) per output token", registry=r)
        self.tokens_per_stage_run = Gauge(P + "tokens_per_stage_run", "tokens per stage run (batch fill)", registry=r)
        self.kv_written = Gauge(P + "kv_bytes_per_token_written", "KV bytes written per token that entered the model", registry=r)
        self.kv_reserved = Gauge(P + "kv_bytes_per_token_reserved", "KV bytes reserved per token (blocks held per token; recursion-wise caches hold only what they write)", registry=r)
        self.depths = _DepthHistogram(model_depth)
        r.register(self.depths)
        self.num_tokens = 0   # prompt + generated tokens: the denominator of kv_bytes_per_token_written

    def count_tokens(self, prompt: int, generated: int) -> None:
        self.num_tokens += prompt + generated
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)

    def update(self, engine, num_waiting_outside: int) -> None:
        """Gauges from the engine's state (called by the engine thread)."""
        stats, kv = engine.stats(), engine.kv
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting) + num_waiting_outside)
        self.kv_usage.set(1 - kv.num_free_blocks / kv.num_blocks if kv.num_blocks else 0.0)
        self.mean_depth.set(stats["mean_exit_depth"])
        self.tokens_per_stage_run.set(stats["tokens_per_stage_run"])
        self.kv_reserved.set(stats["kv_reserved_bytes_per_token"])   # compact recursion-wise caches: what is held
        if self.num_tokens:
            self.kv_written.set(stats["kv_entries_written"] * kv.entry_bytes / self.num_tokens)

    def observe_depths(self, depths: list[int]) -> None:
        counts = self.depths.counts
        for d in depths:
            if 0 <= d < len(counts):
                counts[d] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)
