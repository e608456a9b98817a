"""What runs on the Ray workers: one relation's training, as one process (a Ray task) or as one rank of a Ray Train
TorchTrainer; plus the one-off synthetic-data generation before the relations start.

Every attempt records itself in <storage>/<relation>/attempts.jsonl (start/end, pid, host) and writes everything
it prints and logs to <storage>/<relation>/train.log. The trainer always runs with train.resume=true, so an attempt
after a crash continues from the relation's latest checkpoint (and the trainer truncates metrics.jsonl to that
checkpoint's step, so no step is counted twice).

Application errors (the trainer's ValueErrors for bad data or config, a non-finite loss, any other exception of
the training code) reach the driver as a `RelationFailed` carrying the original type and message, which the
driver can unpickle without importing torch. They are not retried: the single-process task is declared with
retry_exceptions=False, so Ray re-executes it only when its process or node dies. Under TorchTrainer every
exception of a rank restarts the worker group (a lost rank shows up as exceptions in the surviving ranks), so a
rank that hits an application error first writes <relation>/app_error.json; the restarted ranks find it and stop
at once, and the driver reports the error.

The training code (torch, the trainer) is imported inside the task functions, not at the top: Ray imports this
module to start a fresh worker process, and a light module lets that process take its task at once, so
relations start side by side and the import's seconds count in each relation's own time.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

from dr_train.orchestrate import records
from dr_train.run_folder import RelationFolder


class RelationFailed(Exception):
    """A relation's training failed: kind 'app' (an error of the training code, never retried) or 'system'
    (ranks kept dying past the retry limit). Plain strings only, so the driver unpickles it without torch."""

    def __init__(self, kind: str, error_type: str, message: str):
        super().__init__(kind, error_type, message)
        self.kind, self.error_type, self.message = kind, error_type, message

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


@contextlib.contextmanager
def captured_output(path: Path) -> Iterator:
    """Send this process's stdout and stderr (file descriptors 1 and 2 and sys.stdout/sys.stderr) and the
    `dr_train` log records to `path` (appended, line-buffered) until the block ends; then restore them.
    (Tracebacks are written to the yielded file directly: Ray Train's patched `print` would log them twice.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    log_file = path.open("a", buffering=1, errors="replace")
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    logger = logging.getLogger("dr_train")
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved_level, saved_propagate = logger.level, logger.propagate
    try:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        sys.stdout = sys.stderr = log_file
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False             # a root handler (Ray Train's) would write each record a second time
        yield log_file
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate
        log_file.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        log_file.close()


def relation_config(spec: dict):
    """The trainer's Config for one relation: the run's options, this relation only, output under the storage,
    always resuming."""
    from dr_train.config import load_config  # deferred: in the task (see the module docstring)

    own = [f"train.relations={json.dumps([spec['relation']])}", f"train.output_dir={json.dumps(spec['storage'])}",
           "train.resume=true"]
    return load_config(None, list(spec["overrides"]) + own)


def _header(log_file, spec: dict, attempt: int | None, rank: int = 0) -> None:
    what = f"attempt {attempt}" if attempt is not None else "attempt"
    log_file.write(f"===== {spec['relation']}: {what} of run {spec['run_id']}, rank {rank}, pid {os.getpid()} on "
                   f"{socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")


def _train(spec: dict) -> dict:
    import torch  # deferred: in the task (see the module docstring)

    from dr_train.trainer import train  # deferred: in the task (see the module docstring)

    cfg = relation_config(spec)
    torch.set_num_threads(int(spec["threads"]))
    return train(cfg)[0]


def _failed(e: BaseException) -> RelationFailed:
    return e if isinstance(e, RelationFailed) else RelationFailed("app", type(e).__name__, str(e))


def train_relation(spec: dict) -> dict:
    """One relation in this process (the body of the Ray task). `spec`: relation, run_id, storage, overrides
    (the run's config as section.option=value), threads."""
    rel_dir = records.relation_dir(Path(spec["storage"]), spec["relation"])
    attempt = records.start_attempt(rel_dir, spec["run_id"], ranks=1)
    started = time.time()
    try:
        with captured_output(records.log_path(rel_dir)) as log_file:
            _header(log_file, spec, attempt)
            try:
                result = _train(spec)
            except BaseException:
                log_file.write(traceback.format_exc())
                raise
    except Exception as e:
        failure = _failed(e)
        records.end_attempt(rel_dir, spec["run_id"], attempt, "failed", str(failure))
        raise failure from None
    records.end_attempt(rel_dir, spec["run_id"], attempt, "finished")
    return {**result, "attempt": attempt, "seconds": time.time() - started, "end": time.time()}


def train_rank(spec: dict) -> None:
    """One rank of a relation under Ray Train (the TorchTrainer's train_loop_per_worker). Ray Train has set
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and initialised the process group, which the trainer's
    init_distributed reuses."""
    import ray.train  # deferred: ray is an optional dependency

    rank = ray.train.get_context().get_world_rank()
    rel_dir = records.relation_dir(Path(spec["storage"]), spec["relation"])
    if records.read_app_error(rel_dir, spec["run_id"]) is not None:
        return                           # an earlier attempt of this run hit an application error: not repeated
    attempt = records.start_attempt(rel_dir, spec["run_id"], ranks=spec["workers"]) if rank == 0 else None
    status, error = "finished", ""
    try:
        with captured_output(records.log_path(rel_dir, rank)) as log_file:
            _header(log_file, spec, attempt, rank)
            try:
                _train(spec)
            except BaseException as e:
                log_file.write(traceback.format_exc())
                status, error = "failed", f"{type(e).__name__}: {e}"
                if _is_app_error(e):
                    records.write_app_error(rel_dir, spec["run_id"], type(e).__name__, str(e),
                                            traceback.format_exc())
                raise
    finally:
        if attempt is not None:
            records.end_attempt(rel_dir, spec["run_id"], attempt, status, error)


def _is_app_error(e: BaseException) -> bool:
    """Errors that a restart would only repeat: the trainer's user errors (ValueError) and a non-finite loss."""
    from dr_train.trainer import NonFiniteLossError  # deferred: in the task (see the module docstring)

    return isinstance(e, (ValueError, NonFiniteLossError))


def train_relation_ranks(spec: dict, per_worker: dict, max_failures: int) -> dict:
    """One relation on spec['workers'] ranks under Ray Train's TorchTrainer (the body of a light Ray task that
    holds no resources itself). FailureConfig(max_failures) restarts the ranks after a failure; they resume from
    the relation's latest checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rel_dir = records.relation_dir(Path(spec["storage"]), spec["relation"])
    started = time.time()
    trainer = TorchTrainer(
        train_rank, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=int(spec["workers"]), use_gpu=per_worker.get("GPU", 0) > 0,
                                     resources_per_worker=dict(per_worker)),
        run_config=RunConfig(name=f"{spec['relation']}-{spec['run_id']}",
                             storage_path=str(Path(spec["storage"]) / "_ray_train"),
                             failure_config=FailureConfig(max_failures=max_failures)))
    try:
        trainer.fit()
    except Exception as e:               # ray.train's TrainingFailedError once the restarts are used up
        app = records.read_app_error(rel_dir, spec["run_id"])
        if app is not None:
            raise RelationFailed("app", *app) from None
        raise RelationFailed("system", type(e).__name__,
                             f"ranks kept failing ({max_failures} restart(s) allowed): {e}") from None
    app = records.read_app_error(rel_dir, spec["run_id"])
    if app is not None:
        raise RelationFailed("app", *app)
    done = records.read_json(RelationFolder(rel_dir).done) or {}
    summary = records.attempt_summary(rel_dir, spec["run_id"])
    return {**done, "attempt": summary["attempts"], "seconds": time.time() - started, "end": time.time()}


def prepare_synthetic(overrides: list[str], relations: list[str]) -> str:
    """Render and encode the synthetic clips of `relations` once, before the relations start (the trainer would
    otherwise do it in whichever relation comes first, with the others waiting on the dataset's lock)."""
    from dr_train.catalog import catalog_for, select_relations  # deferred: in the task (see the module docstring)
    from dr_train.config import load_config  # deferred: in the task (see the module docstring)
    from dr_train.data.sources import resolve_dataset  # deferred: in the task (see the module docstring)

    cfg = load_config(None, overrides)
    return str(resolve_dataset(cfg, select_relations(relations, catalog_for(cfg))))
