"""Bad situations around a relation's run folder: two trainers on one folder, a lock left by a dead process or by
a crashed run, a malformed checkpoint state.json, a damaged latest checkpoint."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_run, small_config
from dr_train import checkpoint as ckpt
from dr_train import run_lock
from dr_train.io import sha256_file
from dr_train.run_folder import RelationFolder
from dr_train.run_lock import RunLock
from dr_train.trainer import RelationRun, train

HOST = socket.gethostname()

SECOND_TRAINER = """
import sys
import dr_train.trainer as trainer
from dr_train.config import load_config
trainer.LOCK_WAIT_SECONDS = 0.5
try:
    trainer.train(load_config(sys.argv[1]))
except ValueError as e:
    print(e)
    sys.exit(2)
"""


def _steps(folder: RelationFolder) -> list[int]:
    return [json.loads(line)["step"] for line in folder.metrics.read_text().splitlines()]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_trainer_on_a_running_folder_is_refused_naming_the_holder(tmp_path, monkeypatch):
    """The second trainer (another process, with --resume) starts while the first is between steps 2 and 3."""
    cfg = small_config(tmp_path, **{"train.relations": "hugging", "train.max_steps": 4, "train.checkpoint_every": 2,
                                    "train.resume": True})
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    folder = RelationFolder.of(cfg.train.output_dir, "hugging")
    second = []
    original = RelationRun.train_step

    def step_then_start_a_second_trainer(self):
        record = original(self)
        if self.step == 2:
            second.append(subprocess.run([sys.executable, "-c", SECOND_TRAINER, str(config_file)], cwd=REPO,
                                         capture_output=True, text=True, timeout=180))
        return record

    monkeypatch.setattr(RelationRun, "train_step", step_then_start_a_second_trainer)
    train(cfg)
    refused = second[0]
    assert refused.returncode == 2, refused.stderr[-2000:]
    message = refused.stdout.strip().splitlines()[-1]
    assert f"relation folder {folder.path} is in use by another training run" in message
    assert f"host {HOST}, pid {os.getpid()}" in message and str(folder.lock) in message
    assert _steps(folder) == [1, 2, 3, 4]                    # every step once, in order: one writer
    assert json.loads(folder.done.read_text())["steps"] == 4
    assert not folder.lock.exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    lock_file = tmp_path / "train.lock"
    dead = _dead_pid()
    lock_file.write_text(json.dumps({"host": HOST, "pid": dead, "since": "2024-01-01 00:00:00"}))
    with caplog.at_level("WARNING", logger="dr_train"):
        lock = RunLock.acquire(lock_file)
    assert f"taking over the lock of host {HOST}, pid {dead}" in caplog.text
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()


def test_without_flock_a_dead_holder_on_this_host_is_stale_and_a_live_or_remote_one_is_not(tmp_path, monkeypatch,
                                                                                           caplog):
    """Filesystems without flock: the lock file's host and pid decide."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    lock_file = tmp_path / "train.lock"
    dead = _dead_pid()
    lock_file.write_text(json.dumps({"host": HOST, "pid": dead}))
    with caplog.at_level("WARNING", logger="dr_train"):
        lock = RunLock.acquire(lock_file)
    assert f"taking over the lock of host {HOST}, pid {dead}" in caplog.text
    with pytest.raises(ValueError, match=rf"in use by another training run \(host {HOST}, pid {os.getpid()} "
                                         rf"\[this process\]"):
        RunLock.acquire(lock_file)
    lock.release()
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": dead}))
    with pytest.raises(ValueError, match="host elsewhere.*if that process is gone, delete the lock file"):
        RunLock.acquire(lock_file)


def test_a_run_that_crashes_releases_its_lock_in_the_same_process(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, **{"train.relations": "hugging", "train.max_steps": 2})
    folder = RelationFolder.of(cfg.train.output_dir, "hugging")
    held = []

    def crash(self):
        held.append(json.loads(folder.lock.read_text()))
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(RelationRun, "train_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    assert held[0]["host"] == HOST and held[0]["pid"] == os.getpid()    # held while it ran
    assert not folder.lock.exists()
    RunLock.acquire(folder.lock).release()                              # and free now, in this very process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run with its step-2 checkpoint, and a RelationRun to resume it into."""
    tmp_path = tmp_path_factory.mktemp("trained")
    cfg = small_config(tmp_path, **{"train.relations": "kicking", "train.max_steps": 2})
    train(cfg)
    folder = RelationFolder.of(cfg.train.output_dir, "kicking")
    run = make_run(cfg, "kicking", tmp_path / "resumed")
    yield folder.checkpoints / "step-00000002", run
    run.close()


def _with_state(tmp_path: Path, source: Path, edit) -> Path:
    """A copy of checkpoint `source` whose state.json is `edit(state)`, with a manifest that matches it (so the
    defect is in the content, not a torn file)."""
    copy = tmp_path / "checkpoints" / source.name
    shutil.copytree(source, copy)
    state = json.loads((copy / "state.json").read_text())
    (copy / "state.json").write_text(json.dumps(edit(state)))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": sha256_file(copy / "state.json"),
                                       "bytes": (copy / "state.json").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit, problem", [
    (lambda s: {k: v for k, v in s.items() if k != "step"}, "has no 'step' entry"),
    (lambda s: s | {"step": "abc"}, "'step' is 'abc', not a whole number of steps"),
    (lambda s: s | {"step": 3}, "'step' is 3, but the folder is step-00000002"),
    (lambda s: {k: v for k, v in s.items() if k != "scheduler"}, "has no 'scheduler' entry"),
    (lambda s: {k: v for k, v in s.items() if k != "identity"}, "has no 'identity' entry"),
    (lambda s: s | {"scheduler": "abc"}, "checkpoint part scheduler cannot be restored from"),
    (lambda s: s | {"optimizer": {}}, "checkpoint part optimizer cannot be restored from .*KeyError"),
    (lambda s: [s], "holds a JSON list, not an object"),
], ids=["no-step", "step-abc", "step-mismatch", "no-scheduler", "no-identity", "bad-scheduler", "bad-optimizer",
        "not-an-object"])
def test_a_malformed_state_json_is_a_one_line_error_naming_the_file(trained, tmp_path, edit, problem):
    source, run = trained
    copy = _with_state(tmp_path, source, edit)
    with pytest.raises(ValueError) as e:
        run.resume(copy)
    message = str(e.value)
    assert "\n" not in message and str(copy / "state.json") in message
    assert e.match(problem)


def test_a_damaged_latest_checkpoint_names_an_older_one_that_resume_from_continues(tmp_path, monkeypatch, caplog):
    cfg = small_config(tmp_path, **{"train.relations": "hugging", "train.max_steps": 3,
                                    "train.checkpoint_every": 1, "train.keep_checkpoints": 3})
    folder = RelationFolder.of(cfg.train.output_dir, "hugging")
    original = RelationRun.train_step

    def crash_after_two(self):
        if self.step == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(RelationRun, "train_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(RelationRun, "train_step", original)
    first_row = folder.metrics.read_text().splitlines()[0]
    damaged = folder.checkpoints / "step-00000002" / "adapters.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))

    cfg.train.resume = True
    with pytest.raises(ValueError) as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert e.match(rf"{damaged} is corrupt.*the older checkpoint {folder.checkpoints / 'step-00000001'} verifies: "
                   rf"resume from it with --resume-from step-1")
    assert _steps(folder) == [1, 2]                                    # the refusal changed nothing

    cfg.train.resume_from = "step-1"
    with caplog.at_level("INFO", logger="dr_train"):
        train(cfg)
    assert "moved the later checkpoint step-00000002 aside" in caplog.text
    assert _steps(folder) == [1, 2, 3]                                 # steps 2-3 redone, none counted twice
    assert folder.metrics.read_text().splitlines()[0] == first_row
    assert [p.name for p in ckpt.list_checkpoints(folder.checkpoints)] == ["step-00000001", "step-00000002",
                                                                           "step-00000003"]
    kept = folder.checkpoints / "superseded" / "step-00000002" / "adapters.safetensors"
    assert kept.read_bytes() == bytes(data)                            # the damaged one is set aside, not deleted
    assert json.loads(folder.done.read_text())["steps"] == 3


def test_resume_from_names_an_existing_checkpoint_of_one_relation(tmp_path):
    cfg = small_config(tmp_path, **{"train.relations": "hugging,kicking"})
    cfg.train.resume_from = "step-1"
    with pytest.raises(ValueError, match="names a checkpoint of one relation, but 2 relations are selected"):
        train(cfg)
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no complete checkpoint step-2 \(complete checkpoints: step-4\)"):
        ckpt.find_checkpoint(tmp_path, "step-2")
    with pytest.raises(ValueError, match="'latest' is not of the form step-N"):
        ckpt.find_checkpoint(tmp_path, "latest")
    assert ckpt.find_checkpoint(tmp_path, "step-4") == ckpt.find_checkpoint(tmp_path, "4")
