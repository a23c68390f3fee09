"""The serving path (bundle, engine, `generate` command) runs where torch and onnx cannot be imported."""

import json
import subprocess
import sys
import textwrap

import pytest
from support import REPO, export_untrained_bundle

from model.bundle import Registry
from model.engine import Engine, Request, Sampling
from model.tokenizer import Tokenizer

BLOCKER = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("torch", "onnx"):
            raise ImportError(f"{name} is blocked: the serving path must not import it")

sys.meta_path.insert(0, Blocked())
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    texts = ["sensor dev-0001 reported 12 readings", "no anomalies"]
    Registry(root / "registry").publish(export_untrained_bundle(root, texts, "serve", "1"))
    return root / "registry"


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_blocks():
    done = run_blocked("import torch")
    assert done.returncode != 0 and "torch is blocked" in done.stderr


def test_engine_generates_without_torch(registry):
    done = run_blocked(f"""
        import json, sys
        from model.bundle import Registry
        from model.engine import Engine, Request, Sampling
        import pipeline.cli.model, pipeline.stream.inference, pipeline.bench.generate
        bundle = Registry({str(registry)!r}).open()
        engine = Engine(bundle, "calm")
        out = engine.generate([Request(engine.prompt_ids("sensor"), seed=3, max_new_tokens=9)],
                              Sampling(0.5))
        heavy = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "onnx"))
        print(json.dumps({{"tokens": out[0].tokens, "heavy": heavy}}))
    """)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["heavy"] == []
    engine = Engine(Registry(registry).open(), "calm")  # here, with torch importable
    same = engine.generate([Request(engine.prompt_ids("sensor"), 3, 9)], Sampling(0.5))[0]
    assert report["tokens"] == same.tokens


def test_generate_command_without_torch(registry):
    """`calm-stream generate` as a serving image without torch runs it (the real entry point)."""
    done = run_blocked(f"""
        from pipeline.cli.app import app
        app(["--set", "model.registry={registry}", "generate", "sensor dev", "--max-new-tokens",
             "8", "--seed", "5", "--json"])
    """)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["bundle"] == "serve-1" and row["model"] == "calm"
    assert row["tokens_in"] == 1 + len(
        Tokenizer.load(registry / "serve-1" / "tokenizer.json").encode("sensor dev")
    )
    assert row["tokens_out"] <= 8 and row["finish_reason"] in ("eos", "length")
