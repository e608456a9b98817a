import json
import os
import subprocess
import sys

from conftest import REPO


def test_train_two_relations_from_the_command_line(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--relations", "handshaking,hugging",
           "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "3", "--seed", "1",
           "--set", "data.videos_per_relation=5", "--set", "model.preset=tiny"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the overall bar (both relations' steps, with a rate) stays; the per-relation bars name their place
    assert "12/12" in proc.stderr and ("step/s" in proc.stderr or "s/step" in proc.stderr)
    assert "[1/2] handshaking" in proc.stderr and "[2/2] hugging" in proc.stderr
    for rel in ("handshaking", "hugging"):
        rows = [json.loads(l) for l in (out / rel / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7))
        assert sorted(p.name for p in (out / rel / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
        assert (out / rel / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert [r["relation"] for r in json.loads(proc.stdout)] == ["handshaking", "hugging"]
    # the default data: synthetic clips rendered, ingested and sharded on first use, under the working directory
    datasets = list((tmp_path / ".cache" / "dr_train").glob("synthetic-*/manifest.json"))
    assert len(datasets) == 1
    manifest = json.loads(datasets[0].read_text())
    assert {r: v["samples"] for r, v in manifest["relations"].items()} == {"handshaking": 5, "hugging": 5}


def test_user_errors_are_reported_without_a_traceback(tmp_path):
    for args, msg in ([["--relations", "moonwalking"], "unknown relation(s) moonwalking"],
                      [["--set", "loss.mode=weird"], "loss.mode must be"],
                      [["--config", str(tmp_path / "missing.yaml")], "does not exist"]):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--output-dir",
                               str(tmp_path / "o"), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
