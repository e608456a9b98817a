"""What every benchmark records beside its numbers: the code's git hash and the device, and the CSV it appends to."""
from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_hash() -> str:
    """Short HEAD hash, '+dirty' when tracked files have changes; $DR_GIT_HASH where the copy has no .git (a GPU
    machine that received the working tree only)."""
    if os.environ.get("DR_GIT_HASH"):
        return os.environ["DR_GIT_HASH"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def append_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Append rows (a header first when the file is new); columns default to the first row's keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
