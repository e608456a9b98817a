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
from dr_train.orchestrate.options import RayOptions
from dr_train.orchestrate.run import RunReport, run_relations

__all__ = ["RayOptions", "RunReport", "run_relations"]
