"""Batch training of many relations on a Ray cluster (launch/ray_submit.py; docs/ray.md).

Modules, one job each:
    options   the Ray-specific options (RayOptions), documented once
    plan      resources per relation and the longest-expected-first order
    records   the run's files on shared storage (attempts, logs, markers, metrics tails)
    worker    what runs on the Ray workers (one relation as a task, or as ranks under TorchTrainer)
    run       the driver: connect, submit, wait, classify failures, write results
    progress  the live table
    results   results.csv / results.md / loss_curves.png
"""
__all__ = ["RayOptions", "RunReport", "run_relations"]


def __getattr__(name: str):
    """The driver's names load on first use (PEP 562), so that the trainer can use `records` without importing
    the driver, whose workers import the trainer."""
    if name == "RayOptions":
        from dr_train.orchestrate.options import RayOptions  # deferred: see the docstring
        return RayOptions
    if name in ("RunReport", "run_relations"):
        from dr_train.orchestrate import run  # deferred: see the docstring
        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
