"""An exclusive lock on a run folder, held by one training process for the run's life.

The lock is `fcntl.flock` on an open lock file: the kernel releases it when the holder's process dies, however it
dies, so a crashed run or a killed Ray attempt never blocks the next one. The file records the holder (host, pid,
start time) for the message a refused process prints; it is removed on a clean release, so a lock file found
with no process holding its flock is the record of a holder that died, and is taken over with a log line.

On a filesystem without flock (some network and FUSE mounts) the file itself is the lock, created exclusively;
a holder on this host whose pid is gone is stale and taken over; one on another host cannot be checked from here,
and the message names the file to delete once that process is known to be gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("dr_train")

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """`RunLock.acquire(path)` or a ValueError naming the holder; `release()` (or the `with` block's end) frees
    it. One holder at a time, also within one process (a second acquire on a held path is refused)."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, path: str | os.PathLike, what: str = "", wait_seconds: float = 0.0) -> "RunLock":
        """Lock `path` (its folder must exist), waiting up to `wait_seconds` for a holder to let go; `what` names
        the locked thing in the refusal ("relation folder runs/x/hugging")."""
        path = Path(path)
        deadline, told = time.monotonic() + wait_seconds, False
        while True:
            try:
                lock, holder, flocked = *cls._try_flock(path), True
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                lock, holder, flocked = *cls._try_exclusive_file(path), False
            if lock is not None:
                return lock
            if time.monotonic() >= deadline:
                raise ValueError(_refusal(path, what, holder, flocked))
            if not told:
                log.info("%s is held by %s; waiting up to %.0f s for it", path, _describe(holder), wait_seconds)
                told = True
            time.sleep(0.2)

    @classmethod
    def _try_flock(cls, path: Path) -> tuple["RunLock | None", dict]:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                return None, holder
            except OSError:
                os.close(fd)
                raise
            if _same_file(fd, path):
                break
            os.close(fd)            # the holder released (and removed) the file between our open and flock
        previous = _parse(os.pread(fd, 4096, 0))
        if previous:
            log.warning("%s: taking over the lock of %s, whose process is gone", path, _describe(previous))
        lock = cls(path, fd)
        lock._record()
        return lock, {}

    @classmethod
    def _try_exclusive_file(cls, path: Path) -> tuple["RunLock | None", dict]:
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _parse(_read_bytes(path))
                if not _dead_here(holder):
                    return None, holder
                log.warning("%s: taking over the lock of %s, whose process is gone", path, _describe(holder))
                path.unlink(missing_ok=True)
                continue
            lock = cls(path, fd)
            lock._record()
            return lock, {}
        return None, _parse(_read_bytes(path))

    def _record(self) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Remove the lock file, then let go (a process waiting on the removed file finds it gone and retries)."""
        if self.fd < 0:
            return
        if _same_file(self.fd, self.path):     # not a file someone put in its place after removing ours
            self.path.unlink(missing_ok=True)
        os.close(self.fd)           # closing the last descriptor releases the flock
        self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()[:4096]
    except FileNotFoundError:
        return b""


def _parse(data: bytes) -> dict:
    """The holder a lock file records, {} when it records none (just created, or not ours)."""
    try:
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) and "pid" in holder else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # alive, owned by another user
        return True
    return True


def _dead_here(holder: dict) -> bool:
    """A recorded holder on this host whose process no longer exists (only these are known to be stale)."""
    return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            and not _pid_alive(holder["pid"]))


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    own = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
    return (f"host {holder.get('host')}, pid {holder.get('pid')}{' [this process]' if own else ''}, "
            f"since {holder.get('since', '?')}")


def _refusal(path: Path, what: str, holder: dict, flocked: bool) -> str:
    message = f"{what or path.parent} is in use by another training run ({_describe(holder)}; lock file {path})"
    if flocked or holder.get("host") == socket.gethostname():
        return message + ": wait for it to finish or stop it"
    return message + ": wait for it to finish or stop it; if that process is gone, delete the lock file"
