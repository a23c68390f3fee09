"""The training corpus (`calm-stream corpus build`) from simulated streams: simulate, decode,
window, summarize, split by entity, write files.

The windows go through exactly the operators the streaming pipeline runs (decode with the
wall-clock future check, event-time windows with watermark and lateness), so training windows
look like production windows, imperfect deliveries included.
"""

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.corpus import SPLITS, assign_splits, build_records
from operators.decode import DecodeError, decode
from operators.windows import ClosedWindow, Rejected, Windower, WindowSpec
from pipeline.sim.simulator import Mess, simulate

WINDOW_S = 300.0  # the pipeline's default window (settings.windows.size_seconds)
BLOCKS_PER_ENTITY = 24  # about two hours of each entity's life
CORPUS_RATES = {
    "iot": {"spike": 0.06, "stuck": 0.06, "dropout": 0.06, "drift": 0.06},
    "transactions": {"burst": 0.04, "card_testing": 0.04, "geo_impossible": 0.04},
}
CORPUS_MESS = Mess(late=0.005, reordered=0.02, duplicate=0.005, malformed=0.005)
TXN_WINDOWS_PER_BLOCK = 0.4  # share of account-blocks with at least one payment


def window_stream(
    values: Iterable[bytes], windower: Windower, now: datetime
) -> Iterator[ClosedWindow | Rejected | DecodeError]:
    """The pipeline's operators offline: decode each value, window the events, then flush."""
    for value in values:
        event = decode(value, now=now)
        yield from [event] if isinstance(event, DecodeError) else windower.add(event)
    yield from windower.flush()


def simulated_windows(
    kind: Literal["iot", "transactions"], seed: int, count: int
) -> tuple[list[ClosedWindow], list[str]]:
    """The first `count` windows of a seeded stream, and all entities of that stream."""
    per_entity = BLOCKS_PER_ENTITY * (1 if kind == "iot" else TXN_WINDOWS_PER_BLOCK)
    sim = simulate(
        kind,
        seed,
        max(10, math.ceil(count / per_entity)),
        CORPUS_RATES[kind],
        CORPUS_MESS,
        WINDOW_S,
    )
    windower = Windower(WindowSpec.from_seconds(WINDOW_S, delay=30, lateness=60))
    outputs = window_stream((m.value for m in sim.messages()), windower, datetime.now(UTC))
    windows = itertools.islice((out for out in outputs if isinstance(out, ClosedWindow)), count)
    return list(windows), list(sim.source.ids)


def corpus_records(seed: int, windows: int) -> Iterator[dict[str, Any]]:
    """Half IoT, half transaction windows, each kind split by entity with the same seed."""
    for kind, count in (("iot", windows - windows // 2), ("transactions", windows // 2)):
        kind_windows, entities = simulated_windows(kind, seed, count)
        yield from build_records(kind_windows, assign_splits(entities, seed))


def write_corpus(
    out_dir: Path, seed: int, windows: int, fmt: Literal["parquet", "jsonl"] = "parquet"
) -> dict:
    """Write train/valid/test files and a manifest; return the manifest."""
    if windows < 1:
        raise ValueError("windows must be >= 1")
    records = list(corpus_records(seed, windows))
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows = [r for r in records if r["split"] == split]
        path = out_dir / f"{split}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), path)
        else:
            path.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
            )
    manifest = {
        "seed": seed,
        "format": fmt,
        "window_seconds": WINDOW_S,
        "windows": {s: sum(r["split"] == s for r in records) for s in SPLITS},
        "entities": {s: len({r["entity"] for r in records if r["split"] == s}) for s in SPLITS},
        "kinds": dict(Counter(r["kind"] for r in records)),
        "anomalous_windows": sum(bool(r["anomalies"]) for r in records),
        "anomalies": dict(Counter(a for r in records for a in r["anomalies"])),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


RECORD_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("kind", pa.string()),
        ("entity", pa.string()),
        ("window_start_ms", pa.int64()),
        ("window_end_ms", pa.int64()),
        ("events", pa.int64()),
        ("anomalies", pa.list_(pa.string())),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("facts", pa.list_(pa.string())),
    ]
)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSONL file (corpus splits, or generated outputs to evaluate)."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]
    raise ValueError(f"{path}: expected a .parquet or .jsonl file")


def token_stats(out_dir: Path, vocab_size: int = 4096) -> dict[str, Any]:
    """Prompt and reference lengths in tokens of a byte-level BPE trained on the train split."""
    from model.tokenizer import Tokenizer  # the project's tokenizer (tokenizers' byte-level BPE)

    fmt = json.loads((out_dir / "manifest.json").read_text())["format"]
    splits = {s: read_records(out_dir / f"{s}.{fmt}") for s in SPLITS}
    train = splits["train"]
    tokenizer = Tokenizer.train(
        (t for r in train for t in (r["prompt"], r["reference"])), vocab_size
    )
    stats: dict[str, Any] = {
        "tokenizer": "model.tokenizer.Tokenizer (byte-level BPE)",
        "vocab_size": tokenizer.vocab_size,
    }
    for split, rows in splits.items():
        for field in ("prompt", "reference"):
            lengths = np.array(
                [len(ids) for ids in tokenizer.encode_batch([r[field] for r in rows])]
            )
            stats[f"{split}.{field}"] = (
                {
                    "mean": round(float(lengths.mean()), 1),
                    "p50": int(np.percentile(lengths, 50)),
                    "p95": int(np.percentile(lengths, 95)),
                    "max": int(lengths.max()),
                }
                if len(lengths)
                else {}
            )
    return stats
