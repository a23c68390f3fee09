"""Metrics from the training workers to the terminal and to a JSON-lines file per stage.

Workers put rows on a Ray queue (an actor; `put` is one small RPC per logging interval). On the
driver a thread drains it: a rich progress bar shows step, loss, learning rate and tokens/s, each
evaluation is printed, and every row lands in `<stage>/metrics.jsonl` (sample-index rows in
`samples.jsonl`) in the run's storage. The files are rewritten whole on each flush, which any
pyarrow filesystem supports (object stores have no append).

Row kinds: "start" (a worker group began at `step`, fresh or resumed), "train" (one logging
interval), "eval" (one evaluation), "samples" (indices a rank trained on). When a run resumes at
step s, rows of the earlier attempt after step s are dropped: the files describe the training
that produced the final weights.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Self

from ray.util.queue import Empty, Queue
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.training.storage import RunLayout, json_safe

FLUSH_SECONDS = 5.0


class MetricsChannel:
    """The worker side: a handle that pickles into the train loop's config."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def emit(self, kind: str, **row: Any) -> None:
        self.queue.put({"kind": kind, "time": time.time(), **row}, timeout=60)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(json_safe(r), sort_keys=True, allow_nan=False) + "\n" for r in rows)


def _format_eval(row: dict[str, Any]) -> str:
    skip = {"kind", "time", "step", "split", "example"}
    values = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in row.items()
        if k not in skip
    )
    return f"eval {row['split']} @ step {row['step']}: {values}"


class MetricsLog:
    """The driver side of one stage: progress bar + metrics files. Use as a context manager."""

    def __init__(self, layout: RunLayout, stage: str, total_steps: int, console: Console):
        self.layout, self.stage, self.total_steps = layout, stage, total_steps
        self.console = console
        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self.rows = self._existing("metrics.jsonl")
        self.samples = self._existing("samples.jsonl")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metrics-{stage}", daemon=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task(stage, total=total_steps, status="starting workers")
        self._dirty = False

    @property
    def channel(self) -> MetricsChannel:
        return MetricsChannel(self.queue)

    def _existing(self, name: str) -> list[dict[str, Any]]:
        path = self.layout.stage_file(self.stage, name)
        if not self.layout.storage.exists(path):
            return []
        return [
            json.loads(line)
            for line in self.layout.storage.read_text(path).splitlines()
            if line.strip()
        ]

    def __enter__(self) -> Self:
        self._progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        self._flush()
        self._progress.stop()
        self.queue.shutdown()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.is_set():
            try:
                self._handle(self.queue.get(timeout=0.5))
            except Empty:
                pass
            self._drain()
            if self._dirty and time.monotonic() - last_flush > FLUSH_SECONDS:
                self._flush()
                last_flush = time.monotonic()

    def _drain(self) -> None:
        while True:
            try:
                self._handle(self.queue.get_nowait())
            except Empty:
                return

    def _handle(self, row: dict[str, Any]) -> None:
        self._dirty = True
        kind, step = row["kind"], row.get("step", 0)
        if kind == "start":
            # a new attempt starts at `step`: what an earlier attempt logged after it was redone
            self.rows = [r for r in self.rows if r.get("step", 0) <= step]
            self.samples = [r for r in self.samples if r["step"] <= step]
            verb = "resumed at" if step else "started at"
            self._progress.update(
                self._task,
                completed=step,
                status=f"{verb} step {step} on {row['workers']} worker(s)",
            )
        if kind == "samples":
            self.samples.append(row)
            return
        self.rows.append(row)
        if kind == "train":
            self._progress.update(
                self._task,
                completed=step,
                status=(
                    f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:,.0f} tok/s"
                ),
            )
        elif kind == "eval":
            self._progress.console.print(
                f"[cyan]{self.stage}[/] {_format_eval(row)}", highlight=False, soft_wrap=True
            )

    def _flush(self) -> None:
        if not self._dirty:
            return
        storage = self.layout.storage
        storage.write_text(self.layout.stage_file(self.stage, "metrics.jsonl"), _jsonl(self.rows))
        if self.samples:
            storage.write_text(
                self.layout.stage_file(self.stage, "samples.jsonl"), _jsonl(self.samples)
            )
        self._dirty = False
