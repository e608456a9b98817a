"""The one way this project fans work out over Ray: join or start a cluster, count its GPUs, run one task per job
and collect results as they finish. The relation runner (`run.py`, with retries and limits) and batch generation
(`dr_train.generate`) both go through it. Ray is an optional dependency: it is imported here, when first used."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, the one in RAY_ADDRESS, or start a local one (dashboard off). Workers' output
    is not forwarded to this console (each job writes its own log)."""
    import ray      # deferred: optional dependency (pip install -e .[ray])

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=False)


def ray_importable() -> bool:
    try:
        import ray  # noqa: F401  deferred: optional dependency
    except ImportError:
        return False
    return True


def cluster_gpus() -> int:
    """GPUs of the connected cluster."""
    import ray      # deferred: optional dependency

    return int(ray.cluster_resources().get("GPU", 0))


def run_tasks(fn: Callable, jobs: Iterable[tuple[tuple, Any]], num_gpus: float = 0.0, num_cpus: float | None = None,
              on_done: Callable[[Any, Any], None] | None = None) -> list:
    """One Ray task `fn(*args)` per job `(args, tag)`, each with `num_gpus` GPUs; results in completion order,
    `on_done(result, tag)` called as each finishes."""
    import ray      # deferred: optional dependency

    options = {"num_gpus": num_gpus} | ({"num_cpus": num_cpus} if num_cpus is not None else {})
    task = ray.remote(**options)(fn)
    tags = {task.remote(*args): tag for args, tag in jobs}
    results, waiting = [], list(tags)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        result = ray.get(done[0])
        results.append(result)
        if on_done is not None:
            on_done(result, tags[done[0]])
    return results
