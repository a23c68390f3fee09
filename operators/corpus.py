"""Windows -> (prompt, reference summary) training records, split by entity.

The split is by entity, not by window: every window of a device or account lands in the same
split, so the test split measures summaries of devices and accounts the model never saw.
"""

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from operators.facts import facts_list, reference_facts
from operators.prompts import render_prompt
from operators.stats import IotStats, window_stats
from operators.summaries import summarize
from operators.windows import ClosedWindow

SPLITS = ("train", "valid", "test")


def assign_splits(
    entities: Iterable[str], seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, str]:
    """Entity -> split: entities ordered by a seeded hash, then cut at the fractions."""
    if (
        len(fractions) != len(SPLITS)
        or any(f < 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-9
    ):
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1")
    ordered = sorted(set(entities), key=lambda e: hashlib.sha256(f"{seed}|{e}".encode()).digest())
    cuts = [round(sum(fractions[: i + 1]) * len(ordered)) for i in range(len(SPLITS))]
    split_of, begin = {}, 0
    for name, end in zip(SPLITS, cuts):
        split_of.update((e, name) for e in ordered[begin:end])
        begin = end
    return split_of


def window_record(window: ClosedWindow) -> dict[str, Any]:
    """One training record: the prompt, the reference summary and the facts it states."""
    stats = window_stats(window.key, window.start_ms, window.end_ms, window.events)
    return {
        "kind": "iot" if isinstance(stats, IotStats) else "transaction",
        "entity": window.key,
        "window_start_ms": window.start_ms,
        "window_end_ms": window.end_ms,
        "events": len(window.records),
        "anomalies": sorted({a.type for a in stats.anomalies}),
        "prompt": render_prompt(stats),
        "reference": summarize(stats),
        "facts": facts_list(reference_facts(stats)),
    }


def build_records(
    windows: Iterable[ClosedWindow], split_of: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """Records with their split; an entity missing from `split_of` is an error, not a leak."""
    for window in windows:
        if window.key not in split_of:
            raise KeyError(f"entity {window.key!r} has no split")
        yield {"split": split_of[window.key], **window_record(window)}
