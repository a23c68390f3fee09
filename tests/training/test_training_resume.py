"""Kill-and-resume on a real local Ray: a two-worker AR run, and a CALM run with the recipe's
training options (summary-only loss, the training-only auxiliary head, shrunk targets), stopped
after the first checkpoint and resumed end at the same step with bit-identical weights to an
uninterrupted run of the same seed.

Bitwise equality holds because the batch of step s and the RNG of step s are functions of
(seed, s) and the weights, optimizer moments and scheduler are restored exactly; with the same
number of workers gloo's all-reduce adds in the same order. (A run resumed with a different
number of workers sees the same global batches but may differ by float rounding.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from model.data import wikitext_path
from pipeline.training.job import TrainRequest, run_training
from pipeline.training.stages import CONFIG_DIR, load_train_config
from pipeline.training.worker import weights_digest

# stage -> overrides; CALM's auxiliary head lives in trainer_state.pt, beside the checkpoint
STAGES = {
    "ar": ["ar.train.loss_on=summary"],
    "calm": [
        "calm.train.loss_on=summary",
        "calm.train.aux_weight=0.5",
        "calm.train.target_scale=0.5",
        "autoencoder.train.steps=10",
    ],
}


def steps(stage: str) -> list[str]:
    return [
        f"{stage}.train.steps=20",
        f"{stage}.train.checkpoint_every=10",
        f"{stage}.train.log_every=5",
        "valid_fraction=0.25",
        *STAGES[stage],
    ]


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """Eight WikiText-103 documents as a plain {text} JSONL corpus (the documents corpus path)."""
    lines = wikitext_path().read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("resume-corpus") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def request_for(
    documents: Path, storage: Path, name: str, stage: str, *overrides: str
) -> TrainRequest:
    config = load_train_config(CONFIG_DIR / "tiny.yaml", [*steps(stage), *overrides])
    return TrainRequest(
        config, str(documents), f"file://{storage}", name, stages=(stage,), workers=2
    )


def final_digest(storage: Path, name: str, stage: str) -> tuple[int, str]:
    marker = json.loads((storage / name / stage / "complete.json").read_text())
    model = load_checkpoint(storage / name / marker["final_checkpoint"])
    assert weights_digest(model) == marker["weights_digest"]
    return marker["steps"], marker["weights_digest"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(
    ray_local, documents, tmp_path, stage
):
    storage = tmp_path / "runs"
    whole = run_training(request_for(documents, storage, "whole", stage))
    assert whole[stage]["status"] == "complete"

    stopped = run_training(
        request_for(documents, storage, "killed", stage, f"{stage}.train.stop_after_step=10")
    )
    assert (stopped[stage]["status"], stopped[stage]["steps"]) == ("stopped", 10)
    assert not (storage / "killed" / stage / "complete.json").exists()
    resumed = run_training(
        dataclasses.replace(request_for(documents, storage, "killed", stage), resume=True)
    )
    assert resumed[stage]["status"] == "complete"

    assert (
        final_digest(storage, "killed", stage)
        == final_digest(storage, "whole", stage)
        == (20, whole[stage]["weights_digest"])
    )
    rows = metrics(storage, "killed", stage)
    assert [r["step"] for r in rows if r["kind"] == "start"] == [0, 10]  # fresh, then resumed
    assert [r["step"] for r in rows if r["kind"] == "train"] == [5, 10, 15, 20]
    # the resumed run logged exactly the losses of the uninterrupted one
    assert train_losses(rows) == train_losses(metrics(storage, "whole", stage))

    # killed after the last checkpoint but before the driver wrote complete.json: the resumed
    # stage trains no further step and is completed from Ray Train's latest checkpoint
    (storage / "killed" / stage / "complete.json").unlink()
    again = run_training(
        dataclasses.replace(request_for(documents, storage, "killed", stage), resume=True)
    )
    assert (again[stage]["status"], again[stage]["steps"]) == ("complete", 20)
    assert final_digest(storage, "killed", stage) == (20, whole[stage]["weights_digest"])
    assert train_losses(metrics(storage, "killed", stage)) == train_losses(rows)


def metrics(storage: Path, name: str, stage: str) -> list[dict]:
    return [
        json.loads(line)
        for line in (storage / name / stage / "metrics.jsonl").read_text().splitlines()
    ]


def train_losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
