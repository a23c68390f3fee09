"""`python -m pipeline.cli`: the same `calm-stream` app, for a tree that is not installed."""

from pipeline.cli.app import app

app()
