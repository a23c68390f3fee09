"""Cost arithmetic of one inference batch: dollars, and the discrete counterfactual's dollars.

- FLOPs are the model's own business (`model.flops`: `calm_request_flops`, `ar_request_flops`);
  this module only prices them, so there is one FLOPs model.
- The counterfactual is the discrete baseline with the same backbone (K = 1, untied vocabulary
  head) producing the same output tokens from the same prompt: one step per token.
- Dollars: the node's price per hour times the wall-clock seconds the actor held it, idle time
  included (the seconds since its previous batch ended, not only the compute), times the share of
  the node the actor holds. The counterfactual dollars scale the measured dollars by the FLOPs
  ratio: the same hardware at the same efficiency, doing the discrete model's work.
"""

from dataclasses import dataclass

SECONDS_PER_HOUR = 3600.0


def dollars(price_per_hour: float, seconds: float, node_share: float = 1.0) -> float:
    """What `seconds` of `node_share` of a node priced `price_per_hour` cost."""
    if price_per_hour < 0 or seconds < 0 or not 0 < node_share <= 1:
        raise ValueError("need price_per_hour >= 0, seconds >= 0 and 0 < node_share <= 1")
    return price_per_hour * node_share * seconds / SECONDS_PER_HOUR


def per_1k(amount: float, tokens: int) -> float | None:
    """`amount` per 1000 tokens; None when nothing was produced (a pass-through batch)."""
    return None if tokens <= 0 else 1000.0 * amount / tokens


@dataclass(frozen=True)
class BatchCost:
    """The cost columns of one telemetry row."""

    flops: float
    dollars: float
    dollars_per_1k_tokens: float | None
    dollars_per_step: float | None
    baseline_flops: float
    baseline_dollars: float
    baseline_dollars_per_1k_tokens: float | None


def batch_cost(
    flops: float,
    baseline_flops: float,
    wall_seconds: float,
    output_tokens: int,
    steps: int,
    price_per_hour: float,
    node_share: float = 1.0,
) -> BatchCost:
    """Cost of a batch that held the actor `wall_seconds` (idle time since the last batch
    included) and produced `output_tokens` in `steps` generative steps."""
    spent = dollars(price_per_hour, wall_seconds, node_share)
    baseline = spent * baseline_flops / flops if flops > 0 else 0.0
    return BatchCost(
        flops=flops,
        dollars=spent,
        dollars_per_1k_tokens=per_1k(spent, output_tokens),
        dollars_per_step=spent / steps if steps > 0 else None,
        baseline_flops=baseline_flops,
        baseline_dollars=baseline,
        baseline_dollars_per_1k_tokens=per_1k(baseline, output_tokens),
    )
