"""The demo bundle shipped in deploy/registry: its hashes verify, its manifest is complete, and it
writes summaries of simulated event windows in onnxruntime."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support import REPO

from model.bundle import Registry
from model.engine import Engine, Request, Sampling
from operators.facts import score
from pipeline.bench.generate import simulated_prompts
from pipeline.settings import ModelSettings

SHIPPED = REPO / "deploy" / "registry"


@pytest.fixture(scope="module")
def bundle():
    return Registry(SHIPPED).open("latest")  # verifies every file's sha256


def test_every_version_in_the_shipped_registry_verifies_and_is_small():
    registry = Registry(SHIPPED)
    assert registry.latest() in registry.versions()
    for version in registry.versions():
        bundle = registry.open(version)
        size = sum(entry["bytes"] for entry in bundle.manifest["files"].values())
        # CALM and its AR baseline's graphs, float16: the repository ships at most ~25 MB
        assert size <= 25e6, f"{version} is {size / 1e6:.1f} MB; the repo ships at most ~25 MB"


def held_out(metrics: dict, name: str) -> float:
    """A training metric on the test split (the training job prefixes the split's name)."""
    return metrics[f"test_{name}"]


def test_manifest_carries_metrics_and_recipe(bundle):
    manifest = bundle.manifest
    assert manifest["k"] == 4 and set(manifest["models"]) == {"calm", "ar"}
    for model in ("calm", "ar"):
        assert 0 <= held_out(manifest["metrics"][model], "fact_accuracy") <= 1
        assert held_out(manifest["metrics"][model], "brier_lm") > 0
        assert manifest["flops_per_token"][model]["base"] > 0
    assert 0 < held_out(manifest["metrics"]["autoencoder"], "recon_acc") <= 1
    assert 0 <= manifest["metrics"]["onnxruntime"]["calm"]["fact_accuracy"] <= 1
    assert manifest["recipe"]["run"] and manifest["recipe"]["stages"]["calm"]["steps"] > 0


def test_demo_bundle_summarizes_event_windows(bundle):
    settings = ModelSettings()
    engine = Engine(bundle, "calm", threads=1)
    records = simulated_prompts(8)
    requests = [
        Request(engine.prompt_ids(r["prompt"]), seed=i, max_new_tokens=settings.max_new_tokens)
        for i, r in enumerate(records)
    ]
    sampling = Sampling(settings.temperature, settings.sampler)
    results = engine.generate(requests, sampling)
    assert [r.tokens for r in engine.generate(requests[:2], sampling)] == [
        r.tokens for r in results[:2]
    ]
    # The manifest holds what onnxruntime measured on 64 held-out windows when the bundle was
    # exported; the means over 8 fresh windows must agree with it within 3 standard errors.
    measured = bundle.manifest["metrics"]["onnxruntime"]["calm"]
    eos = [r.finish_reason == "eos" for r in results]
    p = measured["ended_on_eos"]
    assert abs(np.mean(eos) - p) <= 3 * np.sqrt(p * (1 - p) / len(eos)) + 1e-9, eos
    accuracy = [score(r.text.strip(), rec["facts"]).accuracy for r, rec in zip(results, records)]
    spread = measured["fact_accuracy_stderr"] * np.sqrt(measured["windows"])  # one window's std
    assert abs(np.mean(accuracy) - measured["fact_accuracy"]) <= 3 * spread / np.sqrt(8), (
        accuracy,
        [r.text for r in results],
    )


def test_generate_finds_the_shipped_registry_when_none_is_configured(tmp_path):
    """`calm-stream generate` from a folder with no registry of its own (settings left at their
    default) uses the bundle shipped with the package; a registry set by the user is not replaced."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALM_STREAM_")}
    prompt = simulated_prompts(1)[0]["prompt"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    shipped = cli("generate", "--json", "--max-new-tokens", "8", prompt)
    assert shipped.returncode == 0, shipped.stderr
    assert json.loads(shipped.stdout.splitlines()[0])["bundle"] == Registry(SHIPPED).latest()
    configured = cli("--set", f"model.registry={tmp_path / 'mine'}", "generate", prompt)
    assert configured.returncode != 0 and "mine" in configured.stderr
