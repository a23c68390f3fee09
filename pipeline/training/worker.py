"""The training loop each Ray Train worker runs, for the autoencoder, CALM and the AR baseline.

A worker builds the model (CALM around the frozen autoencoder of the previous stage), restores
weights, optimizer, scheduler and step from Ray Train's latest checkpoint if there is one, wraps
the model in DDP (ray.train.torch.prepare_model) and trains with the model library's
`train_step`.

Determinism, so that a resumed run ends with the weights of an uninterrupted one:
- the batch of step s is a function of (seed, s) (corpus.ShardSampler), whatever happened before;
- torch's RNG is re-seeded from (seed, step, rank) before every step, so dropout, CALM's noise
  and its energy-loss targets are functions of the step too: a checkpoint needs no RNG state;
- the learning rate is a function of the step (LambdaLR, restored with the optimizer).

Every `checkpoint_every` steps and at the end rank 0 writes the model library's checkpoint
(model.safetensors + config.json) plus trainer_state.pt (optimizer, scheduler, step) into
`step_NNNNNNN/`, and all ranks call ray.train.report (a barrier). Rank 0 evaluates on the CPU (a
copy of the model when training on a GPU) at `eval_every` and at the end, where it also scores the
test split.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from model.autoencoder import Autoencoder
from model.calm import CALM
from model.checkpoint import build_model, load_checkpoint, save_checkpoint
from model.config import ARConfig, AutoencoderConfig, CALMConfig, load_config
from model.flops import training_flops_per_token
from model.objectives import CALMObjective
from model.train_loops import lr_factor, make_optimizer, train_step
from pipeline.training.corpus import (
    ShardSampler,
    TokenCorpus,
    sample_space,
    tokenizer_from_json,
)
from pipeline.training.evaluation import brier_context, evaluate
from pipeline.training.metrics import MetricsChannel
from pipeline.training.stages import TrainConfig, TrainSpec
from pipeline.training.storage import Storage, checkpoint_dir_name

TRAINER_STATE = "trainer_state.pt"
ModelConfig = AutoencoderConfig | CALMConfig | ARConfig


class StageError(RuntimeError):
    """A stage cannot train with what it was given (checkpoint or autoencoder mismatch)."""


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a training worker needs; travels in TorchTrainer's train_loop_config."""

    stage: str
    config: TrainConfig
    model_config: ModelConfig  # vocabulary (and CALM's autoencoder) resolved
    tokenizer_json: str
    splits: dict[str, Any]  # split name -> ObjectRef[TokenCorpus]
    with_facts: bool
    autoencoder_checkpoint: str | None  # CALM: the frozen autoencoder, a path in `storage`
    storage: Storage
    metrics: MetricsChannel
    threads: int


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def weights_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names included): equal iff the weights are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def positions_per_row(config: ModelConfig, row_len: int) -> int:
    """Backbone positions of one training row (CALM: chunks); attention cost depends on it."""
    return row_len // config.k


def _restore(
    checkpoint: ray.train.Checkpoint, plan: WorkerPlan
) -> tuple[nn.Module, dict[str, Any]]:
    with checkpoint.as_directory() as directory:
        if load_config(Path(directory) / "config.json") != plan.model_config:
            raise StageError(
                f"{plan.stage}: the checkpoint to resume was written for another model config"
            )
        model = load_checkpoint(directory)
        state = torch.load(Path(directory) / TRAINER_STATE, weights_only=True)
    return model, state


def _fresh_model(plan: WorkerPlan) -> nn.Module:
    if not isinstance(plan.model_config, CALMConfig):
        return build_model(plan.model_config)
    with ray.train.Checkpoint(
        plan.autoencoder_checkpoint, plan.storage.fs
    ).as_directory() as directory:
        autoencoder = load_checkpoint(directory)
    if (
        not isinstance(autoencoder, Autoencoder)
        or autoencoder.config != plan.model_config.autoencoder
    ):
        raise StageError(
            "calm: the autoencoder checkpoint does not match the autoencoder stage's config"
        )
    return CALM(plan.model_config, autoencoder)


def _global_mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _evaluate(
    plan: WorkerPlan, model: nn.Module, splits: list[str], eval_batch: int
) -> dict[str, dict[str, Any]]:
    section = plan.config.stage(plan.stage)
    cpu_model = (
        model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    )
    tokenizer = tokenizer_from_json(plan.tokenizer_json)
    results = {}
    for split in splits:
        corpus: TokenCorpus = ray.get(plan.splits[split])
        results[split] = evaluate(
            cpu_model,
            sample_space(plan.stage, corpus, plan.model_config, section.train, plan.config.seed),
            corpus,
            section.eval,
            tokenizer,
            context_tokens=brier_context(plan.model_config, section.train.row_len),
            batch_size=eval_batch,
            seed=plan.config.seed,
            with_facts=plan.with_facts,
        )
    return results


def training_objective(model: nn.Module, spec: TrainSpec) -> nn.Module:
    """What the optimiser trains: CALM inside its objective (training-only heads), else the model."""
    if isinstance(model, CALM):
        return CALMObjective(model, spec.aux_weight, spec.target_scale)
    return model


def _training_only_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The objective's weights that are not the model's (checkpoints hold the model alone)."""
    if not isinstance(objective, CALMObjective):
        return {}
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("calm.")}


def _report(
    model: nn.Module,
    objective: nn.Module,
    optimizer,
    scheduler,
    step: int,
    metrics: dict[str, Any],
    rank: int,
) -> None:
    """All ranks report (Ray Train's barrier); rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_checkpoint(model, directory)
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "objective": _training_only_state(objective),
            }
            torch.save(state, os.path.join(directory, TRAINER_STATE))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(step)
        )


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    plan: WorkerPlan = loop_config["plan"]
    torch.set_num_threads(plan.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    section = plan.config.stage(plan.stage)
    spec, seed = section.train, plan.config.seed
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()
    # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    torch.manual_seed(seed)
    model, state = _restore(checkpoint, plan) if checkpoint else (_fresh_model(plan), None)
    objective = training_objective(model, spec)
    if state is not None:  # the training-only heads; the model's weights are loaded already
        objective.load_state_dict(objective.state_dict() | state.get("objective", {}))
    ddp_model = ray.train.torch.prepare_model(objective)  # to the device, wrapped in DDP
    optimizer = make_optimizer(objective, spec.lr, spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, spec.steps, spec.warmup, spec.min_lr_ratio)
    )
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])

    samples = sample_space(plan.stage, ray.get(plan.splits["train"]), plan.model_config, spec, seed)
    sampler = ShardSampler(len(samples), spec.batch_size, world, rank, seed)
    tokens_per_step = spec.batch_size * samples.tokens_per_sample()
    flops_per_token = training_flops_per_token(
        plan.model_config, positions_per_row(plan.model_config, spec.row_len)
    )
    if rank == 0:
        plan.metrics.emit(
            "start", step=start, workers=world, steps_per_epoch=sampler.steps_per_epoch
        )

    interval_loss, interval_steps, interval_time, train_time = 0.0, 0, 0.0, 0.0
    for step in range(start, spec.steps):
        tic = time.perf_counter()
        epoch, indices = sampler.epoch(step), sampler.indices(step)
        torch.manual_seed(step_seed(seed, step, rank))
        loss = train_step(ddp_model, optimizer, samples.batch(indices, epoch), spec.max_grad_norm)
        scheduler.step()
        done = step + 1
        interval_loss, interval_steps = interval_loss + loss, interval_steps + 1
        interval_time += time.perf_counter() - tic
        if spec.log_samples:
            plan.metrics.emit(
                "samples", step=done, rank=rank, epoch=epoch, indices=indices.tolist()
            )
        if done % spec.log_every == 0 or done == spec.steps:
            mean_loss = _global_mean(interval_loss / interval_steps, device)
            train_time += interval_time
            if rank == 0:
                plan.metrics.emit(
                    "train",
                    step=done,
                    epoch=epoch,
                    loss=mean_loss,
                    lr=scheduler.get_last_lr()[0],
                    tokens=done * tokens_per_step,
                    tokens_per_s=interval_steps * tokens_per_step / interval_time,
                    train_flops=done * tokens_per_step * flops_per_token,
                )
            interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
        final = done == spec.steps
        metrics: dict[str, Any] = {
            "step": done,
            "loss": loss,
            "tokens": done * tokens_per_step,
            "train_flops": done * tokens_per_step * flops_per_token,
        }
        if rank == 0 and (final or (spec.eval_every and done % spec.eval_every == 0)):
            splits = [s for s in ("valid", "test") if s in plan.splits] if final else ["valid"]
            for split, values in _evaluate(plan, model, splits, spec.batch_size // world).items():
                plan.metrics.emit("eval", step=done, split=split, **values)
                metrics |= {f"{split}_{k}": v for k, v in values.items()}
        if final:
            metrics |= {
                "weights_digest": weights_digest(model),
                "train_seconds": train_time,  # of this attempt: since the start or the resume
                "tokens_per_s": (done - start) * tokens_per_step / max(train_time, 1e-9),
                "params": sum(p.numel() for p in model.parameters()),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        if final or done % spec.checkpoint_every == 0:
            _report(model, objective, optimizer, scheduler, done, metrics, rank)
        if spec.stop_after_step == done:
            return
