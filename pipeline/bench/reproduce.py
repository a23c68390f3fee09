"""`calm-stream bench reproduce`: the paper's comparison table in miniature, under one CPU budget.

On WikiText-103 documents (shipped in model/corpora, split 90/10 by document) it trains, with the real
training job (Ray Train, the same stages as `calm-stream train`):
- autoencoders with K = 1, 2, 4 (each CALM needs the autoencoder of its own K),
- CALM with K = 1, 2, 4 on backbone S,
- the discrete AR baseline on backbone S (same as CALM's) and on a larger backbone M,
and writes table.json, table.md and plot.png: parameters, training FLOPs, inference FLOPs per
token, validation BrierLM (Brier-1..4 too) and the autoencoders' reconstruction accuracy.

The budget: every language model trains on the same number of tokens (like the paper's models,
all trained on the same data), chosen so that the estimated training time of all models together
is the budget; 15 % of it goes to the three autoencoders. Time per token is measured on this
machine before training (a few timed steps of each model in this process, `threads` threads,
scaled by the number of workers), so training FLOPs differ between models and time does not.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from model.checkpoint import build_model
from model.config import CALMConfig
from model.data import wikitext_path
from model.train_loops import make_optimizer, train_step
from pipeline.training.job import TrainRequest, run_training
from pipeline.training.stages import CONFIG_DIR, TrainConfig, load_train_config

RECIPE = CONFIG_DIR / "reproduce.yaml"
AE_SHARE = 0.15
AR_M = (
    "ar.model.backbone.d_model=192",
    "ar.model.backbone.n_layers=6",
    "ar.model.backbone.d_ff=512",
)


@dataclass(frozen=True)
class Entry:
    name: str
    run: str  # models sharing a run share its tokenizer and autoencoder
    stage: str
    k: int


ENTRIES = (
    Entry("AE K=4", "k4", "autoencoder", 4),
    Entry("CALM K=4", "k4", "calm", 4),
    Entry("AR-S", "k4", "ar", 1),
    Entry("AE K=2", "k2", "autoencoder", 2),
    Entry("CALM K=2", "k2", "calm", 2),
    Entry("AE K=1", "k1", "autoencoder", 1),
    Entry("CALM K=1", "k1", "calm", 1),
    Entry("AR-M", "arm", "ar", 1),
)


@dataclass(frozen=True)
class ReproduceRequest:
    out: Path
    budget_minutes: float = 20.0
    corpus: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    resume: bool = False

    @property
    def corpus_path(self) -> str:
        return self.corpus or str(wikitext_path())


def run_overrides(run: str, steps: dict[str, int] | None = None) -> list[str]:
    """--set overrides of one run: its autoencoder's K, AR-M's size, and the planned steps."""
    entries = [e for e in ENTRIES if e.run == run]
    overrides = [f"autoencoder.model.k={e.k}" for e in entries if e.stage == "autoencoder"]
    if run == "arm":
        overrides += AR_M
    if steps is not None:
        for entry in entries:
            n = steps[entry.name]
            overrides += [
                f"{entry.stage}.train.steps={n}",
                f"{entry.stage}.train.checkpoint_every={max(1, n // 2)}",
            ]
    return overrides


def run_config(run: str, steps: dict[str, int] | None = None) -> TrainConfig:
    return load_train_config(RECIPE, run_overrides(run, steps))


def model_config_of(config: TrainConfig, stage: str):
    """The stage's model config with the recipe's vocabulary (for timing: no tokenizer yet)."""
    vocab = config.tokenizer.vocab_size
    model = config.stage(stage).model
    autoencoder = dataclasses.replace(config.autoencoder.model, vocab_size=vocab)
    if stage == "autoencoder":
        return autoencoder
    backbone = dataclasses.replace(model.backbone, vocab_size=vocab)
    if isinstance(model, CALMConfig):
        return dataclasses.replace(model, backbone=backbone, autoencoder=autoencoder)
    return dataclasses.replace(model, backbone=backbone)


def seconds_per_token(config: TrainConfig, stage: str, threads: int, steps: int = 3) -> float:
    """Measured training time per token of one worker (a few steps on random tokens)."""
    torch.set_num_threads(threads)
    section = config.stage(stage)
    model_config = model_config_of(config, stage)
    model = build_model(model_config)
    optimizer = make_optimizer(model, section.train.lr)
    width = model_config.k if stage == "autoencoder" else section.train.row_len
    batch = np.random.default_rng(0).integers(
        4, config.tokenizer.vocab_size, (section.train.batch_size, width)
    )
    train_step(model, optimizer, batch)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch)
    return (time.perf_counter() - start) / steps / batch.size


def plan_steps(request: ReproduceRequest, console: Console) -> dict[str, int]:
    """Steps per model: the LMs see equal tokens, the total estimated time is the budget."""
    threads = max(1, int(request.cpus_per_worker))
    configs = {e.run: run_config(e.run) for e in ENTRIES}
    cost = {}
    with console.status("timing each model on this machine"):
        for entry in ENTRIES:
            cost[entry.name] = (
                seconds_per_token(configs[entry.run], entry.stage, threads) / request.workers
            )
    budget = request.budget_minutes * 60
    steps = {}
    for is_ae, share in ((True, AE_SHARE), (False, 1 - AE_SHARE)):
        group = [e for e in ENTRIES if (e.stage == "autoencoder") == is_ae]
        tokens = share * budget / sum(cost[e.name] for e in group)
        for entry in group:
            train = configs[entry.run].stage(entry.stage).train
            per_step = train.batch_size * (entry.k if is_ae else train.row_len)
            steps[entry.name] = max(20, int(tokens // per_step))
    return steps


def _row(entry: Entry, outcome: dict[str, Any]) -> dict[str, Any]:
    metrics, cost = outcome["metrics"], outcome["cost"]
    row = {
        "model": entry.name,
        "k": entry.k,
        "params": metrics["trainable_params"],
        "steps": outcome["steps"],
        "tokens": metrics["tokens"],
        "train_flops": metrics["train_flops"],
        "train_seconds": metrics["train_seconds"],
        "tokens_per_s": metrics["tokens_per_s"],
    }
    if entry.stage == "autoencoder":
        return row | {
            "recon_acc": metrics["valid_recon_acc"],
            "recon_acc_sigma0.3": metrics["valid_recon_acc_sigma0.3"],
        }
    return row | {
        "inference_flops_per_token": cost["inference_flops_per_token"],
        "brier_lm": metrics["valid_brier_lm"],
        "brier_lm_stderr": metrics["valid_brier_lm_stderr"],
        **{f"brier_{n}": metrics[f"valid_brier_{n}"] for n in range(1, 5)},
        # AR only: the same expectation from exact probabilities (the official AR evaluation)
        "brier_lm_exact": metrics.get("valid_brier_lm_rb"),
        "valid_loss": metrics["valid_loss"],
    }


def _stderr(row: dict[str, Any]) -> float:
    """BrierLM's standard error; 0 where it is undefined (BrierLM 0: a Brier-n estimate <= 0)."""
    value = row["brier_lm_stderr"]
    return value if value is not None and np.isfinite(value) else 0.0


def verdict(rows: list[dict[str, Any]]) -> str:
    """A sentence from the numbers: does CALM K=4 match the same-backbone baseline for less?"""
    by = {r["model"]: r for r in rows}
    calm, base = by["CALM K=4"], by["AR-S"]
    ratio = calm["train_flops"] / base["train_flops"]
    margin = 2 * float(np.hypot(_stderr(calm), _stderr(base)))
    if base["brier_lm"] <= margin:
        # BrierLM is a geometric mean: one Brier-n estimate <= 0 makes it 0, and 0 vs 0 says nothing
        return (
            f"Undecided at this scale: the AR-S baseline's BrierLM ({base['brier_lm']:.2f}) is not "
            f"above its noise ({margin:.2f}), so CALM K=4's {calm['brier_lm']:.2f} cannot be said "
            f"to match it; Brier-1 {calm['brier_1']:.3f} (CALM K=4) vs {base['brier_1']:.3f} "
            f"(AR-S), with {ratio:.2f}x the training FLOPs, after the same number of tokens."
        )
    if calm["brier_lm"] >= base["brier_lm"] - margin:
        outcome = "matches"
    else:
        outcome = "does not match"
    return (
        f"CALM K=4 {outcome} the AR-S baseline at this scale: BrierLM {calm['brier_lm']:.2f} vs "
        f"{base['brier_lm']:.2f} (two standard errors of the difference: {margin:.2f}) with "
        f"{ratio:.2f}x its training FLOPs and "
        f"{calm['inference_flops_per_token'] / base['inference_flops_per_token']:.2f}x its "
        "inference FLOPs per token, after the same number of training tokens."
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and abs(value) >= 1e7:
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e4 or value == 0 else f"{value:.4g}"
    return str(value)


def markdown(table: dict[str, Any]) -> str:
    lm = [r for r in table["rows"] if "brier_lm" in r]
    ae = [r for r in table["rows"] if "recon_acc" in r]
    lm_cols = [
        "model",
        "k",
        "params",
        "train_flops",
        "inference_flops_per_token",
        "brier_lm",
        "brier_lm_stderr",
        "brier_lm_exact",
        "brier_1",
        "brier_2",
        "brier_3",
        "brier_4",
        "tokens",
        "tokens_per_s",
    ]
    ae_cols = ["model", "k", "params", "train_flops", "recon_acc", "recon_acc_sigma0.3", "tokens"]

    def block(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
        return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
            "| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows
        ]

    return "\n".join(
        [
            "# The CALM table in miniature",
            "",
            (
                f"Corpus: {table['corpus']} (split 90/10 by document). Budget: "
                f"{table['budget_minutes']} minutes of training on {table['workers']} worker(s); "
                f"measured training time {table['train_seconds']:.0f} s, wall time with start-up "
                f"and evaluation {table['stage_wall_seconds']:.0f} s (this invocation: "
                f"{table['wall_seconds']:.0f} s)."
            ),
            "",
            *block(lm, lm_cols),
            "",
            *block(ae, ae_cols),
            "",
            f"**{table['verdict']}**",
            "",
            (
                "BrierLM: the two-sample estimator on held-out positions for every model, standard "
                "errors clustered by document; an estimate <= 0 of any Brier-n makes BrierLM 0. "
                "brier_lm_exact (AR only): the same quantity with exact probabilities for the "
                "accuracy term, as the official AR evaluation computes it (lower variance)."
            ),
            "",
        ]
    )


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if "brier_lm" in r]
    # BrierLM is a geometric mean (0 as soon as one Brier-n estimate is <= 0); Brier-1, the
    # next-token score, still orders models that are too weak for BrierLM to separate
    panels = (
        ("train_flops", "training FLOPs", "brier_lm", "validation BrierLM"),
        (
            "inference_flops_per_token",
            "inference FLOPs per token",
            "brier_lm",
            "validation BrierLM",
        ),
        ("train_flops", "training FLOPs", "brier_1", "validation Brier-1"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.4))
    for ax, (x, x_label, y, y_label) in zip(axes, panels):
        for r in rows:
            ax.errorbar(
                r[x],
                r[y],
                yerr=_stderr(r) if y == "brier_lm" else 0,
                fmt="o",
                color="tab:blue" if r["model"].startswith("CALM") else "tab:orange",
                capsize=3,
            )
            ax.annotate(
                r["model"], (r[x], r[y]), textcoords="offset points", xytext=(5, 5), fontsize=8
            )
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    fig.suptitle("CALM (blue) vs discrete AR baselines (orange), WikiText-103 documents")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_reproduction(request: ReproduceRequest, console: Console) -> dict[str, Any]:
    request.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan_path = request.out / "plan.json"
    if request.resume and plan_path.exists():
        steps = json.loads(plan_path.read_text())["steps"]
    else:
        steps = plan_steps(request, console)
        plan_path.write_text(
            json.dumps({"budget_minutes": request.budget_minutes, "steps": steps}, indent=2) + "\n"
        )
    console.print(f"plan (steps per model): {steps}")
    outcomes: dict[str, dict[str, Any]] = {}
    storage = request.out / "runs"
    for run in dict.fromkeys(e.run for e in ENTRIES):
        stages = tuple(e.stage for e in ENTRIES if e.run == run)
        train_request = TrainRequest(
            config=run_config(run, steps),
            corpus=request.corpus_path,
            storage=str(storage),
            run_name=run,
            stages=stages,
            workers=request.workers,
            cpus_per_worker=request.cpus_per_worker,
            resume=request.resume and (storage / run / "run.json").exists(),
        )
        console.rule(f"run {run}: {', '.join(stages)}")
        result = run_training(train_request, console)
        for entry in ENTRIES:
            if entry.run == run:
                outcomes[entry.name] = result[entry.stage]
    rows = [_row(e, outcomes[e.name]) for e in ENTRIES]
    table = {
        "corpus": request.corpus_path,
        "budget_minutes": request.budget_minutes,
        "workers": request.workers,
        "train_seconds": sum(r["train_seconds"] for r in rows),
        # the stages' own wall times (start-up and evaluation included) survive a --resume;
        # wall_seconds is this invocation's
        "stage_wall_seconds": sum(outcomes[e.name]["wall_s"] for e in ENTRIES),
        "wall_seconds": time.perf_counter() - started,
        "rows": rows,
        "verdict": verdict(rows),
    }
    (request.out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (request.out / "table.md").write_text(markdown(table))
    plot(table, request.out / "plot.png")
    console.print(f"wrote {request.out / 'table.md'}, table.json and plot.png")
    return table
