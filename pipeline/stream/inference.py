"""Inference actors: closed windows in, result rows (rows.py) and per-batch telemetry
(telemetry.py) out to the sink.

Each actor takes lists of `WindowRequest`s off the bounded request queue, tokenizes each prompt
(<bos> + text; the engine left-pads it to a multiple of K), and forms batches by a token budget
(prompt tokens + the output cap of every request) and a latency target (a batch waits at most
`batch_latency_ms` after its first request). The batch runs in the onnxruntime engine of the
current bundle; every request's noise is seeded from its row key and the model version, and the
engine's output for a row does not depend on its batch-mates, so a replayed window yields the
byte-identical row whichever batch it lands in.

Hot reload: with `bundle_version = latest` the actor looks at the registry's `latest` pointer
every few seconds and, when it moved, loads and verifies the new bundle and switches to it
between two batches; each row records the version that produced it.

`Passthrough` stands in for the model when it is switched off (benchmarks of the stream itself):
rows carry the prompt and an empty output, and no token is counted.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import threading
import time
from collections import deque
from typing import Any, Generic, TypeVar

import ray
from ray.util.queue import Empty, Queue

from model.bundle import BundleError, Registry
from model.chunking import num_left_pads
from model.config import CALMConfig, config_from_dict
from model.engine import Engine, Request, Result, Sampling
from model.flops import ar_request_flops, baseline_of, calm_request_flops
from pipeline.settings import ModelSettings, PricingSettings
from pipeline.sinks.sink import Rows
from pipeline.stream.flow import WindowRequest
from pipeline.stream.rows import Generated, Model, result_row
from pipeline.stream.runtime import cap_in_flight
from pipeline.stream.telemetry import BatchTiming, batch_telemetry
from pipeline.wire import pack, unpack

log = logging.getLogger(__name__)
MAX_WRITES_IN_FLIGHT = 2


def row_seed(key: str, model_id: str) -> int:
    """The request's noise seed: a function of the row key and the model version only."""
    return int.from_bytes(hashlib.sha256(f"{key}\n{model_id}".encode()).digest()[:8], "big") >> 1


class Passthrough:
    """The model switched off: no tokens, no compute, the stream and the sinks only."""

    name, version, k, id = "passthrough", "off", 0, "passthrough-off"
    summarizes = False
    # No noise is drawn; frozen, so one instance serves every request.
    nothing = Generated(0, "", "off", 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)

    def cost(self, prompt: str) -> int:
        return 1

    def generate(self, requests: list[WindowRequest]) -> list[Generated]:
        return [self.nothing] * len(requests)


class CalmModel:
    """A bundle's CALM in the onnxruntime engine, with its analytic FLOPs."""

    summarizes = True

    def __init__(self, registry: Registry, version: str, settings: ModelSettings) -> None:
        self.bundle = registry.open(version)
        self.engine = Engine(self.bundle, "calm", threads=settings.intra_op_threads)
        self.name, self.version, self.k = self.bundle.name, self.bundle.version, self.engine.k
        self.config: CALMConfig = config_from_dict(self.engine.config)
        self.baseline = baseline_of(self.config)
        self.sampling = Sampling(settings.temperature, settings.sampler)
        self.max_new_tokens = settings.max_new_tokens
        self._ids: dict[str, list[int]] = {}  # prompt -> ids, between `cost` and `generate`

    @property
    def id(self) -> str:
        return self.bundle.id

    def cost(self, prompt: str) -> int:
        ids = self._ids.get(prompt)
        if ids is None:  # not setdefault: its default would tokenize every time
            ids = self._ids[prompt] = self.engine.prompt_ids(prompt)
        return len(ids) + self.max_new_tokens

    def generate(self, requests: list[WindowRequest]) -> list[Generated]:
        prompts = [
            self._ids.pop(r.prompt, None) or self.engine.prompt_ids(r.prompt) for r in requests
        ]
        seeds = [row_seed(r.key, self.id) for r in requests]
        results = self.engine.generate(
            [Request(ids, seed, self.max_new_tokens) for ids, seed in zip(prompts, seeds)],
            self.sampling,
        )
        return [self._generated(*args) for args in zip(prompts, seeds, results)]

    def _generated(self, ids: list[int], seed: int, result: Result) -> Generated:
        s = result.stats
        chunks = (len(ids) + num_left_pads(len(ids), self.k)) // self.k
        return Generated(
            seed=seed,
            output=result.text,
            finish_reason=result.finish_reason,
            tokens_in=s.tokens_in,
            tokens_out=s.tokens_out,
            steps=s.steps,
            draws=s.head_samples,
            flops=calm_request_flops(self.config, chunks, s.steps, s.head_samples),
            baseline_flops=ar_request_flops(self.baseline, len(ids), s.tokens_out),
            prefill_seconds=s.prefill_s,
            decode_seconds=s.decode_s,
        )


T = TypeVar("T")


class Batcher(Generic[T]):
    """Requests in arrival order, cut into batches by a token budget and a latency target."""

    def __init__(self, token_budget: int, latency_s: float) -> None:
        self.token_budget, self.latency_s = token_budget, latency_s
        self._waiting: deque[tuple[T, int, float]] = deque()  # (request, cost, arrival)
        self._tokens = 0

    def add(self, request: T, cost: int, now: float) -> None:
        self._waiting.append((request, cost, now))
        self._tokens += cost

    def __len__(self) -> int:
        return len(self._waiting)

    def full(self) -> bool:
        return self._tokens >= self.token_budget

    def ready(self, now: float) -> bool:
        """A full budget is waiting, or the oldest request waited the latency target."""
        return bool(self._waiting) and (self.full() or now - self._waiting[0][2] >= self.latency_s)

    def seconds_left(self, now: float) -> float:
        """Until the oldest request reaches the latency target (the target when none waits)."""
        return (
            max(0.0, self._waiting[0][2] + self.latency_s - now)
            if self._waiting
            else self.latency_s
        )

    def take(self) -> list[T]:
        """The oldest requests that fit the budget (at least one)."""
        batch, tokens = [], 0
        while self._waiting and (not batch or tokens + self._waiting[0][1] <= self.token_budget):
            request, cost, _ = self._waiting.popleft()
            batch.append(request)
            tokens += cost
        self._tokens -= tokens
        return batch


@ray.remote(max_concurrency=2)  # `stop` is served while `run` loops
class InferenceActor:
    """Takes requests off `inbox`, runs them in batches, writes rows and telemetry to `sink`."""

    def __init__(
        self,
        name: str,
        inbox: Queue,
        sink: ray.actor.ActorHandle,
        model: ModelSettings,
        pricing: PricingSettings,
        passthrough: bool = False,
        reload_check_s: float = 2.0,
        slowdown_s: float = 0.0,
    ) -> None:
        self.name, self._inbox, self._sink = name, inbox, sink
        self._settings, self._pricing = model, pricing
        self._node_share, self._reload_check_s, self._slowdown_s = 1.0, reload_check_s, slowdown_s
        self._registry = None if passthrough else Registry(model.registry)
        self._model: Model = (
            Passthrough() if passthrough else CalmModel(self._registry, model.bundle_version, model)
        )
        self._batcher: Batcher[WindowRequest] = Batcher(
            model.batch_token_budget, model.batch_latency_ms / 1000
        )
        self._stopping = threading.Event()
        self._writes: list[ray.ObjectRef] = []
        self._last_check = time.monotonic()
        self._last_end = time.monotonic()
        self.stats = {
            "batches": 0,
            "requests": 0,
            "tokens_out": 0,
            "reloads": 0,
            "versions": [self._model.version],
        }

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, node_share: float = 1.0) -> dict[str, Any]:
        """Serve until `stop()`; the batch in hand is finished and written first. `node_share`:
        the part of the node's price this actor pays (1 / inference actors on the node)."""
        self._node_share, cpu_from = node_share, time.process_time()
        while not self._stopping.is_set() or len(self._batcher):
            if not self._stopping.is_set() and not self._batcher.full():  # bounded: no read-ahead
                self._take(self._batcher.seconds_left(time.monotonic()))
            now = time.monotonic()
            if self._batcher.ready(now) or (self._stopping.is_set() and len(self._batcher)):
                self._maybe_reload()
                self._run_batch(self._batcher.take())
        ray.get(self._writes)
        return {
            **self.stats,
            "cpu_seconds": time.process_time() - cpu_from,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    def stop(self) -> None:
        self._stopping.set()

    def _take(self, timeout_s: float) -> None:
        try:
            requests: list[WindowRequest] = unpack(self._inbox.get(timeout=max(timeout_s, 0.01)))
        except Empty:
            return
        now = time.monotonic()
        for request in requests:
            self._batcher.add(request, self._model.cost(request.prompt), now)

    def _maybe_reload(self) -> None:
        if (
            self._registry is None
            or self._settings.bundle_version != "latest"
            or time.monotonic() - self._last_check < self._reload_check_s
        ):
            return
        self._last_check = time.monotonic()
        try:
            latest = self._registry.latest()
            if latest == self._model.id:
                return
            model = CalmModel(self._registry, latest, self._settings)
        except BundleError as error:  # keep serving the current version; try again later
            log.warning("%s: cannot load the registry's latest bundle: %s", self.name, error)
            return
        log.info("%s: switching from %s to %s", self.name, self._model.id, model.id)
        self._model = model
        self.stats["reloads"] += 1
        self.stats["versions"].append(model.version)

    def _run_batch(self, batch: list[WindowRequest]) -> None:
        model, started_wall, started = self._model, time.time(), time.monotonic()
        generated = model.generate(batch)
        if self._slowdown_s:
            time.sleep(self._slowdown_s)  # tests: an artificially slow model
        ended, ended_wall = time.monotonic(), time.time()
        task = self._settings.task
        rows = [
            (
                request.origin,
                result_row(
                    request,
                    out,
                    model,
                    task,
                    max(0.0, started_wall - request.closed_at),  # queue seconds
                    ended_wall,
                ),
            )
            for request, out in zip(batch, generated)
        ]
        timing = BatchTiming(
            started=started_wall, busy_s=ended - started, idle_s=max(0.0, started - self._last_end)
        )
        telemetry = batch_telemetry(
            self.name,
            model,
            generated,
            [r for _, r in rows],
            timing,
            self._pricing,
            self._node_share,
        )
        self._last_end = ended
        self._writes.append(self._sink.write.remote(pack(Rows(rows, [telemetry]))))
        self._writes = cap_in_flight(self._writes, MAX_WRITES_IN_FLIGHT)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["tokens_out"] += sum(g.tokens_out for g in generated)
