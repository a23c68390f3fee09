"""The recipe study (`calm-stream bench recipe`): which training recipe teaches a small CALM the
domain task fastest, arms side by side under one budget.

Every arm trains from the same tokenizer and autoencoder (those of a training run, so the arms
differ only in what they change), on the same domain corpus, for the same budget: training CPU
seconds (its process's CPU time, evaluation not counted: on a shared 2-core box wall time measures
the neighbours as much as the arm), its learning rate annealed by that clock rather than by a step
count that no arm knows in advance; or optimiser steps, on an accelerator (`device`), where
CPU time measures kernel launches and a step-count curve says how many steps a recipe needs
wherever it runs. At every evaluation point, on held-out documents: the loss on the
summaries' chunks only (CALM: energy; AR: cross-entropy) and CALM's teacher-forced chunk accuracy
on all summary chunks and on those holding a digit (pipeline.training.evaluation.summary_metrics).
At the end, on the test split (entities never trained on): BrierLM, fact accuracy (precision,
recall) of summaries generated at the serving temperature, head draws per generative step,
steps and wall time. Output: one JSON per arm, table.json, table.md and curves.png in `--out`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch

from model.ar import ARModel
from model.calm import CALM
from model.checkpoint import load_checkpoint
from model.config import ARConfig, CALMConfig
from model.objectives import CALMObjective
from model.tokenizer import Tokenizer
from model.train_loops import lr_factor, make_optimizer, train_step
from pipeline.training.corpus import (
    ShardSampler,
    TokenCorpus,
    domain_table,
    inspect_corpus,
    sample_space,
    token_corpus,
    tokenize_records,
    tokenizer_from_json,
)
from pipeline.training.evaluation import (
    brier_context,
    brier_metrics,
    digit_ids,
    fact_metrics,
    summary_metrics,
)
from pipeline.training.recipe_arms import ARMS, Arm
from pipeline.training.stages import EvalSpec, TrainSpec, load_train_config


@dataclass(frozen=True)
class Budget:
    """What every arm gets the same amount of: training CPU seconds or optimiser steps."""

    cpu_seconds: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if (self.cpu_seconds is None) == (self.steps is None):
            raise ValueError("a budget is CPU seconds or steps, one of the two")

    def progress(self, clock: float, step: int) -> float:
        """How much of the budget is spent (0..1) after `step` steps and `clock` CPU seconds."""
        return step / self.steps if self.steps else clock / self.cpu_seconds

    def describe(self) -> str:
        if self.steps:
            return f"{self.steps} optimiser steps per arm"
        return f"{self.cpu_seconds / 60:g} training CPU minutes per arm"


@dataclass(frozen=True)
class StudyAssets:
    """What every arm shares: the run's tokenizer and autoencoder, the corpus, the settings."""

    tokenizer_json: str
    autoencoder_dir: str
    splits: dict[str, TokenCorpus]
    calm: CALMConfig
    ar: ARConfig
    calm_train: TrainSpec
    ar_train: TrainSpec
    evaluation: EvalSpec
    seed: int


def load_assets(run: Path, corpus: str, config: str | None, overrides: list[str]) -> StudyAssets:
    """The tokenizer and autoencoder of `run` (a `calm-stream train` run directory), the domain
    corpus tokenized with it, and the model and training settings of `config`."""
    tokenizer_path = run / "tokenizer" / "tokenizer.json"
    marker = run / "autoencoder" / "complete.json"
    if not tokenizer_path.is_file() or not marker.is_file():
        raise FileNotFoundError(
            f"{run}: needs a trained tokenizer and autoencoder "
            "(`calm-stream train --stage autoencoder --run-name NAME` writes them)"
        )
    autoencoder_dir = run / json.loads(marker.read_text())["final_checkpoint"]
    source = inspect_corpus(corpus)
    if source.kind != "domain":
        raise ValueError(f"{corpus}: the study needs a domain corpus (`calm-stream corpus build`)")
    tokenizer_json = tokenizer_path.read_text()
    splits = {}
    for name, file in source.files.items():
        if file.format == "parquet":
            records = pq.read_table(file.path, filesystem=source.fs)
        else:
            with source.fs.open_input_stream(file.path) as stream:
                records = pa_json.read_json(stream)
        table = domain_table(records, [name] * records.num_rows)
        splits[name] = token_corpus(tokenize_records(table, tokenizer_json))
    train_config = load_train_config(config, overrides)
    autoencoder = load_checkpoint(autoencoder_dir)
    vocab = Tokenizer.load(tokenizer_path).vocab_size
    calm = train_config.calm.model
    calm = replace(
        calm, backbone=replace(calm.backbone, vocab_size=vocab), autoencoder=autoencoder.config
    )
    ar = train_config.ar.model
    ar = replace(ar, backbone=replace(ar.backbone, vocab_size=vocab))
    return StudyAssets(
        tokenizer_json,
        str(autoencoder_dir),
        splits,
        calm,
        ar,
        train_config.calm.train,
        train_config.ar.train,
        train_config.calm.eval,
        train_config.seed,
    )


def budget_lr_factor(progress: float, arm: Arm, min_ratio: float) -> float:
    """The learning-rate multiplier at `progress` (0..1) of the arm's budget: the training job's
    warm-up and cosine (model.train_loops.lr_factor) on a clock of 10,000 ticks."""
    if arm.schedule == "constant" and progress >= arm.warmup_fraction:
        return 1.0
    ticks = 10_000
    tick = min(int(progress * ticks), ticks - 1)
    return lr_factor(tick, ticks, round(arm.warmup_fraction * ticks), min_ratio)


def _build(
    arm: Arm, assets: StudyAssets, device: str
) -> tuple[CALM | ARModel, torch.nn.Module, TrainSpec]:
    torch.manual_seed(assets.seed)
    if arm.model == "ar":
        model = ARModel(assets.ar).to(device)
        return model, model, assets.ar_train.model_copy(update=arm.train)
    spec = assets.calm_train.model_copy(update=arm.train)
    model = CALM(assets.calm, load_checkpoint(assets.autoencoder_dir))
    objective = CALMObjective(model, spec.aux_weight, spec.target_scale).to(device)
    return model, objective, spec


def _evaluate(
    model: CALM | ARModel, assets: StudyAssets, spec: TrainSpec, digits: np.ndarray
) -> dict[str, float]:
    metrics = summary_metrics(
        model, assets.splits["valid"], spec.row_len, spec.batch_size, digits, assets.seed
    )
    model.train()
    return metrics


def train_arm(
    arm: Arm,
    assets: StudyAssets,
    budget: Budget,
    evaluations: int,
    device: str = "cpu",
    on_point: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Train one arm for `budget`; its learning curve and final scores. `on_point` gets the
    curve so far after every evaluation point (a long study can be watched, or cut short)."""
    torch.set_num_threads(1)  # one core per arm: arms compare by CPU time
    model, objective, spec = _build(arm, assets, device)
    kind = "calm" if arm.model == "calm" else "ar"
    samples = sample_space(kind, assets.splits["train"], model.config, spec, assets.seed)
    sampler = ShardSampler(len(samples), spec.batch_size, 1, 0, assets.seed)
    ratios = {"calm.head.": arm.head_lr_ratio} if arm.head_lr_ratio != 1.0 else {}
    optimizer = make_optimizer(objective, spec.lr, spec.weight_decay, lr_ratios=ratios)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    tokenizer = tokenizer_from_json(assets.tokenizer_json)
    digits = digit_ids(tokenizer)
    autocast = torch.bfloat16 if arm.bf16 else None
    curve = [{"step": 0, "seconds": 0.0} | _evaluate(model, assets, spec, digits)]
    clock, step, losses, started = 0.0, 0, [], time.perf_counter()
    next_eval = 1 / evaluations
    while budget.progress(clock, step) < 1:
        factor = budget_lr_factor(budget.progress(clock, step), arm, spec.min_lr_ratio)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        tic = time.process_time()
        torch.manual_seed(assets.seed * 1_000_003 + step)
        batch = samples.batch(sampler.indices(step), sampler.epoch(step))
        losses.append(train_step(objective, optimizer, batch, spec.max_grad_norm, autocast))
        clock += time.process_time() - tic
        step += 1
        if budget.progress(clock, step) >= min(next_eval, 1):
            point = _evaluate(model, assets, spec, digits)
            curve.append(
                {
                    "step": step,
                    "seconds": clock,
                    "wall_seconds": time.perf_counter() - started,
                    "train_loss": float(np.mean(losses)),
                }
                | point
            )
            losses, next_eval = [], next_eval + 1 / evaluations
            if on_point is not None:
                on_point(curve)
    model.eval()
    test = assets.splits.get("test", assets.splits["valid"])
    evaluation = assets.evaluation
    context = brier_context(model.config, spec.row_len)
    final = brier_metrics(model, test, evaluation, context, assets.seed)
    final |= fact_metrics(model, tokenizer, test, evaluation, assets.seed)
    return {
        "arm": asdict(arm),
        "device": device,
        "steps": step,
        "train_cpu_seconds": clock,
        "wall_seconds": time.perf_counter() - started,
        "curve": curve,
        "final": final,
    }


def _train_arm_in_process(
    arm: Arm, assets: StudyAssets, budget: Budget, evaluations: int, device: str, out: Path
) -> dict[str, Any]:
    path = out / f"{arm.name}.json"

    def write_partial(curve: list[dict[str, Any]]) -> None:
        partial = {"arm": asdict(arm), "device": device, "partial": True, "curve": curve}
        path.write_text(json.dumps(partial, indent=2, default=float) + "\n")

    result = train_arm(arm, assets, budget, evaluations, device, write_partial)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def run_study(
    assets: StudyAssets,
    arms: list[str],
    out: Path,
    budget: Budget,
    evaluations: int,
    parallel: int,
    progress=None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the arms (`parallel` at a time, one process each, on `device`) and write the study's
    outputs."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; arms are {', '.join(ARMS)}")
    out.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # torch and threads do not survive a fork
    with ProcessPoolExecutor(max_workers=parallel, mp_context=context) as pool:
        futures = {
            name: pool.submit(
                _train_arm_in_process, ARMS[name], assets, budget, evaluations, device, out
            )
            for name in arms
        }
        results = {}
        for name, future in futures.items():
            results[name] = future.result()
            if progress is not None:
                progress(name, results[name])
    table = {"budget": budget.describe(), "rows": [summary_row(r) for r in results.values()]}
    (out / "table.json").write_text(json.dumps(table, indent=2, default=float) + "\n")
    (out / "table.md").write_text(markdown(table))
    plot_curves(list(results.values()), out / "curves.png", by_steps=budget.steps is not None)
    return table


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    last = result["curve"][-1]
    final = result["final"]
    return {
        "arm": result["arm"]["name"],
        "idea": result["arm"]["idea"],
        "steps": result["steps"],
        "train_cpu_seconds": round(result["train_cpu_seconds"], 1),
        "wall_seconds": round(result["wall_seconds"], 1),
        "summary_loss": last.get("summary_loss"),
        "chunk_acc": last.get("chunk_acc"),
        "digit_chunk_acc": last.get("digit_chunk_acc"),
        "brier_lm": final.get("brier_lm"),
        "fact_accuracy": final.get("fact_accuracy"),
        "fact_precision": final.get("fact_precision"),
        "fact_recall": final.get("fact_recall"),
        "draws_per_step": final.get("draws_per_step"),
    }


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(table: dict[str, Any]) -> str:
    columns = [
        "arm",
        "steps",
        "train_cpu_seconds",
        "summary_loss",
        "chunk_acc",
        "digit_chunk_acc",
        "brier_lm",
        "fact_accuracy",
        "fact_precision",
        "fact_recall",
        "draws_per_step",
    ]
    lines = [
        f"Budget: {table['budget']}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def plot_curves(results: list[dict[str, Any]], path: Path, by_steps: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("summary_loss", "loss on summary chunks (CALM energy / AR cross-entropy)"),
        ("digit_chunk_acc", "teacher-forced accuracy, summary chunks with digits (CALM)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4.6))
    for ax, (key, title) in zip(axes, panels):
        for result in results:
            points = [p for p in result["curve"] if p.get(key) is not None]
            ax.plot(
                [p["step"] if by_steps else p["seconds"] / 60 for p in points],
                [p[key] for p in points],
                marker="o",
                label=result["arm"]["name"],
            )
        ax.set_xlabel("optimiser steps" if by_steps else "training CPU minutes")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
