"""Live Prometheus metrics of the pipeline, updated from what the sink commits.

Names follow the OpenTelemetry GenAI semantic conventions where one exists, rendered the way the
OpenTelemetry Prometheus exporter renders them (`gen_ai.client.token.usage` ->
`gen_ai_client_token_usage`, seconds suffixed `_seconds`); serving counters and histograms follow
vLLM's names in our namespace (`vllm:prompt_tokens_total` -> `calm_prompt_tokens_total`); cost,
FLOPs and generative steps are our own `calm_` figures, per generative step included.

Everything is observed when rows become durable, so the endpoint never counts work that a crash
would make the pipeline redo; source counters arrive as cumulative snapshots from the sources.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pipeline.kafka.positions import parse_partition_name

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 16384)
OPERATION = "text_completion"


class PipelineMetrics:
    """One registry with every metric; `serve` exposes it over HTTP."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        model = ["gen_ai_operation_name", "gen_ai_response_model"]

        def per_model(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, documentation, model, buckets=buckets, registry=r)

        def latency(name: str, documentation: str) -> Histogram:
            return per_model(name, documentation, SECONDS)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, model, registry=r)

        # OpenTelemetry GenAI
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Input and output tokens per request.",
            [*model, "gen_ai_token_type"],
            buckets=TOKENS,
            registry=r,
        )
        self.request_duration = latency(
            "gen_ai_server_request_duration_seconds", "Queue, prefill and decode time per request."
        )
        self.time_to_first_token = latency(
            "gen_ai_server_time_to_first_token_seconds",
            "Queue + prefill time: the first chunk comes out of the prefill's last state.",
        )
        self.time_per_output_token = latency(
            "gen_ai_server_time_per_output_token_seconds", "Decode time per generated token."
        )
        # vLLM-style serving metrics
        self.prompt_tokens = counter("calm_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("calm_generation_tokens", "Tokens generated.")
        self.queue_time = latency("calm_request_queue_time_seconds", "Time a request waited.")
        self.prefill_time = latency(
            "calm_request_prefill_time_seconds", "Prefill time per request."
        )
        self.decode_time = latency("calm_request_decode_time_seconds", "Decode time per request.")
        self.e2e_latency = Histogram(
            "calm_e2e_request_latency_seconds",
            "From the window's last event entering Kafka to its result row being committed.",
            buckets=SECONDS,
            registry=r,
        )
        # Faithfulness of summaries to their windows (operators.facts)
        self.fact_accuracy = per_model(
            "calm_summary_fact_accuracy",
            "Share of a window's facts its summary states correctly (facts stated or expected).",
            (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0),
        )
        self.invented_facts = counter(
            "calm_summary_invented_facts", "Facts summaries state that their windows do not have."
        )
        # CALM: steps, FLOPs and cost
        self.steps = counter("calm_generative_steps", "Generative steps (K tokens each at most).")
        self.draws = counter("calm_head_draws", "Chunks drawn from the energy head.")
        self.tokens_per_step = per_model(
            "calm_tokens_per_step",
            "Generated tokens per step, per batch.",
            (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 6, 8, 16),
        )
        self.flops = counter("calm_flops", "Analytic FLOPs of the batches run.")
        self.cost = counter("calm_cost_dollars", "Node cost of inference, idle time included.")
        self.cost_per_1k = Gauge(
            "calm_cost_per_1k_tokens_dollars",
            "Dollars per 1000 generated tokens over the last batch.",
            model,
            registry=r,
        )
        self.cost_per_step = Gauge(
            "calm_cost_per_step_dollars",
            "Dollars per generative step over the last batch.",
            model,
            registry=r,
        )
        self.baseline_flops = counter(
            "calm_baseline_flops",
            "FLOPs the discrete baseline would have spent on the same outputs.",
        )
        self.baseline_cost = counter(
            "calm_baseline_cost_dollars",
            "Dollars the discrete baseline would have spent on the same outputs.",
        )
        self.batches = counter("calm_inference_batches", "Inference batches run.")
        # the stream
        self.results = Counter("calm_results_committed", "Result rows made durable.", registry=r)
        self.dead_letters = Counter(
            "calm_dead_letters",
            "Messages routed to the DLQ or the late topic.",
            ["reason"],
            registry=r,
        )
        self.consumed = Counter(
            "calm_events_consumed", "Kafka records polled.", ["source"], registry=r
        )
        self.duplicates = Counter(
            "calm_duplicate_events",
            "Re-delivered events dropped by windows.",
            ["source"],
            registry=r,
        )
        self.lag = Gauge(
            "calm_consumer_lag",
            "Records behind the partition's end.",
            ["topic", "partition"],
            registry=r,
        )
        self.open_windows = Gauge(
            "calm_open_windows", "Windows still collecting events.", ["source"], registry=r
        )
        self.queue_depth = Gauge(
            "calm_num_requests_waiting", "Batches of windows waiting for inference.", registry=r
        )
        self._last_source: dict[str, dict[str, float]] = {}

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe(self, dataset: str, rows: list[dict[str, Any]]) -> None:
        """Rows just made durable in `dataset` (results, telemetry or dlq)."""
        {"results": self._results, "telemetry": self._telemetry, "dlq": self._dead_letters}[
            dataset
        ](rows)

    def observe_source(self, source: str, stats: Mapping[str, Any]) -> None:
        """A source's cumulative counters and current gauges."""
        last = self._last_source.setdefault(source, {"records": 0, "duplicates": 0})
        self.consumed.labels(source).inc(stats["records"] - last["records"])
        self.duplicates.labels(source).inc(stats["duplicates"] - last["duplicates"])
        last.update(records=stats["records"], duplicates=stats["duplicates"])
        self.open_windows.labels(source).set(stats["open_windows"])
        for name, lag in stats["lag"].items():
            topic, partition = parse_partition_name(name)
            self.lag.labels(topic, str(partition)).set(lag)

    def _results(self, rows: Iterable[dict[str, Any]]) -> None:
        now = time.time()
        by_model: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_model.setdefault(_model(row), []).append(row)
        for model, group in by_model.items():
            # Each histogram's child resolved once per model: a row is observed ten times.
            labels = (OPERATION, model)
            tokens_in = self.token_usage.labels(*labels, "input").observe
            tokens_out = self.token_usage.labels(*labels, "output").observe
            duration = self.request_duration.labels(*labels).observe
            first_token = self.time_to_first_token.labels(*labels).observe
            per_token = self.time_per_output_token.labels(*labels).observe
            queue = self.queue_time.labels(*labels).observe
            prefill = self.prefill_time.labels(*labels).observe
            decode = self.decode_time.labels(*labels).observe
            self.results.inc(len(group))
            for row in group:
                self.e2e_latency.observe(max(0.0, now - row["last_ingested"].timestamp()))
                tokens_in(row["tokens_in"])
                tokens_out(row["tokens_out"])
                duration(row["queue_seconds"] + row["prefill_seconds"] + row["decode_seconds"])
                first_token(row["queue_seconds"] + row["prefill_seconds"])
                if row["tokens_out"]:
                    per_token(row["decode_seconds"] / row["tokens_out"])
                queue(row["queue_seconds"])
                prefill(row["prefill_seconds"])
                decode(row["decode_seconds"])
                if row["fact_accuracy"] is not None:
                    self.fact_accuracy.labels(*labels).observe(row["fact_accuracy"])
                    self.invented_facts.labels(*labels).inc(row["invented_facts"])

    def _telemetry(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            labels = (OPERATION, _model(row))
            self.batches.labels(*labels).inc()
            self.prompt_tokens.labels(*labels).inc(row["tokens_in"])
            self.generation_tokens.labels(*labels).inc(row["tokens_out"])
            self.steps.labels(*labels).inc(row["steps"])
            self.draws.labels(*labels).inc(row["draws"])
            if row["steps"]:
                self.tokens_per_step.labels(*labels).observe(row["tokens_per_step"])
            self.flops.labels(*labels).inc(row["flops"])
            self.cost.labels(*labels).inc(row["dollars"])
            self.baseline_flops.labels(*labels).inc(row["baseline_flops"])
            self.baseline_cost.labels(*labels).inc(row["baseline_dollars"])
            if row["dollars_per_1k_tokens"] is not None:
                self.cost_per_1k.labels(*labels).set(row["dollars_per_1k_tokens"])
            if row["dollars_per_step"] is not None:
                self.cost_per_step.labels(*labels).set(row["dollars_per_step"])

    def _dead_letters(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.dead_letters.labels(row["reason"]).inc()


def _model(row: Mapping[str, Any]) -> str:
    return f"{row['model_name']}@{row['model_version']}"


class MetricsReporter:
    """What a source calls with its stats: forwards them, with the request queue's depth, to the
    sink actor that serves the metrics."""

    def __init__(self, sink: Any, queue: Any) -> None:
        self.sink, self.queue = sink, queue

    def __call__(self, name: str, stats: dict[str, Any]) -> None:
        self.sink.observe_source.remote(name, stats, self.queue.qsize())
