"""launch/ray_submit.py on a local Ray cluster (2 CPUs, tiny preset): 4 relations with at most 2 at once; a worker
killed mid-relation resumes from its checkpoint without losing or double-counting a step while the other
relations come out identical to an undisturbed run; broken data and a worker that dies past the retry limit fail
cleanly in the results table while the others finish. One cluster for the module; each submission is a
subprocess joining it with --address."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SYNTHETIC_CACHE
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

RELATIONS = ["handshaking", "hugging", "kicking", "pushing"]
STEPS, EVERY = 40, 10
TRAIN = ["--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--deterministic",
         "--set", f"data.cache_dir={SYNTHETIC_CACHE}", "--set", "data.videos_per_relation=6", "--set",
         "model.preset=tiny"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _cmd(address: str, storage: Path, relations: list[str], *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "ray_submit.py"), "--address", address, "--storage", str(storage),
            "--relations", ",".join(relations), "--max-concurrent", "2", "--refresh-seconds", "0.5", *TRAIN, *extra]


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore")


def _submit(address, storage, relations, *extra, expect=0) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(address, storage, relations, *extra), capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _results(storage: Path) -> dict[str, dict]:
    with (storage / "results.csv").open() as f:
        return {r["relation"]: r for r in csv.DictReader(f)}


def _rows(rel_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (rel_dir / "metrics.jsonl").read_text().splitlines()]


def _events(rel_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (rel_dir / "attempts.jsonl").read_text().splitlines()]


def _same_training(a: Path, b: Path) -> None:
    """Identical steps, losses and adapter weights (everything but the timings)."""
    ra, rb = _rows(a), _rows(b)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ra] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in rb]
    wa, wb = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def broken_catalog(path: Path, keep: list[str]) -> Path:
    """The repository's catalog entries `keep` plus a relation that no dataset has clips of."""
    import yaml

    entries = [e for e in yaml.safe_load((REPO / "datasets" / "relations.yaml").read_text())["relations"]
               if e["name"] in keep]
    entries.append({"name": "no_clips", "prompt": "A person is ignoring a person."})
    path.write_text(yaml.safe_dump({"version": 1, "relations": entries}))
    return path


def _kill_mid_relation(storage: Path, relation: str, after_step: int, timeout: float = 240) -> tuple[int, int]:
    """Wait until `relation` has logged `after_step` steps (so a checkpoint exists and later steps are not in it),
    SIGKILL the process training it; returns (pid, last logged step)."""
    rel_dir, deadline = storage / relation, time.time() + timeout
    while time.time() < deadline:
        rows = []
        if (rel_dir / "metrics.jsonl").is_file():
            rows = [l for l in (rel_dir / "metrics.jsonl").read_text().splitlines() if l.endswith("}")]
        if rows and json.loads(rows[-1])["step"] >= after_step:
            pid = [e for e in _events(rel_dir) if e["event"] == "start"][-1]["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid, json.loads(rows[-1])["step"]
        time.sleep(0.005)
    raise AssertionError(f"{relation} never reached step {after_step}")


@pytest.fixture(scope="module")
def baseline(cluster, tmp_path_factory):
    """An undisturbed run of 4 relations, at most 2 at once."""
    storage = tmp_path_factory.mktemp("ray") / "baseline"
    proc = _submit(cluster, storage, RELATIONS)
    return storage, proc


def test_four_relations_two_at_a_time(cluster, baseline):
    storage, proc = baseline
    table = _results(storage)
    assert list(table) == RELATIONS
    intervals = []
    for name, row in table.items():
        rel_dir = storage / name
        metrics = _rows(rel_dir)
        assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
        last = metrics[-1]
        assert row["status"] == "finished" and row["error"] == "" and int(row["steps"]) == STEPS
        assert int(row["retries"]) == 0 and float(row["gpu_hours"]) == 0.0
        assert float(row["loss"]) == last["loss"] and float(row["loss_rec"]) == last["loss_rec"]
        assert float(row["loss_rcl"]) == next(r["loss_rcl"] for r in reversed(metrics) if r["loss_rcl"] is not None)
        assert row["lora"] == str(rel_dir / "lora" / "pytorch_lora_weights.safetensors") and Path(row["lora"]).is_file()
        assert Path(row["log"]).is_file() and "===== " + name in Path(row["log"]).read_text()
        events = _events(rel_dir)
        assert [e["event"] for e in events] == ["start", "end"] and events[1]["status"] == "finished"
        assert float(row["wall_seconds"]) == pytest.approx(events[1]["time"] - events[0]["time"], abs=1.0)
        intervals.append((events[0]["time"], events[1]["time"]))
        assert (rel_dir / "DONE.json").is_file()
    # never more than 2 relations at once, and 2 at once for a while
    edges = sorted([(t0, 1) for t0, _ in intervals] + [(t1, -1) for _, t1 in intervals])
    running, peak = 0, 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    assert peak == 2
    md = (storage / "results.md").read_text()
    assert all(f"| {n} | finished | {STEPS}/{STEPS} |" in md for n in RELATIONS)
    assert (storage / "loss_curves.png").stat().st_size > 0
    assert json.loads((storage / "run.json").read_text())["status"] == "finished"
    assert "order (longest expected first)" in proc.stdout and re.search(r"hugging\s+finished\s+40/40", proc.stdout)

    # re-submitting the same run skips the finished relations without starting any training
    again = _submit(cluster, storage, RELATIONS)
    assert {r["status"] for r in _results(storage).values()} == {"skipped"}
    assert all(len(_events(storage / n)) == 2 for n in RELATIONS)
    assert "0 relation(s) to train, 4 finished before" in again.stdout


def test_killed_worker_resumes_from_its_checkpoint(cluster, baseline, tmp_path):
    victim, others = "hugging", ["handshaking", "kicking"]
    storage = tmp_path / "fault"
    proc = subprocess.Popen(_cmd(cluster, storage, [victim, *others]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        pid, killed_at = _kill_mid_relation(storage, victim, after_step=EVERY + 2)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert killed_at < STEPS
    table = _results(storage)
    assert {n: (r["status"], r["retries"]) for n, r in table.items()} == {
        victim: ("finished", "1"), "handshaking": ("finished", "0"), "kicking": ("finished", "0")}
    rel_dir = storage / victim
    starts = [e for e in _events(rel_dir) if e["event"] == "start"]
    assert [e["attempt"] for e in starts] == [1, 2] and starts[0]["pid"] == pid != starts[1]["pid"]
    resumed = re.findall(r"resumed from \S+step-(\d{8}) \(step (\d+)\)", (rel_dir / "train.log").read_text())
    assert len(resumed) == 1
    checkpoint = int(resumed[0][1])
    assert EVERY <= checkpoint < killed_at and checkpoint % EVERY == 0   # the steps after it were redone
    # every step exactly once, none lost, none double-counted, and the same training as without the kill
    assert [r["step"] for r in _rows(rel_dir)] == list(range(1, STEPS + 1))
    baseline_storage = baseline[0]
    _same_training(rel_dir, baseline_storage / victim)
    for name in others:
        _same_training(storage / name, baseline_storage / name)
    assert f"{victim}: running" in out and "retries 1" in out


def test_broken_data_and_exhausted_retries_fail_cleanly(cluster, baseline, tmp_path):
    dataset = next(p.parent for p in SYNTHETIC_CACHE.glob("synthetic-*/manifest.json")
                   if set(RELATIONS) <= set(json.loads(p.read_text())["relations"]))
    storage = tmp_path / "broken"
    dying, broken, fine = "handshaking", "no_clips", "kicking"
    catalog = broken_catalog(tmp_path / "catalog.yaml", [dying, fine])
    proc = subprocess.Popen(_cmd(cluster, storage, [dying, broken, fine], "--max-retries", "0",
                                 "--set", f"data.source={dataset}", "--set", f"data.catalog={catalog}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _kill_mid_relation(storage, dying, after_step=3)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    table = _results(storage)
    assert [table[n]["status"] for n in (dying, broken, fine)] == ["failed", "failed", "finished"]
    assert table[broken]["error"].startswith(f"ValueError: dataset {dataset} has no samples of {broken}")
    assert table[dying]["error"].startswith("WorkerCrashedError") and "retry limit 0" in table[dying]["error"]
    assert table[broken]["retries"] == table[dying]["retries"] == "0"
    assert [e["event"] for e in _events(storage / broken)] == ["start", "end"]      # not retried
    assert "has no samples" in (storage / broken / "train.log").read_text()
    assert int(table[fine]["steps"]) == STEPS and Path(table[fine]["lora"]).is_file()
    md = (storage / "results.md").read_text()
    failures = md.split("## Failures", 1)[1]
    assert f"### {broken}" in failures and "Traceback" in failures and f"### {dying}" in failures
    assert f"{broken} failed: ValueError" in out and "  | " in out


def test_fanout_runs_one_task_per_job_and_reports_each_as_it_finishes(cluster):
    """The fan-out batch generation uses: every job runs once as its own task, on_done sees each result's tag."""
    from dr_train import fanout
    from dr_train.geometry import latent_frames  # a function the workers can import

    fanout.connect()                                    # already connected: joins, starts nothing
    seen = []
    frames = [1, 7, 13, 19, 61]
    results = fanout.run_tasks(latent_frames, [((f,), f"clip{f}") for f in frames], num_cpus=0.5,
                               on_done=lambda result, tag: seen.append((tag, result)))
    assert sorted(results) == [1, 2, 3, 4, 11]
    assert sorted(seen) == sorted((f"clip{f}", 1 + (f - 1) // 6) for f in frames)
