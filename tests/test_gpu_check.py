"""perf/gpu_check.sh cannot rot between GPU windows: its dry mode runs every step on the CPU at toy sizes."""
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_runs_every_step_and_writes_its_results(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "perf/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line for line in (out / "summary.txt").read_text().splitlines() if line.strip()}
    for step in ("env", "kernels", "bench", "profile-ckpt", "memory-24gb"):
        assert step in lines, f"step {step} missing from the summary:\n{proc.stdout[-2000:]}"
        assert lines[step].split()[1] == "ok", lines[step] + "\n" + (out / f"{step}.log").read_text()[-2000:]
    env_report = json.loads((out / "env.json").read_text())
    assert env_report["gpu"] == {"cuda": False} and env_report["packages"]["diffusers"][0].isdigit()
    assert (out / "bench_kernels.csv").read_text().count("\n") >= 2
    profiles = [json.loads(p.read_text()) for p in sorted(out.glob("profile_step_mochi_*.json"))]
    assert len(profiles) == 2 and all(p["status"] == "ok" for p in profiles)
    capped = [p for p in profiles if p["config"]["memory_cap"]]
    assert len(capped) == 1 and capped[0]["config"]["memory_cap"]["GiB"] == 24
    assert not capped[0]["config"]["memory_cap"]["enforced"]     # no CUDA here: recorded, not enforced


def test_unknown_option_is_refused_with_a_message():
    proc = subprocess.run(["bash", "perf/gpu_check.sh", "--bogus"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


def test_dry_run_of_the_pretrain_step_exports_a_base_and_keeps_its_curves(tmp_path):
    """`--only pretrain` (not in the default steps): the synth recipe through launch/pretrain_base.py at toy sizes
    on the CPU, its curves and checks copied into the results, the base's weights split out for $OUT."""
    out, back = tmp_path / "results", tmp_path / "back"
    back.mkdir()
    env = {**os.environ, "OUT": str(back), "PRETRAIN_RUN": str(tmp_path / "run")}
    proc = subprocess.run(["bash", "perf/gpu_check.sh", "--dry-run", "--only", "pretrain", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in (out / "summary.txt").read_text().splitlines() if line.startswith("pretrain"))
    assert line.split()[1] == "ok", line + "\n" + (out / "pretrain.log").read_text()[-3000:]
    assert json.loads((out / "pretrain" / "checks.json").read_text())["subject_fidelity_generic"]["videos"] == 2
    for stage in ("vae", "transformer", "decoder"):
        assert (out / "pretrain" / f"{stage}_metrics.jsonl").stat().st_size > 0, stage
    assert sorted(p.name for p in back.iterdir()) == ["base.tar.gz", "base_transformer.safetensors",
                                                      "base_vae.safetensors", "results.tar.gz", "summary.txt"]
