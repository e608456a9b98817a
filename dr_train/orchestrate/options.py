"""The Ray-specific options of a batch run (everything else is the trainer's own Config), documented once here;
`launch/ray_submit.py` turns each into a command-line flag with this help text."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LIVE_MODES = ("auto", "rich", "plain", "off")


def opt(default: Any, flag_help: str):
    """A Ray option with its one-line documentation (shown by --help)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": flag_help})
    return field(default=default, metadata={"help": flag_help})


@dataclass
class RayOptions:
    """How the relations of one run are spread over a Ray cluster."""
    address: str = opt("", "Ray cluster to join: 'auto' (the cluster this machine belongs to, e.g. under `ray job "
                           "submit`), 'HOST:PORT' of the head's GCS, or 'ray://HOST:10001'; empty starts a local "
                           "cluster on this machine (unless RAY_ADDRESS is set, which Ray then uses)")
    num_cpus: int = opt(0, "CPUs of the local cluster started when --address is empty (0 = all of this machine)")
    storage: str = opt("", "shared folder of the run: <storage>/<relation>/ holds each relation's checkpoints, "
                           "metrics, log and LoRA; every node must see it at the same path (empty = "
                           "train.output_dir)")
    gpus_per_relation: float = opt(-1.0, "GPUs each relation holds: a fraction (< 1) lets several relations share "
                                         "a GPU, 1 is one process on one GPU, N > 1 runs the relation on N ranks "
                                         "under Ray Train's TorchTrainer (DeepSpeed inside when "
                                         "distributed.zero_stage > 0); -1 = 1 when the cluster has GPUs, else 0")
    cpus_per_relation: float = opt(1.0, "CPUs each relation holds (split evenly over its ranks); with no GPUs "
                                        "this is what decides how many relations share a node")
    workers_per_relation: int = opt(0, "ranks (processes) per relation; > 1 uses TorchTrainer, with gloo on CPUs; "
                                       "0 = the GPU count when gpus_per_relation > 1, else 1")
    max_concurrent: int = opt(0, "relations training at once, at most (0 = as many as the cluster's resources "
                                 "allow)")
    max_retries: int = opt(2, "times a relation is restarted from its last checkpoint after its worker process or "
                              "node died; application errors (bad data, bad config, NaN loss) are never retried")
    history: list = opt([], "results.csv files of earlier runs whose seconds per step predict each relation's "
                            "duration for the longest-first order (<storage>/results.csv is always read)")
    refresh_seconds: float = opt(1.0, "how often the progress table is refreshed from the relations' metrics")
    live: str = opt("auto", "progress display: rich (redrawn table), plain (table printed when a state changes and "
                            "every 60 s), off, or auto (rich on a terminal when installed, else plain)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the flag of the first invalid option."""
        for f in option_fields():
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.num_cpus < 0:
            raise ValueError(f"--num-cpus must be >= 0, got {self.num_cpus}")
        g, w = self.gpus_per_relation, self.workers_per_relation
        if g < 0 and g != -1:
            raise ValueError(f"--gpus-per-relation must be >= 0 (or -1 for auto), got {g}")
        if g > 1 and g != int(g):
            raise ValueError(f"--gpus-per-relation above 1 must be a whole number of GPUs (one rank each), got {g}")
        if w < 0:
            raise ValueError(f"--workers-per-relation must be >= 0, got {w}")
        if w == 1 and g > 1:
            raise ValueError(f"--gpus-per-relation {g:g} needs {int(g)} ranks, but --workers-per-relation is 1: one "
                             f"process uses one GPU")
        if w > 1 and g > 0 and g / w > 1:
            raise ValueError(f"--gpus-per-relation {g:g} over --workers-per-relation {w} gives a rank more than one "
                             f"GPU; one process uses one GPU")
        if self.cpus_per_relation <= 0:
            raise ValueError(f"--cpus-per-relation must be > 0, got {self.cpus_per_relation}")
        if self.max_concurrent < 0:
            raise ValueError(f"--max-concurrent must be >= 0, got {self.max_concurrent}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.refresh_seconds <= 0:
            raise ValueError(f"--refresh-seconds must be > 0, got {self.refresh_seconds}")
        if self.live not in LIVE_MODES:
            raise ValueError(f"--live must be one of {', '.join(LIVE_MODES)}, got {self.live!r}")


def option_fields() -> list[dataclasses.Field]:
    """The options in declaration order (for building command-line flags)."""
    return list(dataclasses.fields(RayOptions))
