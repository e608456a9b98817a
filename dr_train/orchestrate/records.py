"""The run's files on shared storage, read and written in one place (the driver never imports torch).

    <storage>/run.json                      the latest submission: run id, Ray options, resources, config
    <storage>/results.csv, results.md       the results table (rewritten at the end of every submission)
    <storage>/loss_curves.png               every relation's loss curve
    <storage>/_ray_train/                   Ray Train's own state (multi-rank relations only)
    <storage>/<relation>/                   the trainer's output folder (train.output_dir = <storage>):
        metrics.jsonl, checkpoints/, lora/, loss_curve.png, DONE.json, config.json   written by the trainer
        train.log            stdout, stderr and log records of every attempt (rank 0; other ranks
                             train.rank<N>.log), each attempt opened by a header line
        attempts.jsonl       one JSON event per attempt start and end: run id, attempt, pid, host, time
        app_error.json       an application error of a multi-rank attempt (so the restart does not repeat it)
        result.json          the relation's row of the results table (kept for re-submissions)
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import time
from pathlib import Path

from dr_train.base_identity import describe_mismatch
from dr_train.io import atomic_write_text
from dr_train.run_folder import RelationFolder

_STEP_DIR = re.compile(r"^step-(\d{8})$")            # dr_train.checkpoint's naming


def relation_dir(storage: Path, relation: str) -> Path:
    return Path(storage) / relation


def finished_steps(rel_dir: Path) -> int | None:
    """The steps a finished relation was trained for (the trainer writes DONE.json last), None if unfinished."""
    path = RelationFolder(Path(rel_dir)).done
    if not path.is_file():
        return None
    done = read_json(path)
    if not isinstance(done, dict) or not isinstance(done.get("steps"), int):
        raise ValueError(f"{path} is not a finished relation's record (no integer 'steps')")
    return done["steps"]


def finished_base_mismatch(rel_dir: Path, preset: str, base: str) -> str | None:
    """The line saying that a finished relation was trained on another base than `base` (dr_train.base_identity),
    from its DONE.json; None when it was not, is unfinished, or finished before runs recorded their base."""
    path = RelationFolder(Path(rel_dir)).done
    done = read_json(path) if path.is_file() else None
    recorded = done.get("base") if isinstance(done, dict) else None
    return describe_mismatch(str(path), recorded, preset, base) if recorded not in (None, base) else None


def check_finished_base(rel_dir: Path, preset: str, base: str) -> None:
    """A ValueError saying how to go on where a finished relation was trained on another base (its LoRA belongs to
    that base); nothing in the folder is removed."""
    mismatch = finished_base_mismatch(rel_dir, preset, base)
    if mismatch:
        raise ValueError(f"{mismatch}: choose another train.output_dir (--output-dir), or remove {Path(rel_dir)} to "
                         f"train it again")


def is_finished(rel_dir: Path, max_steps: int = 0) -> bool:
    """Finished with at least `max_steps` steps: skipped on re-submission (one trained for fewer is extended)."""
    steps = finished_steps(rel_dir)
    return steps is not None and steps >= max_steps


def latest_checkpoint_step(rel_dir: Path) -> int:
    """Step of the newest complete checkpoint (a step folder with its manifest), 0 when none."""
    folder = RelationFolder(rel_dir).checkpoints
    if not folder.is_dir():
        return 0
    steps = [int(m.group(1)) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "manifest.json").is_file()]
    return max(steps, default=0)


def read_jsonl(path: Path) -> list[dict]:
    """Complete JSON lines of a file being appended to (a torn last line is left out)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def median_step_seconds(rel_dir: Path) -> float | None:
    seconds = [r["seconds"] for r in read_jsonl(RelationFolder(rel_dir).metrics) if r.get("seconds")]
    return statistics.median(seconds) if seconds else None


# ---- attempts -------------------------------------------------------------------------------------------------
def append_event(rel_dir: Path, event: dict) -> None:
    """Append one line to attempts.jsonl (a single write of one line; appends do not interleave)."""
    rel_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(event) + "\n"
    fd = os.open(rel_dir / "attempts.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def run_events(rel_dir: Path, run_id: str) -> list[dict]:
    return [e for e in read_jsonl(rel_dir / "attempts.jsonl") if e.get("run_id") == run_id]


def start_attempt(rel_dir: Path, run_id: str, **extra) -> int:
    """Record that an attempt of this run starts in this process; returns its number (1 = first)."""
    attempt = sum(e.get("event") == "start" for e in run_events(rel_dir, run_id)) + 1
    append_event(rel_dir, {"event": "start", "run_id": run_id, "attempt": attempt, "pid": os.getpid(),
                           "host": socket.gethostname(), "time": time.time(), **extra})
    return attempt


def end_attempt(rel_dir: Path, run_id: str, attempt: int, status: str, error: str = "") -> None:
    append_event(rel_dir, {"event": "end", "run_id": run_id, "attempt": attempt, "pid": os.getpid(),
                           "time": time.time(), "status": status, "error": error})


def attempt_summary(rel_dir: Path, run_id: str) -> dict:
    """attempts (started in this run), first start time, last start time, pid of the last attempt."""
    starts = [e for e in run_events(rel_dir, run_id) if e.get("event") == "start"]
    return {"attempts": len(starts), "first_start": starts[0]["time"] if starts else None,
            "last_start": starts[-1]["time"] if starts else None, "pid": starts[-1]["pid"] if starts else None,
            "host": starts[-1].get("host") if starts else None}


# ---- application errors of multi-rank attempts -----------------------------------------------------------------
def write_app_error(rel_dir: Path, run_id: str, error_type: str, message: str, traceback_text: str) -> None:
    write_json(rel_dir / "app_error.json", {"run_id": run_id, "error_type": error_type, "message": message,
                                            "traceback": traceback_text})


def read_app_error(rel_dir: Path, run_id: str) -> tuple[str, str] | None:
    """(type, message) of the application error an attempt of this run hit, or None (an error of an earlier
    submission does not count)."""
    data = read_json(rel_dir / "app_error.json")
    if not data or data.get("run_id") != run_id:
        return None
    return str(data.get("error_type", "Error")), str(data.get("message", ""))


# ---- logs and results ------------------------------------------------------------------------------------------
def log_path(rel_dir: Path, rank: int = 0) -> Path:
    return rel_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log")


def log_tail(path: Path, lines: int = 25, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a log (progress-bar carriage returns resolved to their last state)."""
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode(errors="replace")
    out = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in out if line.strip()][-lines:])


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class MetricsTail:
    """Reads a metrics.jsonl incrementally: only the bytes appended since the last call, from the start again
    when the file shrank (a resume truncates it to the checkpoint's step)."""

    def __init__(self, path: Path, keep: int = 20):
        self.path, self.keep = Path(path), keep
        self._offset, self._pending = 0, b""
        self.last: dict | None = None
        self.recent: list[dict] = []         # the last `keep` rows, for the step-time estimate

    def poll(self) -> dict | None:
        """The newest complete row (None before the first step)."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return self.last
        if size < self._offset:
            self._offset, self._pending, self.last, self.recent = 0, b"", None, []
        if size == self._offset:
            return self.last
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        self._offset += len(chunk)
        data = self._pending + chunk
        *lines, self._pending = data.split(b"\n")
        for line in lines:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            self.last = row
            self.recent = (self.recent + [row])[-self.keep:]
        return self.last

    def seconds_per_step(self) -> float | None:
        secs = [r["seconds"] for r in self.recent if r.get("seconds")]
        return sum(secs) / len(secs) if secs else None
