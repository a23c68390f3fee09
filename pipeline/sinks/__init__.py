"""Where the pipeline's output lands and how it is read: the Parquet schemas, atomic file
writing, the sink actor, Prometheus metrics and the run report (JSON and HTML)."""
