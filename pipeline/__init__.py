"""calm-stream pipeline."""
