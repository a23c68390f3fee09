"""The result row of one window: what the model made of its request (`Generated`), scored for
faithfulness against the window's facts, beside the window's identity and timings. The columns
are pipeline/sinks/schemas.py's RESULT_SCHEMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from operators.events import from_millis
from operators.facts import score
from pipeline.stream.flow import WindowRequest


@dataclass(frozen=True)
class Generated:
    """One request's output, the noise seed it was drawn with, and its accounting."""

    seed: int
    output: str
    finish_reason: str
    tokens_in: int
    tokens_out: int
    steps: int
    draws: int
    flops: float
    baseline_flops: float
    prefill_seconds: float
    decode_seconds: float


class Model(Protocol):
    name: str
    version: str
    k: int
    id: str  # the bundle directory name, `<name>-<version>`
    summarizes: bool  # False for a stand-in that generates nothing (the model switched off)

    def cost(self, prompt: str) -> int: ...

    def generate(self, requests: list[WindowRequest]) -> list[Generated]: ...


def faithfulness(
    request: WindowRequest, generated: Generated, model: Model, task: str
) -> dict[str, Any]:
    """How faithful a summary is to its window: the share of the window's facts it states
    correctly (operators.facts) and how many facts it states that the window does not have.
    None where nothing was summarized (another task, or the model switched off)."""
    if task != "summarize" or not model.summarizes:
        return {"fact_accuracy": None, "invented_facts": None}
    s = score(generated.output, request.facts)
    return {"fact_accuracy": s.accuracy, "invented_facts": s.stated - s.matched}


def result_row(
    request: WindowRequest,
    generated: Generated,
    model: Model,
    task: str,
    queue_seconds: float,
    finished_at: float,
) -> dict[str, Any]:
    return {
        "key": request.key,
        "topic": request.topic,
        "partition": request.partition,
        "entity": request.entity,
        "kind": request.kind,
        "window_start": from_millis(request.start_ms),
        "window_end": from_millis(request.end_ms),
        "first_offset": request.first_offset,
        "last_offset": request.last_offset,
        "events": request.events,
        "last_ingested": from_millis(request.last_ingested_ms),
        "task": task,
        "prompt": request.prompt,
        "output": generated.output,
        "finish_reason": generated.finish_reason,
        "facts": list(request.facts),
        **faithfulness(request, generated, model, task),
        "model_name": model.name,
        "model_version": model.version,
        "k": model.k,
        "seed": generated.seed,
        "tokens_in": generated.tokens_in,
        "tokens_out": generated.tokens_out,
        "steps": generated.steps,
        "draws": generated.draws,
        "queue_seconds": queue_seconds,
        "prefill_seconds": generated.prefill_seconds,
        "decode_seconds": generated.decode_seconds,
        "latency_seconds": max(0.0, finished_at - request.last_ingested_ms / 1000),
    }
