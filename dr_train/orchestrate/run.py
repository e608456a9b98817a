"""The driver: connect to Ray, submit one training per relation, watch them, write the results.

Ray mechanisms used, and nothing of our own beyond the glue:
  - one Ray task per relation (`ray.remote` with num_cpus/num_gpus = the relation's resources), or, for a relation
    on several ranks, a resource-free Ray task that runs a Ray Train `TorchTrainer` (ScalingConfig: one worker per
    rank, FailureConfig(max_failures)); Ray's scheduler places them and packs fractional requests;
  - retries: the task's `max_retries` (Ray re-executes it when its worker process or node dies) with
    `retry_exceptions=False` (an exception of the training code is final), or TorchTrainer's FailureConfig;
  - the concurrency limit: at most --max-concurrent tasks in flight, the next submitted when `ray.wait` returns
    one (Ray's "limit pending tasks" pattern), in longest-expected-first order (see plan.py).
Each attempt resumes from the relation's latest checkpoint on shared storage (the trainer runs with
train.resume=true); a finished relation (DONE.json) is skipped on re-submission unless it is asked for more
steps than it had, then it continues from its last checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dr_train import fanout
from dr_train.base_identity import PRESETS, base_identity
from dr_train.catalog import catalog_for, select_relations
from dr_train.config import Config
from dr_train.orchestrate import plan as planning, records, results as res_mod, worker
from dr_train.orchestrate.options import RayOptions
from dr_train.orchestrate.progress import Progress
from dr_train.orchestrate.results import RelationResult
from dr_train.run_lock import RunLock

# options that may differ between submissions of one run without changing what a relation trains
_PER_SUBMISSION = {"train.relations", "train.output_dir", "train.resume", "data.num_workers"}


@dataclass
class RunReport:
    """What a submission did: one result per relation (in the order given) and the files written."""
    run_id: str
    storage: Path
    resources: planning.Resources
    results: list[RelationResult]
    makespan_seconds: float                          # first relation submitted to last one done
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[RelationResult]:
        return [r for r in self.results if r.status == "failed"]


def config_overrides(cfg: Config) -> list[str]:
    """The whole config as `section.option=<JSON>` overrides, which `load_config(None, overrides)` turns back
    into the same (re-validated) Config on a worker."""
    return [f"{section}.{key}={json.dumps(value)}" for section, options in cfg.to_dict().items()
            for key, value in options.items()]


def _flat(cfg_dict: dict) -> dict[str, object]:
    return {f"{s}.{k}": v for s, opts in cfg_dict.items() for k, v in opts.items()}


def absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` whose relative file paths (catalog, dataset, synthetic cache, a model folder) are made
    absolute against this driver's working directory, so the workers read the same files wherever they run."""
    cfg = copy.deepcopy(cfg)
    d = cfg.data
    if d.catalog:
        d.catalog = str(Path(d.catalog).expanduser().resolve())
    if d.source != "synthetic":
        d.source = str(Path(d.source).expanduser().resolve())
    d.cache_dir = str(Path(d.cache_dir).expanduser().resolve())
    if cfg.model.preset not in PRESETS and Path(cfg.model.preset).expanduser().exists():
        cfg.model.preset = str(Path(cfg.model.preset).expanduser().resolve())
    return cfg


def connect(opts: RayOptions) -> None:
    """Join the cluster at --address, the one in RAY_ADDRESS, or start a local one (fanout.connect)."""
    fanout.connect(opts.address, opts.num_cpus)


def _system_error(e: Exception, retries: int, limit: int) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    detail = lines[0][:300] if lines else ""
    return (f"{type(e).__name__}: the relation's worker died {retries + 1} time(s), retry limit {limit}"
            + (f" ({detail})" if detail else ""))


def _classify(e: Exception, retries: int, limit: int) -> str:
    """The error text of a failed relation: the training code's exception (type: message), or why Ray gave up."""
    import ray.exceptions  # deferred: ray is an optional dependency

    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, worker.RelationFailed):
            return str(cause)
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
        return str(e).strip().splitlines()[-1][:500]
    return _system_error(e, retries, limit)


class _Submitter:
    """Submits the relations' tasks in plan order, never more than `limit` in flight."""

    def __init__(self, spec_of, resources: planning.Resources, max_retries: int, limit: int):
        import ray  # deferred: ray is an optional dependency

        self.spec_of, self.resources, self.limit = spec_of, resources, limit
        common = {"max_retries": max_retries, "retry_exceptions": False}
        if resources.uses_ray_train:
            self.task = ray.remote(worker.train_relation_ranks)
            self.options = {"num_cpus": 0, **common}
            self.args = lambda name: (spec_of(name), resources.per_worker(), max_retries)
        else:
            self.task = ray.remote(worker.train_relation)
            self.options = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, **common}
            self.args = lambda name: (spec_of(name),)
        self.in_flight: dict = {}                   # ObjectRef -> relation

    def fill(self, queue: list[str]) -> list[str]:
        """Submit from the front of `queue` while there is room; returns the relations submitted."""
        submitted = []
        while queue and (not self.limit or len(self.in_flight) < self.limit):
            name = queue.pop(0)
            ref = self.task.options(name=f"train:{name}", **self.options).remote(*self.args(name))
            self.in_flight[ref] = name
            submitted.append(name)
        return submitted


def _prepare_data(cfg: Config, overrides: list[str], names: list[str], out: TextIO) -> None:
    """Generate the synthetic dataset once in a Ray task before the relations start. A failure is only a warning:
    each relation then generates (or fails on) its own data and reports that."""
    import ray  # deferred: ray is an optional dependency

    if cfg.data.source != "synthetic" or not names:
        return
    task = ray.remote(worker.prepare_synthetic).options(num_cpus=1, max_retries=1, retry_exceptions=False)
    out.write(f"checking (or generating) the synthetic dataset of {len(names)} relation(s) in {cfg.data.cache_dir}\n")
    out.flush()
    try:
        path = ray.get(task.remote(overrides, names))
        out.write(f"synthetic dataset ready: {path}\n")
    except Exception as e:                            # noqa: BLE001 - reported, the relations go on
        out.write(f"warning: generating the synthetic dataset once failed ({_classify(e, 0, 1)}); each relation "
                  f"generates its own\n")


def _result_of(storage: Path, name: str, status: str, cfg: Config, resources: planning.Resources, run_id: str,
               end: float | None, error: str = "") -> RelationResult:
    rel_dir = records.relation_dir(storage, name)
    row = res_mod.from_storage(rel_dir, name, status, cfg.train.max_steps)
    summary = records.attempt_summary(rel_dir, run_id)
    row.retries = max(0, summary["attempts"] - 1)
    if summary["first_start"] is not None and end is not None:
        row.wall_seconds = max(0.0, end - summary["first_start"])
        row.gpu_hours = resources.gpu_hours(row.wall_seconds)
    row.error = error
    if status == "failed":
        row.log_tail = records.log_tail(records.log_path(rel_dir))
    return row


def _skipped_result(storage: Path, name: str, max_steps: int) -> RelationResult:
    """A relation finished by an earlier submission: its earlier row, or what its files tell."""
    rel_dir = records.relation_dir(storage, name)
    earlier = records.read_json(rel_dir / "result.json")
    if earlier:
        fields = {f.name for f in dataclasses.fields(RelationResult)}
        row = RelationResult(**{k: v for k, v in earlier.items() if k in fields})
        row.status = "skipped"
        return row
    return res_mod.from_storage(rel_dir, name, "skipped", max_steps)


def _warn_config_change(storage: Path, cfg: Config, out: TextIO) -> None:
    earlier = records.read_json(storage / "run.json")
    if not earlier or "config" not in earlier:
        return
    old, new = _flat(earlier["config"]), _flat(cfg.to_dict())
    changed = sorted(k for k in set(old) | set(new) if k not in _PER_SUBMISSION and old.get(k) != new.get(k))
    if changed:
        out.write("warning: this submission's config differs from the previous one on this storage in "
                  + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
                  + "; unfinished relations resume from their checkpoints with the new values\n")


def run_relations(cfg: Config, opts: RayOptions, out: TextIO | None = None) -> RunReport:
    """Train `cfg.train.relations` on the Ray cluster of `opts`, each relation into <storage>/<relation>/, and
    write the results table. User errors (unknown relations, impossible resources, a busy storage) are
    ValueErrors raised before anything is submitted; a relation's own failure is a row of the table."""
    out = out or sys.stdout
    opts.validate()
    if cfg.train.resume_from:
        raise ValueError("train.resume_from rewinds one relation to an older checkpoint: run it with launch/train.py "
                         "--relations <name> --resume-from step-N on the storage folder, not on a Ray submission "
                         "(its retries would rewind again)")
    cfg = absolute_paths(cfg)
    names = [r.name for r in select_relations(cfg.train.relations, catalog_for(cfg))]
    storage = Path(opts.storage or cfg.train.output_dir).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    with RunLock.acquire(storage / ".submit.lock", what=f"storage folder {storage} (one submission at a time: "
                                                         f"or choose another --storage)"):
        if cfg.model.preset in PRESETS or Path(cfg.model.preset).is_dir():    # else only the workers see it
            base = base_identity(cfg.model.preset)
            for n in names:
                records.check_finished_base(records.relation_dir(storage, n), cfg.model.preset, base)
        connect(opts)
        import ray  # deferred: ray is an optional dependency

        resources = planning.resolve_resources(opts, ray.cluster_resources())
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        done_before = [n for n in names
                       if records.is_finished(records.relation_dir(storage, n), cfg.train.max_steps)]
        pending = [n for n in names if n not in done_before]
        history = planning.read_history([storage / "results.csv", *map(Path, opts.history)])
        order = planning.plan_relations(pending, storage, cfg.train.max_steps, history)
        _warn_config_change(storage, cfg, out)
        overrides = config_overrides(cfg)
        run_info = {"run_id": run_id, "started": time.time(), "status": "running", "storage": str(storage),
                    "options": dataclasses.asdict(opts), "resources": dataclasses.asdict(resources),
                    "cluster": ray.cluster_resources(), "relations": names, "skipped": done_before,
                    "order": [dataclasses.asdict(p) for p in order], "config": cfg.to_dict()}
        records.write_json(storage / "run.json", run_info)

        out.write(f"run {run_id} on {storage}: {len(pending)} relation(s) to train, {len(done_before)} finished "
                  f"before; {resources.describe()}; at most {opts.max_concurrent or 'unlimited'} at once, "
                  f"{opts.max_retries} retries\n")
        if order:
            out.write("order (longest expected first): " + ", ".join(
                f"{p.name} ({p.remaining_steps} steps x {p.seconds_per_step:.3g} s, {p.basis})" for p in order) + "\n")
        out.flush()

        _prepare_data(cfg, overrides, pending, out)
        progress = Progress(storage, run_id, names, cfg.train.max_steps, opts.live, out)
        for name in done_before:
            progress.set_state(name, "skipped")

        def spec_of(name: str) -> dict:
            return {"relation": name, "run_id": run_id, "storage": str(storage), "overrides": overrides,
                    "threads": resources.threads_per_worker, "workers": resources.workers}

        submitter = _Submitter(spec_of, resources, opts.max_retries, opts.max_concurrent)
        queue = [p.name for p in order]
        outcome: dict[str, RelationResult] = {}
        started = time.time()
        try:
            while queue or submitter.in_flight:
                submitter.fill(queue)
                ready, _ = ray.wait(list(submitter.in_flight), num_returns=1, timeout=opts.refresh_seconds)
                for ref in ready:
                    name = submitter.in_flight.pop(ref)
                    outcome[name] = _collect(ref, name, storage, cfg, resources, run_id, opts.max_retries)
                    progress.set_state(name, outcome[name].status)
                progress.refresh()
        except KeyboardInterrupt:
            for ref, name in submitter.in_flight.items():
                ray.cancel(ref, force=True)
                outcome[name] = _result_of(storage, name, "failed", cfg, resources, run_id, time.time(),
                                           "interrupted: the submission was stopped (Ctrl-C)")
            for name in queue:
                outcome[name] = RelationResult(name, "failed", max_steps=cfg.train.max_steps,
                                               error="interrupted before it started")
            raise
        finally:
            makespan = time.time() - started
            progress.close()
            for name in done_before:
                outcome[name] = _skipped_result(storage, name, cfg.train.max_steps)
            final = [outcome[n] for n in names if n in outcome]
            report = RunReport(run_id, storage, resources, final, makespan)
            report.files = _write_results(report, run_info)
        _print_report(report, out)
        return report


def _collect(ref, name: str, storage: Path, cfg: Config, resources: planning.Resources, run_id: str,
             max_retries: int) -> RelationResult:
    """The row of a relation whose task ended: finished, or failed with the reason Ray or the trainer gave."""
    import ray  # deferred: ray is an optional dependency

    try:
        value = ray.get(ref)
    except Exception as e:                            # noqa: BLE001 - every failure becomes a row
        summary = records.attempt_summary(records.relation_dir(storage, name), run_id)
        error = _classify(e, max(0, summary["attempts"] - 1), max_retries)
        return _result_of(storage, name, "failed", cfg, resources, run_id, time.time(), error)
    status = "finished" if value.get("status") == "finished" else "skipped"
    return _result_of(storage, name, status, cfg, resources, run_id, value.get("end", time.time()))


def _write_results(report: RunReport, run_info: dict) -> dict[str, Path]:
    storage = report.storage
    for row in report.results:
        if row.status != "skipped":
            records.write_json(records.relation_dir(storage, row.relation) / "result.json",
                               {k: v for k, v in dataclasses.asdict(row).items() if k != "log_tail"})
    files = {"csv": res_mod.write_csv(report.results, storage / "results.csv")}
    counts = {s: sum(r.status == s for r in report.results) for s in ("finished", "skipped", "failed")}
    notes = [f"run `{report.run_id}`, storage `{storage}`",
             f"{report.resources.describe()}",
             f"makespan {report.makespan_seconds:.1f} s; " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    files["markdown"] = res_mod.write_markdown(report.results, storage / "results.md", "Relation training results",
                                               notes)
    png = res_mod.plot_loss_curves(storage, report.results, storage / "loss_curves.png")
    if png is not None:
        files["plot"] = png
    records.write_json(storage / "run.json", run_info | {
        "status": "failed" if report.failed else "finished", "finished": time.time(),
        "makespan_seconds": report.makespan_seconds, "results": {k: str(v) for k, v in files.items()}})
    return files


def _print_report(report: RunReport, out: TextIO) -> None:
    out.write("\n" + res_mod.format_table(report.results) + "\n")
    for row in report.failed:
        out.write(f"\n{row.relation} failed: {row.error}\nlog: {row.log or '(none)'}\n")
        if row.log_tail:
            out.write("".join(f"  | {line}\n" for line in row.log_tail.splitlines()))
    out.write("\nresults: " + ", ".join(str(p) for p in report.files.values()) + "\n")
    out.flush()
