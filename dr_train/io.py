"""Small file helpers used across the package: atomic writes (a reader never sees half a file), reading a JSON file
with errors that name it, a file's sha256, and cutting a metrics log back to a resumed step."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`, `.<name>.tmp-<pid><suffix>`, to write (a file or a folder); when the
    block ends without an exception it is renamed over `path` (os.replace), when it raises it is removed. `suffix`
    ends the temporary name, for writers that add their own (np.savez appends .npz to a name without it). The
    folder of `path` must exist; a folder replaces only a missing or empty one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file renamed over it; returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_json(path: str | os.PathLike, what: str = "", missing: str = "") -> Any:
    """The JSON value in `path`, or a ValueError naming the file: `[<what> ]<path> is missing[: <missing>]` when it
    is not a file, `[<what> ]<path> is not valid JSON: <error>` when it does not parse. `what` says what the file is
    ("dataset manifest"), `missing` what to do about a missing one."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise ValueError(f"{name} is missing: {missing}" if missing else f"{name} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the lines of a metrics.jsonl whose "step" is <= `step` (a resume redoes the later steps); a line torn
    by a crash mid-write is dropped."""
    path = Path(path)
    if not path.is_file():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return math.inf

    kept = [line for line in path.read_text().splitlines() if step_of(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
