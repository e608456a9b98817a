"""What each relation asks of the cluster, and in which order the relations are submitted.

Resources: one relation is one Ray task holding `gpus` GPUs and `cpus` CPUs (a fraction of a GPU lets Ray pack
several small relations on one GPU), or, with more than one rank, a Ray Train TorchTrainer with `workers` ranks
each holding gpus/workers GPUs and cpus/workers CPUs. Placement is Ray's: its scheduler packs requests onto
nodes; we only state the requests.

Order: longest expected first, so the long relations do not start last and leave the cluster idle at the end.
Expected seconds = remaining steps x seconds per step, where
  - remaining steps = train.max_steps minus the step of the relation's latest complete checkpoint in storage
    (a relation resumed after an interruption has less left);
  - seconds per step = the median `seconds` of the relation's own metrics.jsonl in storage (an earlier partial
    run), else its `sec_per_step` in a history results.csv (an earlier run, --history or <storage>/results.csv),
    else the median over the relations that have a figure, else 1.
The number of clips a relation has is deliberately not used: a step costs the same whatever the dataset size
(fixed batch and clip shape). Ties keep the order the relations were given in.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from dr_train.orchestrate import records
from dr_train.orchestrate.options import RayOptions


@dataclass(frozen=True)
class Resources:
    """What one relation holds while it trains."""
    gpus: float
    cpus: float
    workers: int

    @property
    def uses_ray_train(self) -> bool:
        """More than one rank: Ray Train's TorchTrainer starts and wires the ranks."""
        return self.workers > 1

    def per_worker(self) -> dict[str, float]:
        """Ray resources of one rank."""
        out = {"CPU": self.cpus / self.workers}
        if self.gpus > 0:
            out["GPU"] = self.gpus / self.workers
        return out

    @property
    def threads_per_worker(self) -> int:
        """torch intra-op threads of one rank: the whole CPUs it holds, at least one."""
        return max(1, int(self.cpus / self.workers))

    def gpu_hours(self, seconds: float) -> float:
        return seconds * self.gpus / 3600.0

    def describe(self) -> str:
        ranks = f"{self.workers} ranks (TorchTrainer)" if self.uses_ray_train else "1 process (Ray task)"
        return f"{self.gpus:g} GPU + {self.cpus:g} CPU per relation, {ranks}"


def resolve_resources(opts: RayOptions, cluster: dict[str, float]) -> Resources:
    """The per-relation request from the options and the cluster's total resources (`ray.cluster_resources()`):
    auto GPUs = 1 when the cluster has any. A request no cluster node set could ever satisfy is a ValueError
    (Ray would otherwise keep it pending forever)."""
    cluster_gpus, cluster_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    gpus = opts.gpus_per_relation if opts.gpus_per_relation >= 0 else (1.0 if cluster_gpus > 0 else 0.0)
    workers = opts.workers_per_relation or (int(gpus) if gpus > 1 else 1)
    if workers == 1 and gpus > 1:
        raise ValueError(f"--gpus-per-relation {gpus:g} needs {int(gpus)} ranks; one process uses one GPU")
    if gpus > cluster_gpus:
        raise ValueError(f"each relation asks for {gpus:g} GPU(s) but the cluster has {cluster_gpus:g}; lower "
                         f"--gpus-per-relation (0 trains on CPUs)")
    if opts.cpus_per_relation > cluster_cpus:
        raise ValueError(f"each relation asks for {opts.cpus_per_relation:g} CPU(s) but the cluster has "
                         f"{cluster_cpus:g}; lower --cpus-per-relation")
    return Resources(gpus=gpus, cpus=opts.cpus_per_relation, workers=workers)


@dataclass(frozen=True)
class PlannedRelation:
    """One relation's place in the submission order and why."""
    name: str
    remaining_steps: int
    seconds_per_step: float
    basis: str                  # where seconds_per_step came from: metrics, history, median, default
    expected_seconds: float


def read_history(paths: list[Path]) -> dict[str, float]:
    """relation -> seconds per step from results.csv files (later files win); missing files are skipped,
    unreadable ones are a ValueError."""
    out: dict[str, float] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        try:
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    value = (row.get("sec_per_step") or "").strip()
                    if row.get("relation") and value:
                        sec = float(value)
                        if math.isfinite(sec) and sec > 0:
                            out[row["relation"]] = sec
        except (csv.Error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"history file {path} is not a results.csv of ray_submit: {e}") from None
    return out


def plan_relations(names: list[str], storage: Path, max_steps: int, history: dict[str, float]) -> list[PlannedRelation]:
    """The relations in submission order: longest expected first (see the module docstring)."""
    known: dict[str, tuple[float, str]] = {}
    for name in names:
        own = records.median_step_seconds(storage / name)
        if own is not None:
            known[name] = (own, "metrics")
        elif name in history:
            known[name] = (history[name], "history")
    fallback = (statistics.median(v for v, _ in known.values()), "median") if known else (1.0, "default")
    planned = []
    for name in names:
        sec, basis = known.get(name, fallback)
        remaining = max(0, max_steps - records.latest_checkpoint_step(storage / name))
        planned.append(PlannedRelation(name, remaining, sec, basis, remaining * sec))
    return sorted(planned, key=lambda p: -p.expected_seconds)        # stable: ties keep the given order
