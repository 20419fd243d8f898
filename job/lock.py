"""One writer per run directory: an flock on <run>/.lock, released by the kernel when the holder dies,
so a crashed or killed job never leaves a stale lock behind."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from .errors import RunLocked
from .paths import RunPaths


class RunLock:
    def __init__(self, paths: RunPaths):
        self.paths, self.fd = paths, None

    def acquire(self) -> "RunLock":
        self.paths.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = holder_info(self.paths)
            who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder else "another job"
            raise RunLocked(f"run directory {self.paths.root} is in use by {who}; wait for it to finish, "
                            "or point this job at another spec name / output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def holder_info(paths: RunPaths) -> dict:
    try:
        return json.loads(paths.lock.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def is_held(paths: RunPaths) -> bool:
    """True while a live process holds the lock (checked by trying to take it, never by pid files)."""
    if not paths.lock.exists():
        return False
    fd = os.open(paths.lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
