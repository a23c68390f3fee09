"""The Parquet schemas of a sink root's three datasets: `results/` (one row per window and
entity), `telemetry/` (one row per inference batch) and `dlq/` (one row per dead letter).

They are the sink's contract with its readers (calm-stream report, DuckDB, polars): change a
column here and every reader sees it.
"""

import pyarrow as pa

TIMESTAMP = pa.timestamp("ms", tz="UTC")

# Every column except the timings is a function of the input, the row key and the model version:
# a replayed window yields the same values (see DETERMINISTIC_RESULT_COLUMNS).
RESULT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("entity", pa.string()),
        ("kind", pa.string()),
        ("window_start", TIMESTAMP),
        ("window_end", TIMESTAMP),
        ("first_offset", pa.int64()),
        ("last_offset", pa.int64()),
        ("events", pa.int32()),
        ("last_ingested", TIMESTAMP),  # the Kafka timestamp of the window's newest record
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("output", pa.string()),
        ("finish_reason", pa.string()),
        ("facts", pa.list_(pa.string())),  # the window's facts, as a faithful summary states them
        ("fact_accuracy", pa.float64()),  # null where nothing was summarized
        ("invented_facts", pa.int32()),  # facts the output states that the window does not have
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("k", pa.int32()),
        ("seed", pa.int64()),
        ("tokens_in", pa.int32()),
        ("tokens_out", pa.int32()),
        ("steps", pa.int32()),
        ("draws", pa.int32()),
        ("queue_seconds", pa.float64()),
        ("prefill_seconds", pa.float64()),
        ("decode_seconds", pa.float64()),
        ("latency_seconds", pa.float64()),
    ]
)
TIMING_COLUMNS = ("queue_seconds", "prefill_seconds", "decode_seconds", "latency_seconds")
DETERMINISTIC_RESULT_COLUMNS = tuple(n for n in RESULT_SCHEMA.names if n not in TIMING_COLUMNS)

TELEMETRY_SCHEMA = pa.schema(
    [
        ("batch_id", pa.string()),
        ("time", TIMESTAMP),
        ("actor", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("k", pa.int32()),
        ("batch_size", pa.int32()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("steps", pa.int64()),
        ("draws", pa.int64()),
        ("tokens_per_step", pa.float64()),
        ("queue_seconds", pa.float64()),
        ("prefill_seconds", pa.float64()),
        ("decode_seconds", pa.float64()),
        ("busy_seconds", pa.float64()),
        ("idle_seconds", pa.float64()),
        ("tokens_per_second", pa.float64()),
        ("flops", pa.float64()),
        ("node_type", pa.string()),
        ("node_price_per_hour", pa.float64()),
        ("node_share", pa.float64()),
        ("dollars", pa.float64()),
        ("dollars_per_1k_tokens", pa.float64()),
        ("dollars_per_step", pa.float64()),
        ("baseline_flops", pa.float64()),
        ("baseline_dollars", pa.float64()),
        ("baseline_dollars_per_1k_tokens", pa.float64()),
    ]
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp", TIMESTAMP),
        ("message_key", pa.binary()),
        ("value", pa.binary()),
        ("reason", pa.string()),
        ("field", pa.string()),
        ("message", pa.string()),
        ("routed_to", pa.string()),
        # the producer's own Kafka headers, in order (a key may repeat, a value may be null)
        ("headers", pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))),
    ]
)
