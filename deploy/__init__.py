"""calm-stream deploy: container images and the model registry
that ships with the package (`SHIPPED_REGISTRY`, the demo's and the commands' default)."""

from pathlib import Path

SHIPPED_REGISTRY = Path(__file__).resolve().parent / "registry"
