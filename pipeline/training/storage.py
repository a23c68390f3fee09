"""Where a training run lives: a local path or any URI pyarrow's filesystem layer understands.

Layout (version STORAGE_LAYOUT, recorded in run.json):

    <storage>/<run-name>/
        run.json                      layout version, the resolved stage configs, corpus fingerprint
        tokenizer/tokenizer.json      the BPE (stage 1)
        tokenizer/complete.json       stage-complete marker with the stage's final metrics
        <stage>/                      one Ray Train run per model stage (RunConfig name = stage)
            checkpoint_manager_snapshot.json   Ray Train's own index of reported checkpoints
            step_0000500/             model.safetensors, config.json, trainer_state.pt
            metrics.jsonl             every reported row (train intervals and evaluations)
            samples.jsonl             sample indices per rank and step (only with log_samples)
            complete.json             marker: final checkpoint, weights digest, final metrics

A stage with complete.json is never trained again; a stage without it resumes from Ray Train's
latest checkpoint of the same run name.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from model.filesystems import split_uri

STORAGE_LAYOUT = 1
COMPLETE = "complete.json"


def json_safe(value: Any) -> Any:
    """The value with NaN and infinities as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Storage:
    """A pyarrow filesystem and a root path inside it."""

    fs: pafs.FileSystem
    root: str
    uri: str  # as the user wrote it, for messages

    @classmethod
    def parse(cls, location: str | Path) -> Storage:
        fs, root = split_uri(location)
        return cls(fs, root, str(location))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")

    def write_text(self, path: str, text: str) -> None:
        """Write via a temporary name and a move where the filesystem has atomic moves (local),
        so that a reader never sees half a marker."""
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        target = f"{path}.tmp" if self.is_local else path
        with self.fs.open_output_stream(target) as f:
            f.write(text.encode("utf-8"))
        if target != path:
            self.fs.move(target, path)

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_text(path))

    def write_json(self, path: str, value: Any) -> None:
        self.write_text(
            path, json.dumps(json_safe(value), indent=2, sort_keys=True, allow_nan=False) + "\n"
        )


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run inside a Storage."""

    storage: Storage
    run_name: str

    @property
    def run_dir(self) -> str:
        return self.storage.path(self.run_name)

    @property
    def run_json(self) -> str:
        return self.storage.path(self.run_name, "run.json")

    def stage_dir(self, stage: str) -> str:
        return self.storage.path(self.run_name, stage)

    def stage_file(self, stage: str, name: str) -> str:
        return self.storage.path(self.run_name, stage, name)

    def complete_marker(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_file(stage, COMPLETE)
        return self.storage.read_json(path) if self.storage.exists(path) else None

    def mark_complete(self, stage: str, record: dict[str, Any]) -> None:
        self.storage.write_json(self.stage_file(stage, COMPLETE), {"stage": stage, **record})


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:07d}"


@dataclass(frozen=True)
class FinishedRun:
    """What a finished run hands on (to `calm-stream export`, to `bench generate`): the final
    checkpoints of its model stages, its tokenizer, the stages' final metrics and the recipe.
    Plain paths, so that a reader needs neither torch nor this layout."""

    calm_checkpoint: Path
    ar_checkpoint: Path | None
    tokenizer_path: Path
    metrics: dict[str, Any]
    recipe: dict[str, Any]


def read_finished_run(run_dir: str | Path) -> FinishedRun:
    """The final CALM (and AR baseline, if trained) checkpoints of a local run directory, with
    the metrics and recipe; FileNotFoundError when it is no run or its calm stage is not done."""
    run_dir = Path(run_dir)
    layout = RunLayout(Storage.parse(run_dir.parent), run_dir.name)
    if not layout.storage.exists(layout.run_json):
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no run.json)")
    markers = {
        stage: marker
        for stage in ("tokenizer", "autoencoder", "calm", "ar")
        if (marker := layout.complete_marker(stage)) is not None
    }
    if "calm" not in markers:
        raise FileNotFoundError(f"{run_dir}: the calm stage is not complete (no calm/{COMPLETE})")
    recipe = {
        "run": layout.storage.read_json(layout.run_json),
        "stages": {
            stage: {k: marker[k] for k in ("steps", "workers", "wall_s", "cost") if k in marker}
            for stage, marker in markers.items()
        },
    }
    return FinishedRun(
        calm_checkpoint=run_dir / markers["calm"]["final_checkpoint"],
        ar_checkpoint=run_dir / markers["ar"]["final_checkpoint"] if "ar" in markers else None,
        tokenizer_path=Path(layout.stage_file("tokenizer", "tokenizer.json")),
        metrics={stage: marker.get("metrics", {}) for stage, marker in markers.items()},
        recipe=recipe,
    )
