"""The training job on a real local Ray: two DDP workers train every stage on a tiny domain corpus.

One run (tokenizer -> autoencoder -> CALM -> AR, 2 workers x 1 CPU, the tiny recipe) is shared by
the tests of this module; each test reads what the run left in its storage.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import typer
from support import REPO
from typer.testing import CliRunner

from model.checkpoint import load_checkpoint
from model.config import config_from_dict
from model.train_loops import lr_factor
from pipeline.bench.recipe import Budget, load_assets, run_study
from pipeline.cli.train import train
from pipeline.sim.corpus import write_corpus
from pipeline.training.evaluation import brier_context
from pipeline.training.job import TrainJobError, TrainRequest, run_training
from pipeline.training.stages import CONFIG_DIR, TrainConfigError, load_train_config, plan_stages
from pipeline.training.worker import weights_digest

TINY = CONFIG_DIR / "tiny.yaml"
MODEL_STAGES = ("autoencoder", "calm", "ar")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """(request, outcomes) of one full two-worker run with the sample indices recorded."""
    root = tmp_path_factory.mktemp("train-job")
    write_corpus(root / "corpus", seed=0, windows=120, fmt="parquet")
    config = load_train_config(TINY, [f"{s}.train.log_samples=true" for s in MODEL_STAGES])
    request = TrainRequest(config, str(root / "corpus"), str(root / "runs"), "tiny", workers=2)
    return request, run_training(request)


@pytest.mark.slow
def test_every_stage_completes_and_loss_falls(trained):
    request, outcomes = trained
    assert [outcomes[s]["status"] for s in ("tokenizer", *MODEL_STAGES)] == ["complete"] * 4
    for stage in MODEL_STAGES:
        rows = [
            r
            for r in read_jsonl(Path(request.storage) / "tiny" / stage / "metrics.jsonl")
            if r["kind"] == "train"
        ]
        assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
        first, last = rows[0]["loss"], rows[-1]["loss"]
        assert last < 0.95 * first, f"{stage}: loss {first:.4f} -> {last:.4f}"
        assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
        flops = [r["train_flops"] for r in rows]
        assert flops == sorted(flops) and flops[0] > 0


@pytest.mark.slow
def test_the_two_workers_saw_disjoint_shards_of_each_global_batch(trained):
    request, _ = trained
    for stage in MODEL_STAGES:
        rows = read_jsonl(Path(request.storage) / "tiny" / stage / "samples.jsonl")
        seen: dict[int, dict[int, list[int]]] = defaultdict(dict)
        for row in rows:
            seen[row["step"]][row["rank"]] = row["indices"]
        assert sorted(seen) == list(range(1, 31))
        batch = request.config.stage(stage).train.batch_size
        epoch_seen: list[int] = []
        for step, ranks in seen.items():
            assert sorted(ranks) == [0, 1]
            assert len(ranks[0]) == len(ranks[1]) == batch // 2
            assert not set(ranks[0]) & set(ranks[1]), f"{stage} step {step}: ranks share samples"
            epoch_seen += ranks[0] + ranks[1]
        # 30 steps stay inside the first epoch for every stage: no sample is seen twice
        assert len(epoch_seen) == len(set(epoch_seen))


@pytest.mark.slow
def test_final_checkpoints_reload_to_the_trained_weights(trained):
    request, _ = trained
    run_dir = Path(request.storage) / "tiny"
    for stage in MODEL_STAGES:
        marker = json.loads((run_dir / stage / "complete.json").read_text())
        model = load_checkpoint(run_dir / marker["final_checkpoint"])
        assert weights_digest(model) == marker["weights_digest"]
        assert model.config == config_from_dict(
            json.loads((run_dir / marker["final_checkpoint"] / "config.json").read_text())
        )
    calm = load_checkpoint(run_dir / "calm" / "step_0000030")
    autoencoder = load_checkpoint(run_dir / "autoencoder" / "step_0000030")
    # CALM trained around the autoencoder stage's weights, frozen
    assert weights_digest(calm.autoencoder) == weights_digest(autoencoder)


@pytest.mark.slow
def test_evaluations_report_the_paper_metrics(trained):
    _, outcomes = trained
    ae = outcomes["autoencoder"]["metrics"]
    assert 0 <= ae["valid_recon_acc"] <= 1 and "valid_recon_acc_sigma0.3" in ae
    for stage in ("calm", "ar"):
        metrics = outcomes[stage]["metrics"]
        for split in ("valid", "test"):
            assert 0 <= metrics[f"{split}_brier_lm"] <= 100
            assert 0 <= metrics[f"{split}_fact_accuracy"] <= 1
        assert outcomes[stage]["cost"]["inference_flops_per_token"] > 0
    assert (
        "valid_brier_lm_rb" in outcomes["ar"]["metrics"]
    )  # exact probabilities: the AR baseline only


@pytest.mark.slow
def test_a_finished_run_is_not_redone_and_is_not_overwritten(trained):
    request, _ = trained
    run_dir = Path(request.storage) / "tiny"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(TrainJobError, match="already exists"):
        run_training(request)
    again = run_training(dataclasses.replace(request, resume=True))
    assert {s: again[s]["status"] for s in MODEL_STAGES} == dict.fromkeys(MODEL_STAGES, "complete")
    changed = [p for p, t in before.items() if p.name != "run.json" and p.stat().st_mtime_ns != t]
    assert not changed
    changed_config = load_train_config(TINY, ["ar.train.lr=0.01"])
    with pytest.raises(
        TrainJobError, match=r"stage ar was started with a different config \(train.lr\)"
    ):
        run_training(dataclasses.replace(request, config=changed_config, resume=True))


def test_config_overrides_and_errors_name_the_field():
    config = load_train_config(TINY, ["calm.train.steps=7", "ar.model.backbone.n_layers=3"])
    assert config.calm.train.steps == 7 and config.ar.model.backbone.n_layers == 3
    with pytest.raises(TrainConfigError, match=r"calm.model: vocab_size cannot be set"):
        load_train_config(TINY, ["calm.model.backbone.vocab_size=99"])
    with pytest.raises(TrainConfigError, match=r"autoencoder.train.steps: Input should be greater"):
        load_train_config(TINY, ["autoencoder.train.steps=0"])
    with pytest.raises(TrainConfigError, match=r"ar.model.backbone.nope"):
        load_train_config(TINY, ["ar.model.backbone.nope=1"])
    assert plan_stages(["calm"]) == ["tokenizer", "autoencoder", "calm"]
    assert plan_stages(["ar"]) == ["tokenizer", "ar"]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_brierlm_fits_the_positions_when_rows_fill_the_backbone(k):
    """row_len / k == max_seq_len: the context BrierLM conditions on leaves room for the rollout
    (CALM) and for the exact n-gram probabilities (AR) without exceeding max_seq_len."""
    import torch

    from model.ar import ARModel
    from model.calm import CALM
    from model.config import ARConfig, AutoencoderConfig, BackboneConfig, CALMConfig
    from model.evaluate import evaluate_model
    from model.tokenizer import BOS_ID

    torch.manual_seed(0)
    backbone = BackboneConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    backbone = dataclasses.replace(backbone, max_seq_len=8)
    if k == 1:
        model = ARModel(ARConfig(backbone=backbone))
    else:
        ae = AutoencoderConfig(vocab_size=300, k=k, d_model=16, d_ff=32, latent_dim=4)
        model = CALM(CALMConfig(backbone=backbone, autoencoder=ae, noise_dim=4, head_layers=1))
    docs = [np.array([BOS_ID, *range(10 + d, 10 + d + 40)]) for d in range(2)]
    context = brier_context(model.config, row_len=8 * k)
    report = evaluate_model(model.eval(), docs, context, max_positions=8, batch_size=8)
    assert report.estimators["two_sample"].positions == 8


def test_learning_rate_warms_up_then_decays_to_the_floor():
    factors = np.array([lr_factor(s, 100, 10, 0.1) for s in range(100)])
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert np.all(np.diff(factors[10:]) <= 0) and factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_the_command_refuses_a_bad_corpus_or_override_before_starting_ray(tmp_path):
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as under `calm-stream`
    app.command("train")(train)
    runner = CliRunner()
    missing = runner.invoke(app, ["train", "--corpus", str(tmp_path / "missing.jsonl")])
    assert missing.exit_code == 2 and "missing.jsonl: corpus not found" in missing.output
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n')
    bad = runner.invoke(
        app, ["train", "--corpus", str(tmp_path / "docs.jsonl"), "--set", "ar.train.lr=-1"]
    )
    assert bad.exit_code == 2 and "ar.train.lr: Input should be greater than 0" in bad.output


WITHOUT_TORCH = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("torch", "onnx"):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, Blocked())
from typer.testing import CliRunner
from pipeline.cli.app import app

for args in (["--help"], ["train", "--help"], ["bench", "reproduce", "--help"],
             ["bench", "recipe", "--help"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
print(sorted(m for m in sys.modules if m.startswith(("ray.train", "pipeline.training."))))
"""


def test_the_training_commands_are_listed_where_torch_is_not_installed():
    """The runtime image has no torch: `calm-stream --help` must not import the training job."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_TORCH)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # the training config and the recipe study's arm table: torch-free by design
    expected = [
        "pipeline.training.recipe_arms",
        "pipeline.training.stages",
        "pipeline.training.storage",
    ]
    assert done.stdout.strip() == str(expected)


@pytest.mark.slow
def test_the_recipe_study_trains_arms_side_by_side_on_the_runs_autoencoder(trained, tmp_path):
    """`calm-stream bench recipe` on the run's tokenizer and autoencoder: every arm trains for
    the same CPU budget and leaves its learning curve, final scores and the plot."""
    request, _ = trained
    rows = ["calm.train.row_len=256", "ar.train.row_len=256"]  # a whole document per row
    assets = load_assets(Path(request.storage) / "tiny", request.corpus, str(TINY), rows)
    table = run_study(
        assets, ["aux", "ar-aligned"], tmp_path, Budget(cpu_seconds=3.0), evaluations=2, parallel=2
    )
    assert [row["arm"] for row in table["rows"]] == ["aux", "ar-aligned"]
    for row in table["rows"]:
        assert row["steps"] > 0 and row["train_cpu_seconds"] >= 3.0
        result = json.loads((tmp_path / f"{row['arm']}.json").read_text())
        assert result["curve"][0]["step"] == 0 and len(result["curve"]) >= 2
        assert all("summary_loss" in p for p in result["curve"])
        assert {"brier_lm", "fact_accuracy", "draws_per_step"} <= set(result["final"])
    aux = json.loads((tmp_path / "aux.json").read_text())
    assert all("digit_chunk_acc" in p for p in aux["curve"])  # CALM's teacher-forced accuracy
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "| aux |" in (tmp_path / "table.md").read_text()
    # a step budget (the study on an accelerator): exactly that many steps, evaluated on the way
    by_steps = run_study(assets, ["aux"], tmp_path / "steps", Budget(steps=6), 2, parallel=1)
    assert by_steps["rows"][0]["steps"] == 6 and by_steps["budget"] == "6 optimiser steps per arm"
    curve = json.loads((tmp_path / "steps" / "aux.json").read_text())["curve"]
    assert [point["step"] for point in curve] == [0, 3, 6]
