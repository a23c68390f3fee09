"""The training job's driver: tokenizer -> autoencoder -> CALM and/or AR, each stage on Ray.

1. Before any worker starts: the config is validated, the corpus checked file by file
   (corpus.inspect_corpus), batch sizes checked against the worker count, the run record
   (run.json) prepared or, with --resume, compared with this invocation's config; stages with
   complete.json are kept as they are. Then Ray Data reads the whole corpus (a corrupt record
   fails here, before anything is written) and run.json is saved.
2. The tokenizer stage trains the byte-level BPE in a Ray task on the train split's text.
3. Ray Data tokenizes every split; the token streams are put in the object store once.
4. Each model stage without complete.json runs as one Ray Train TorchTrainer (DDP: gloo on CPU,
   NCCL with use_gpu; `workers` x `resources_per_worker`). Its RunConfig is named after the stage
   under `<storage>/<run-name>/`, so a restarted job gets the stage's latest checkpoint from Ray
   Train (worker.py resumes from it); a stage that reached its last step is marked complete with
   its final checkpoint, weights digest and metrics, and is never trained again.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from model.config import ARConfig, AutoencoderConfig, CALMConfig, config_from_dict
from model.flops import inference_flops_per_token, training_flops_per_token
from model.tokenizer import Tokenizer
from pipeline.training.corpus import (
    CorpusSource,
    TokenCorpus,
    inspect_corpus,
    split_texts,
    tokenizer_from_json,
)
from pipeline.training.metrics import MetricsLog
from pipeline.training.reading import read_corpus, tokenize_corpus
from pipeline.training.stages import MODEL_STAGES, REQUIRES, TrainConfig, plan_stages, stage_record
from pipeline.training.storage import STORAGE_LAYOUT, RunLayout, Storage
from pipeline.training.worker import ModelConfig, WorkerPlan, positions_per_row, train_loop


class TrainJobError(RuntimeError):
    """The job cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class TrainRequest:
    config: TrainConfig
    corpus: str  # a corpus directory or a file of documents: local path or URI
    storage: str  # local path or pyarrow-filesystem URI
    run_name: str
    stages: tuple[str, ...] = ("all",)
    workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    resume: bool = False
    max_failures: int = 0  # Ray Train restarts a failed worker group from the last checkpoint


# ---------------------------------------------------------------------------------------------
# The run record


def _prepare_run(
    layout: RunLayout, request: TrainRequest, stages: list[str], source: CorpusSource
) -> dict[str, Any]:
    """The run record for this invocation: new, or the stored one checked against the config.

    Nothing is written here: the record is saved once the corpus has been read.
    """
    storage = layout.storage
    records = json.loads(json.dumps({s: stage_record(request.config, s) for s in stages}))
    if not storage.exists(layout.run_json):
        if request.resume:
            raise TrainJobError(f"no run {request.run_name!r} in {storage.uri} to resume")
        return {
            "layout": STORAGE_LAYOUT,
            "run_name": request.run_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "corpus": {"location": source.location, "kind": source.kind, "fingerprints": {}},
            "stages": records,
        }
    if not request.resume:
        raise TrainJobError(
            f"run {request.run_name!r} already exists in {storage.uri}: pass --resume to continue "
            "it (finished stages are kept) or choose another --run-name"
        )
    run = storage.read_json(layout.run_json)
    if run.get("layout") != STORAGE_LAYOUT:
        raise TrainJobError(
            f"run {request.run_name!r} uses storage layout {run.get('layout')}, "
            f"this job writes layout {STORAGE_LAYOUT}"
        )
    for stage, record in records.items():
        stored = run["stages"].setdefault(stage, record)
        if stored != record:
            raise TrainJobError(
                f"run {request.run_name!r}: stage {stage} was started with a different config "
                f"({', '.join(sorted(_differences(stored, record)))}); keep the config or start "
                "a new --run-name"
            )
    return run


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for key in old.keys() | new.keys()
            for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [prefix.rstrip(".")] if old != new else []


def _check_fingerprints(
    layout: RunLayout, run: dict[str, Any], splits: dict[str, TokenCorpus]
) -> None:
    """The corpus must be the one the run started with: same tokens, same order."""
    stored = run["corpus"]["fingerprints"]
    current = {name: corpus.fingerprint() for name, corpus in splits.items()}
    changed = [name for name in current if name in stored and stored[name] != current[name]]
    if changed:
        raise TrainJobError(
            f"run {layout.run_name!r}: the corpus split(s) {changed} differ from those the run "
            "started with; use the original corpus or start a new --run-name"
        )
    if current.keys() - stored.keys():
        run["corpus"]["fingerprints"] = {**stored, **current}
        layout.storage.write_json(layout.run_json, run)


# ---------------------------------------------------------------------------------------------
# Stages


def _train_tokenizer(texts: list[str], vocab_size: int) -> str:
    return Tokenizer.train(texts, vocab_size).hf.to_str()


def tokenizer_stage(
    layout: RunLayout, config: TrainConfig, texts: list[str], cpus: float, console: Console
) -> Tokenizer:
    """Train the BPE on the train split in a Ray task, or load the run's finished one."""
    path = layout.stage_file("tokenizer", "tokenizer.json")
    if layout.complete_marker("tokenizer"):
        return tokenizer_from_json(layout.storage.read_text(path))
    start = time.perf_counter()
    with console.status("tokenizer: training the BPE on the train split"):
        task = ray.remote(num_cpus=cpus)(_train_tokenizer)
        tokenizer_json = ray.get(task.remote(texts, config.tokenizer.vocab_size))
    layout.storage.write_text(path, tokenizer_json)
    tokenizer = tokenizer_from_json(tokenizer_json)
    metrics = {
        "vocab_size": tokenizer.vocab_size,
        "documents": len(texts),
        "wall_s": time.perf_counter() - start,
    }
    layout.mark_complete("tokenizer", {"metrics": metrics, "file": "tokenizer/tokenizer.json"})
    console.print(
        f"tokenizer: {tokenizer.vocab_size} tokens from {len(texts)} documents "
        f"in {metrics['wall_s']:.1f} s"
    )
    return tokenizer


def final_checkpoint(layout: RunLayout, stage: str) -> str:
    marker = layout.complete_marker(stage)
    if marker is None:
        raise TrainJobError(f"stage {stage} is not complete in run {layout.run_name!r}")
    return posixpath.join(layout.run_dir, marker["final_checkpoint"])


def resolve_model_config(
    stage: str, config: TrainConfig, vocab_size: int, layout: RunLayout
) -> ModelConfig:
    """The stage's model config with the tokenizer's vocabulary (and CALM's autoencoder)."""
    model = config.stage(stage).model
    if isinstance(model, AutoencoderConfig):
        return dataclasses.replace(model, vocab_size=vocab_size)
    backbone = dataclasses.replace(model.backbone, vocab_size=vocab_size)
    if isinstance(model, ARConfig):
        return dataclasses.replace(model, backbone=backbone)
    ae_config = config_from_dict(
        layout.storage.read_json(
            posixpath.join(final_checkpoint(layout, "autoencoder"), "config.json")
        )
    )
    return dataclasses.replace(model, backbone=backbone, autoencoder=ae_config)


def cost_summary(model_config: ModelConfig, row_len: int) -> dict[str, float]:
    """Analytic FLOPs: per training token, and per generated token at half a row of context."""
    positions = positions_per_row(model_config, row_len)
    summary = {"train_flops_per_token": training_flops_per_token(model_config, positions)}
    if isinstance(model_config, CALMConfig | ARConfig):
        summary["inference_flops_per_token"] = inference_flops_per_token(
            model_config, positions / 2
        )
    return summary


def make_trainer(
    stage: str, request: TrainRequest, layout: RunLayout, plan: WorkerPlan
) -> TorchTrainer:
    """One stage's TorchTrainer: named after the stage in the run directory, so that starting it
    again finds the stage's latest checkpoint."""
    spec = request.config.stage(stage).train
    threads = str(plan.threads)
    return TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if request.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=request.workers,
            use_gpu=request.use_gpu,
            resources_per_worker={"CPU": request.cpus_per_worker}
            | ({"GPU": 1} if request.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=stage,
            storage_path=layout.run_dir,
            storage_filesystem=None if layout.storage.is_local else layout.storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=request.max_failures),
            worker_runtime_env={
                "env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            },
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # the progress bar reports
        ),
    )


def model_stage(
    stage: str,
    request: TrainRequest,
    layout: RunLayout,
    tokenizer: Tokenizer,
    splits: dict[str, Any],
    with_facts: bool,
    console: Console,
) -> dict[str, Any]:
    """Train one stage to its last step (or its stop_after_step); returns its outcome."""
    spec = request.config.stage(stage).train
    model_config = resolve_model_config(stage, request.config, tokenizer.vocab_size, layout)
    started = time.perf_counter()
    with MetricsLog(layout, stage, spec.steps, console) as metrics_log:
        plan = WorkerPlan(
            stage=stage,
            config=request.config,
            model_config=model_config,
            tokenizer_json=tokenizer.hf.to_str(),
            splits=splits,
            with_facts=with_facts,
            autoencoder_checkpoint=final_checkpoint(layout, "autoencoder")
            if stage == "calm"
            else None,
            storage=layout.storage,
            metrics=metrics_log.channel,
            threads=max(1, int(request.cpus_per_worker)),
        )
        try:
            result = make_trainer(stage, request, layout, plan).fit()
        except ray.train.TrainingFailedError as error:
            raise TrainJobError(f"{stage}: training failed: {error}") from error
    metrics = dict(result.metrics or {})
    step = int(metrics.get("step", 0))
    wall = time.perf_counter() - started
    if step < spec.steps:
        console.print(f"{stage}: stopped at step {step} of {spec.steps}; continue with --resume")
        return {"status": "stopped", "steps": step, "metrics": metrics, "wall_s": wall}
    record = {
        "steps": step,
        "final_checkpoint": posixpath.relpath(result.checkpoint.path, layout.run_dir),
        "weights_digest": metrics.pop("weights_digest"),
        "workers": request.workers,
        "model": dataclasses.asdict(model_config),
        "cost": cost_summary(model_config, spec.row_len),
        "metrics": metrics,
        "wall_s": wall,
    }
    layout.mark_complete(stage, record)
    console.print(f"{stage}: complete, {step} steps in {wall:.0f} s -> {layout.stage_dir(stage)}")
    return {"status": "complete", **record}


# ---------------------------------------------------------------------------------------------
# The job


def check_request(request: TrainRequest, stages: list[str]) -> None:
    if request.workers < 1 or request.cpus_per_worker <= 0:
        raise TrainJobError("workers must be >= 1 and cpus_per_worker > 0")
    for stage in stages:
        if stage in MODEL_STAGES and request.config.stage(stage).train.batch_size % request.workers:
            raise TrainJobError(
                f"{stage}.train.batch_size={request.config.stage(stage).train.batch_size} is the "
                f"global batch; it must be divisible by --workers {request.workers}"
            )


def _check_heldout(corpora: dict[str, TokenCorpus]) -> None:
    few = {name: c.documents for name, c in corpora.items() if name != "train" and c.documents < 2}
    if few:
        raise TrainJobError(
            f"held-out split(s) with fewer than 2 documents {few}: BrierLM's standard errors are "
            "clustered by document; give the corpus more held-out documents (valid_fraction)"
        )


def _check_generation_fits(
    config: TrainConfig, stages: list[str], corpora: dict[str, TokenCorpus]
) -> None:
    """Held-out prompts plus the summary must fit the model's positions, or the final
    evaluation would fail after the whole stage trained."""
    longest = max((len(p) for c in corpora.values() for p in c.prompts), default=0)
    for stage in stages:
        section = config.stage(stage)
        k, positions = section.model.k, section.model.backbone.max_seq_len
        needed = -(-longest // k) + -(-section.eval.max_new_tokens // k) - 1
        if section.eval.fact_prompts and needed > positions:
            raise TrainJobError(
                f"{stage}: a held-out prompt of {longest} tokens plus eval.max_new_tokens="
                f"{section.eval.max_new_tokens} needs {needed} positions; "
                f"model.backbone.max_seq_len is {positions}"
            )


def run_training(
    request: TrainRequest, console: Console | None = None
) -> dict[str, dict[str, Any]]:
    """Run the requested stages (and the ones they need) on the connected Ray cluster."""
    console = console or Console(stderr=True)
    stages = plan_stages(list(request.stages))
    check_request(request, stages)
    layout = RunLayout(Storage.parse(request.storage), request.run_name)
    source = inspect_corpus(request.corpus)
    run = _prepare_run(layout, request, stages, source)
    outcomes = {s: {"status": "complete", **m} for s in stages if (m := layout.complete_marker(s))}
    pending = [s for s in stages if s not in outcomes]
    for stage in outcomes:
        console.print(f"{stage}: complete, kept")
    if not pending:
        return outcomes
    table = read_corpus(source, request.config.valid_fraction)  # a bad record fails here
    layout.storage.write_json(layout.run_json, run)
    texts = split_texts(table, "train")
    tokenizer = tokenizer_stage(layout, request.config, texts, request.cpus_per_worker, console)
    outcomes["tokenizer"] = {"status": "complete", **layout.complete_marker("tokenizer")}
    model_stages = [s for s in pending if s in MODEL_STAGES]
    if not model_stages:
        return outcomes
    with console.status("tokenizing the corpus with Ray Data"):
        corpora = tokenize_corpus(table, tokenizer)
    _check_fingerprints(layout, run, corpora)
    if {"calm", "ar"} & set(model_stages):
        _check_heldout(corpora)
    if source.has_facts:
        _check_generation_fits(
            request.config, [s for s in model_stages if s != "autoencoder"], corpora
        )
    splits = {name: ray.put(corpus) for name, corpus in corpora.items()}
    for stage in model_stages:
        waiting = [r for r in REQUIRES[stage] if outcomes.get(r, {}).get("status") != "complete"]
        if waiting:
            outcomes[stage] = {"status": "waiting", "for": waiting}
            continue
        outcomes[stage] = model_stage(
            stage, request, layout, tokenizer, splits, source.has_facts, console
        )
    return outcomes
