"""The streaming job: Kafka source actors, the per-partition flow (decode, windows, prompts),
inference actors and their rows and telemetry, the dead-letter writer, the Ray runtime and the
job that wires them together."""
