"""dr_train.orchestrate without a Ray cluster: options, resources, the longest-first plan, the storage records,
output capture, the results files and the progress table."""
import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dr_train.config import load_config
from dr_train.orchestrate import progress as progress_mod
from dr_train.orchestrate import records, results
from dr_train.orchestrate.options import RayOptions
from dr_train.orchestrate.plan import Resources, plan_relations, read_history, resolve_resources
from dr_train.orchestrate.run import absolute_paths, config_overrides
from dr_train.orchestrate.worker import RelationFailed, captured_output


def _metrics(rel_dir, steps, seconds=0.1, loss=1.0):
    rel_dir.mkdir(parents=True, exist_ok=True)
    with (rel_dir / "metrics.jsonl").open("a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "selection": "all", "loss": loss + s, "loss_rec": loss + s / 2,
                                "loss_rcl": None if s < 3 else 0.5, "seconds": seconds}) + "\n")


def _checkpoint(rel_dir, step, complete=True):
    folder = rel_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "manifest.json").write_text("{}")


@pytest.mark.parametrize("kwargs, message", [
    ({"gpus_per_relation": 1.5}, "whole number"),
    ({"gpus_per_relation": 2, "workers_per_relation": 1}, "one process uses one GPU"),
    ({"gpus_per_relation": 4, "workers_per_relation": 2}, "more than one GPU"),
    ({"gpus_per_relation": -2}, "--gpus-per-relation"),
    ({"cpus_per_relation": 0}, "--cpus-per-relation"),
    ({"max_concurrent": -1}, "--max-concurrent"),
    ({"max_retries": -1}, "--max-retries"),
    ({"live": "fancy"}, "--live"),
])
def test_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RayOptions(**kwargs)


def test_resources_from_options_and_cluster():
    cpu_cluster, gpu_cluster = {"CPU": 8.0}, {"CPU": 64.0, "GPU": 8.0}
    assert resolve_resources(RayOptions(), cpu_cluster) == Resources(gpus=0.0, cpus=1.0, workers=1)
    assert resolve_resources(RayOptions(), gpu_cluster) == Resources(gpus=1.0, cpus=1.0, workers=1)
    half = resolve_resources(RayOptions(gpus_per_relation=0.5, cpus_per_relation=4), gpu_cluster)
    assert (half.workers, half.uses_ray_train, half.threads_per_worker) == (1, False, 4)
    four = resolve_resources(RayOptions(gpus_per_relation=4, cpus_per_relation=8), gpu_cluster)
    assert four.workers == 4 and four.uses_ray_train and four.per_worker() == {"CPU": 2.0, "GPU": 1.0}
    assert four.gpu_hours(1800) == pytest.approx(2.0)
    cpu_ranks = resolve_resources(RayOptions(workers_per_relation=2, cpus_per_relation=2), cpu_cluster)
    assert cpu_ranks.per_worker() == {"CPU": 1.0} and cpu_ranks.gpu_hours(3600) == 0
    with pytest.raises(ValueError, match="cluster has 0"):
        resolve_resources(RayOptions(gpus_per_relation=1), cpu_cluster)
    with pytest.raises(ValueError, match="CPU"):
        resolve_resources(RayOptions(cpus_per_relation=16), cpu_cluster)


def test_longest_expected_first(tmp_path):
    storage = tmp_path / "runs"
    _metrics(storage / "a", range(1, 5), seconds=0.5)              # own history: 0.5 s/step, no checkpoint
    _metrics(storage / "b", range(1, 31), seconds=0.5)
    _checkpoint(storage / "b", 20)                                  # resumes at 20: 20 of 40 steps left
    _checkpoint(storage / "b", 30, complete=False)                  # an interrupted save does not count
    hist = tmp_path / "results.csv"
    hist.write_text("relation,status,sec_per_step\nc,finished,2.0\na,finished,9.0\nbad,finished,\n")
    history = read_history([hist, tmp_path / "missing.csv"])
    assert history == {"c": 2.0, "a": 9.0}
    order = plan_relations(["a", "b", "c", "d", "e"], storage, 40, history)
    by_name = {p.name: p for p in order}
    assert by_name["a"].basis == "metrics" and by_name["a"].seconds_per_step == 0.5   # own metrics beat history
    assert by_name["b"].remaining_steps == 20 and by_name["b"].expected_seconds == 10
    assert by_name["c"].basis == "history" and by_name["c"].expected_seconds == 80
    assert by_name["d"].basis == "median" and by_name["d"].seconds_per_step == 0.5
    assert [p.name for p in order] == ["c", "a", "d", "e", "b"]    # ties (a, d, e: 20 s) keep the given order
    assert [p.basis for p in plan_relations(["x", "y"], tmp_path / "empty", 10, {})] == ["default", "default"]
    (tmp_path / "broken.csv").write_text("relation,sec_per_step\na,fast\n")
    with pytest.raises(ValueError, match="not a results.csv"):
        read_history([tmp_path / "broken.csv"])


def test_config_travels_to_workers_as_overrides(tmp_path):
    cfg = load_config(None, ["train.relations=[hugging, kicking]", "lora.placement=relation_v", "optim.lr=3e-4",
                             "data.cache_dir=rel/cache", "hmt.probabilities=[0.5, 0.25, 0.25]"])
    assert load_config(None, config_overrides(cfg)) == cfg
    cfg.data.source = "prepared/ds"
    moved = absolute_paths(cfg)
    assert moved.data.cache_dir == str(Path.cwd() / "rel" / "cache")
    assert moved.data.source == str(Path.cwd() / "prepared" / "ds") and moved.model.preset == "synth"   # a built-in name stays a name
    assert cfg.data.cache_dir == "rel/cache"                       # the caller's config is left alone


def test_attempt_records_and_app_errors(tmp_path):
    rel = tmp_path / "hugging"
    assert records.start_attempt(rel, "run1") == 1
    records.end_attempt(rel, "run1", 1, "failed", "boom")
    assert records.start_attempt(rel, "run1") == 2
    assert records.start_attempt(rel, "run2") == 1                  # attempts count per submission
    summary = records.attempt_summary(rel, "run1")
    assert summary["attempts"] == 2 and summary["pid"] == os.getpid()
    assert records.read_app_error(rel, "run1") is None
    records.write_app_error(rel, "run1", "ValueError", "no samples: x", "Traceback ...")
    assert records.read_app_error(rel, "run1") == ("ValueError", "no samples: x")
    assert records.read_app_error(rel, "run2") is None              # an earlier submission's error is not this one's
    assert str(RelationFailed("app", "ValueError", "bad")) == "ValueError: bad"


def test_metrics_tail_reads_increments_and_follows_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = records.MetricsTail(path)
    assert tail.poll() is None
    _metrics(tmp_path, [1, 2, 3], seconds=0.2)
    assert tail.poll()["step"] == 3 and tail.seconds_per_step() == pytest.approx(0.2)
    with path.open("a") as f:
        f.write('{"step": 4, "loss": 1.0, "seco')                    # a line being written
    assert tail.poll()["step"] == 3
    with path.open("a") as f:
        f.write('nds": 0.4}\n')
    assert tail.poll()["step"] == 4
    path.write_text("".join(l + "\n" for l in path.read_text().splitlines()[:2]))   # a resume truncates
    assert tail.poll()["step"] == 2 and len(tail.recent) == 2


def test_captured_output_takes_prints_fds_and_logs(tmp_path):
    log_file = tmp_path / "rel" / "train.log"
    with captured_output(log_file):
        print("printed line")
        os.write(1, b"fd one\n")
        os.write(2, b"fd two\n")
        logging.getLogger("dr_train").info("a log record")
    print("after the block")                                         # back on the real stdout
    text = log_file.read_text()
    assert all(s in text for s in ("printed line", "fd one", "fd two", "a log record"))
    assert "after the block" not in text
    assert records.log_tail(log_file, lines=2).splitlines()[-1].endswith("a log record")


def test_results_files(tmp_path):
    storage = tmp_path / "runs"
    _metrics(storage / "hugging", range(1, 13), seconds=0.25)
    lora = storage / "hugging" / "lora" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"x")
    (storage / "kicking").mkdir()
    (storage / "kicking" / "train.log").write_text("start\rprogress 50%\rprogress 100%\nValueError: no | data\n")
    ok = results.from_storage(storage / "hugging", "hugging", "finished", 12)
    assert (ok.steps, ok.loss, ok.loss_rec, ok.loss_rcl, ok.lora) == (12, 13.0, 7.0, 0.5, str(lora))
    assert ok.loss_rec_mean10 == pytest.approx(sum(1 + s / 2 for s in range(3, 13)) / 10)
    assert ok.sec_per_step == 0.25
    bad = results.from_storage(storage / "kicking", "kicking", "failed", 12)
    bad.error = "ValueError: no | data"
    bad.log_tail = records.log_tail(storage / "kicking" / "train.log")
    assert bad.log_tail.splitlines()[0] == "progress 100%"
    rows = [ok, bad]
    results.write_csv(rows, storage / "results.csv")
    with (storage / "results.csv").open() as f:
        read = list(csv.DictReader(f))
    assert [r["relation"] for r in read] == ["hugging", "kicking"] and read[1]["error"] == bad.error
    assert read[0]["steps"] == "12" and float(read[0]["loss"]) == 13.0 and read[1]["loss"] == ""
    assert read_history([storage / "results.csv"]) == {"hugging": 0.25}
    md = results.write_markdown(rows, storage / "results.md", "t", ["note"]).read_text()
    assert "| hugging | finished | 12/12 |" in md and "ValueError: no \\| data" in md
    assert "## Failures" in md and "progress 100%" in md
    assert "hugging" in results.format_table(rows).splitlines()[2]
    assert results.plot_loss_curves(storage, rows, storage / "curves.png").stat().st_size > 0
    assert results.plot_loss_curves(storage, [bad], storage / "none.png") is None


def test_progress_table_plain(tmp_path):
    out = io.StringIO()
    prog = progress_mod.Progress(tmp_path, "run1", ["a", "b"], total_steps=10, mode="plain", out=out)
    prog.refresh()
    first = out.getvalue()
    assert "2 queued" in first and "\na         queued  0/10" in first
    records.start_attempt(tmp_path / "a", "run1")
    _metrics(tmp_path / "a", range(1, 5), seconds=0.5)
    prog.refresh()
    assert "a: running (4/10, loss 5" in out.getvalue()
    assert prog.rows["a"].eta_seconds == pytest.approx(3.0)
    records.start_attempt(tmp_path / "a", "run1")                    # a restart
    prog.refresh()
    assert "retries 1" in out.getvalue().splitlines()[-1]
    prog.set_state("b", "failed")
    prog.close()
    assert out.getvalue().splitlines()[-1].startswith("[") and "b: failed" in out.getvalue()
    assert prog.text().splitlines()[0].startswith("run run1: 1 running, 1 failed")


def test_cli_usage_errors_before_any_cluster(tmp_path):
    script = str(REPO / "launch" / "ray_submit.py")
    finished = tmp_path / "s" / "handshaking"
    finished.mkdir(parents=True)
    (finished / "DONE.json").write_text(json.dumps({"relation": "handshaking", "steps": 4, "base": "synth:0000"}))
    for args, msg in ([["--gpus-per-relation", "1.5"], "whole number"],
                      [["--relations", "moonwalking"], "unknown relation(s) moonwalking"],
                      [["--set", "train.max_steps=0"], "train.max_steps must be >= 1"],
                      [["--set", "train.resume_from=step-4"], "not on a Ray submission"],
                      [["--relations", "handshaking", "--set", "model.preset=tiny"],
                       "handshaking/DONE.json was made on base synth:0000, but model.preset 'tiny' is base tiny"]):
        proc = subprocess.run([sys.executable, script, "--storage", str(tmp_path / "s"), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    assert "--max-concurrent" in help_text and "--gpus-per-relation" in help_text
