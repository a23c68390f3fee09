"""Start or join Ray with the resources the settings give, and nothing more; check that the
job's actors fit the cluster; and bound the calls an actor has in flight."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.settings import RaySettings, SettingsError

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0  # how often a wait for the cluster says how long it has waited


def init_ray(settings: RaySettings) -> None:
    """Join `settings.address`, or start a local Ray bounded to the configured CPUs and object store.

    A local Ray is started without its dashboard and with a fixed object store so that a laptop or a
    2-core CI box is not swamped; inside a Ray job (RAY_ADDRESS set) the job's cluster is joined.
    """
    if ray.is_initialized():
        return
    cpus = local_ray_cpus(settings)
    if cpus is None:
        ray.init(address=settings.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(
        num_cpus=cpus,
        object_store_memory=settings.object_store_memory_mb * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=True,
    )


def local_ray_cpus(settings: RaySettings) -> int | None:
    """The CPUs of the local Ray that `init_ray` starts; None when it joins a cluster instead."""
    if settings.address or os.environ.get("RAY_ADDRESS"):
        return None
    return settings.num_cpus or os.cpu_count() or 1


@dataclass(frozen=True)
class ClusterCpus:
    """The CPUs of the Ray cluster this process joined: each live node's, the free ones, and the
    node sizes its autoscaler may add (None: no autoscaler reported any)."""

    nodes: list[float]
    free: float
    addable: list[float] | None

    def largest(self) -> float:
        """The most CPUs one actor could ever get."""
        return max([*self.nodes, *(self.addable or ())], default=0.0)

    def __str__(self) -> str:
        has = (
            f"{sum(self.nodes):g} CPUs in {len(self.nodes)} nodes (largest "
            f"{max(self.nodes, default=0):g}), {self.free:g} free"
        )
        if self.addable is None:
            return f"{has}; no autoscaler said what it adds"
        return f"{has}; its autoscaler adds nodes of up to {max(self.addable, default=0):g} CPUs"


def cluster_cpus() -> ClusterCpus:
    """What the joined cluster has now, and what its autoscaler said it may add: the node groups
    of the cluster config an autoscaler (v2, KubeRay's) keeps in the GCS."""
    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    free = ray.available_resources().get("CPU", 0.0)
    config = ray._private.state.state.get_cluster_config()  # no public API says this
    addable = (
        None
        if config is None
        else [g.resources.get("CPU", 0) for g in config.node_group_configs if g.max_count != 0]
    )
    return ClusterCpus(nodes, free, addable)


def check_actors_fit(settings: RaySettings) -> None:
    """On a cluster whose autoscaler said what it adds, an actor larger than any node it has or
    could add is refused now, instead of waiting for ray.resource_timeout_seconds."""
    cpus = cluster_cpus()
    for name, wanted in (
        ("ray.source_actor_cpus", settings.source_actor_cpus),
        ("ray.inference_actor_cpus", settings.inference_actor_cpus),
    ):
        if cpus.addable is not None and wanted > cpus.largest() + 1e-9:
            raise SettingsError(
                f"{name}={wanted:g}: no node of the Ray cluster can ever hold such an actor: "
                f"it has {cpus}"
            )


def wait_placed(refs: list[ray.ObjectRef], what: str, settings: RaySettings) -> list[Any]:
    """`ray.get(refs)`, the first calls of actors, which run once the cluster has placed them;
    says every PROGRESS_EVERY_S what it waits for, and gives up after
    ray.resource_timeout_seconds, saying what the cluster has."""
    started, pending, timeout = time.monotonic(), list(refs), settings.resource_timeout_seconds
    while pending:
        waited = time.monotonic() - started
        if waited >= timeout:
            raise SettingsError(
                f"ray.resource_timeout_seconds={timeout:g}: the Ray cluster placed "
                f"{len(refs) - len(pending)} of {len(refs)} {what} in {waited:.0f} s; it has "
                f"{cluster_cpus()}"
            )
        wait_s = min(PROGRESS_EVERY_S, timeout - waited)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=wait_s)
        if pending:
            log.warning(
                "waiting for the Ray cluster to place %d of %d %s: %.0f s of %g "
                "(ray.resource_timeout_seconds); it has %s",
                len(pending),
                len(refs),
                what,
                time.monotonic() - started,
                timeout,
                cluster_cpus(),
            )
    return ray.get(refs)


def cap_in_flight(refs: list[ray.ObjectRef], limit: int) -> list[ray.ObjectRef]:
    """Wait until at most `limit` of `refs` are pending (raising a failed one's error); returns
    the pending ones. Bounds the remote writes an actor has outstanding."""
    if len(refs) <= limit:
        return refs
    done, pending = ray.wait(refs, num_returns=len(refs) - limit)
    ray.get(done)
    return pending
