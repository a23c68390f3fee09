"""calm-stream deploy."""
