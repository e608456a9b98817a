"""perf/bench_loader.py keeps running: a small run writes its CSV row with sensible numbers."""
import csv
import subprocess
import sys

from conftest import REPO


def test_loader_benchmark_writes_its_row(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "perf" / "bench_loader.py"), "--samples", "6", "--per-shard",
                           "3", "--batches", "4", "--workers", "0,1", "--step-seconds", "0.5", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "bench_loader.csv").open()))
    assert [int(r["workers"]) for r in rows] == [0, 1]
    for r in rows:
        assert float(r["loader_samples_per_s"]) > 0 and float(r["step_samples_per_s"]) == 2.0
        assert abs(float(r["loader_over_step"]) - float(r["loader_samples_per_s"]) / 2.0) < 0.02
