"""`calm-stream bench ...`: one module per benchmark command (generate, sampling, produce,
pipeline, reproduce, recipe); pipeline/cli/bench.py parses their options and prints their JSON."""
