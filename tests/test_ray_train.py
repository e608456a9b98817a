"""Relations on 2 ranks each under Ray Train's TorchTrainer (gloo on CPU): the trainer reuses the process group
Ray Train set up, rank 0 writes the outputs, each rank logs to its own file; an application error on a rank stops
that relation (the restarted ranks find the recorded error and do not train again) while the other finishes.

One optimizer step only: the plain-torch engine's gradient all-reduce fails from the second multi-rank step on
(dr_train/distributed.py reuses one `timer.phase("comms")` context manager for every step; a trainer bug,
independent of Ray; torchrun shows the same).
"""
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SYNTHETIC_CACHE
from test_ray_run import broken_catalog

ray = pytest.importorskip("ray")


def test_two_ranks_per_relation_under_torch_trainer(tmp_path):
    from dr_train.catalog import load_catalog
    from dr_train.config import load_config
    from dr_train.data.sources import resolve_dataset

    cfg = load_config(None, ["model.preset=tiny", f"data.cache_dir={SYNTHETIC_CACHE}", "data.videos_per_relation=6"])
    dataset = resolve_dataset(cfg, [load_catalog()["handshaking"]])
    storage = tmp_path / "ranks"
    cmd = [sys.executable, str(REPO / "launch" / "ray_submit.py"), "--num-cpus", "2", "--storage", str(storage),
           "--relations", "handshaking,no_clips", "--workers-per-relation", "2", "--cpus-per-relation", "1",
           "--max-concurrent", "2", "--max-retries", "1", "--max-steps", "3", "--checkpoint-every", "2",
           "--deterministic", "--set", f"data.source={dataset}", "--set", "data.videos_per_relation=6",
           "--set", "model.preset=tiny",
           "--set", f"data.catalog={broken_catalog(tmp_path / 'catalog.yaml', ['handshaking'])}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    with (storage / "results.csv").open() as f:
        table = {r["relation"]: r for r in csv.DictReader(f)}
    ok, bad = table["handshaking"], table["no_clips"]
    assert (ok["status"], ok["steps"], ok["retries"]) == ("finished", "3", "0")
    done = json.loads((storage / "handshaking" / "DONE.json").read_text())
    assert done["world_size"] == 2 and os.path.isfile(ok["lora"])
    assert "===== handshaking" in (storage / "handshaking" / "train.rank1.log").read_text()
    assert [json.loads(l)["step"] for l in (storage / "handshaking" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert bad["status"] == "failed" and bad["error"].startswith(f"ValueError: dataset {dataset} has no samples of "
                                                                 f"no_clips")
    starts = [json.loads(l) for l in (storage / "no_clips" / "attempts.jsonl").read_text().splitlines()
              if '"start"' in l]
    assert len(starts) == 1 and starts[0]["ranks"] == 2                  # the restart did not train again
    log = (storage / "no_clips" / "train.log").read_text()
    assert log.count("Traceback (most recent call last)") == 1           # written once, not echoed by Ray's print
    assert "2 ranks (TorchTrainer)" in proc.stdout
