"""calm-stream operators."""
