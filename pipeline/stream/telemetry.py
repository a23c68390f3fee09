"""The telemetry row of one inference batch (TELEMETRY_SCHEMA in pipeline/sinks/schemas.py).

Tokens, generative steps and tokens per step, queue / prefill / decode seconds, tokens/s,
analytic FLOPs, and the cost: the node's price for the wall-clock time the actor held it since its
previous batch ended (idle time included, spread over the tokens this batch produced), next to
what the discrete baseline would have spent on the same outputs.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from operators.cost import batch_cost
from pipeline.settings import PricingSettings
from pipeline.stream.rows import Generated, Model


@dataclass(frozen=True)
class BatchTiming:
    started: float  # wall clock (epoch seconds) when the batch started
    busy_s: float  # the batch's own run time
    idle_s: float  # the actor's wait since its previous batch ended


def batch_telemetry(
    actor: str,
    model: Model,
    generated: Sequence[Generated],
    rows: Sequence[dict[str, Any]],
    timing: BatchTiming,
    pricing: PricingSettings,
    node_share: float,
) -> dict[str, Any]:
    tokens_out = sum(g.tokens_out for g in generated)
    steps = sum(g.steps for g in generated)
    price = pricing.node_price_per_hour[pricing.node_type]
    cost = batch_cost(
        flops=sum(g.flops for g in generated),
        baseline_flops=sum(g.baseline_flops for g in generated),
        wall_seconds=timing.busy_s + timing.idle_s,
        output_tokens=tokens_out,
        steps=steps,
        price_per_hour=price,
        node_share=node_share,
    )
    return {
        "batch_id": uuid.uuid4().hex,
        "time": datetime.fromtimestamp(timing.started, UTC),
        "actor": actor,
        "model_name": model.name,
        "model_version": model.version,
        "k": model.k,
        "batch_size": len(generated),
        "tokens_in": sum(g.tokens_in for g in generated),
        "tokens_out": tokens_out,
        "steps": steps,
        "draws": sum(g.draws for g in generated),
        "tokens_per_step": tokens_out / steps if steps else None,
        "queue_seconds": sum(r["queue_seconds"] for r in rows) / len(rows) if rows else 0.0,
        "prefill_seconds": max((g.prefill_seconds for g in generated), default=0.0),
        "decode_seconds": max((g.decode_seconds for g in generated), default=0.0),
        "busy_seconds": timing.busy_s,
        "idle_seconds": timing.idle_s,
        "tokens_per_second": tokens_out / timing.busy_s if timing.busy_s > 0 else None,
        "flops": cost.flops,
        "node_type": pricing.node_type,
        "node_price_per_hour": price,
        "node_share": node_share,
        "dollars": cost.dollars,
        "dollars_per_1k_tokens": cost.dollars_per_1k_tokens,
        "dollars_per_step": cost.dollars_per_step,
        "baseline_flops": cost.baseline_flops,
        "baseline_dollars": cost.baseline_dollars,
        "baseline_dollars_per_1k_tokens": cost.baseline_dollars_per_1k_tokens,
    }
