"""calm-stream model."""
