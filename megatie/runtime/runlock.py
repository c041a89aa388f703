"""One run per run directory.

Two runs writing one out-dir would interleave their metrics and overwrite each other's
checkpoints. The first takes ``OUT_DIR/.megatie.lock`` (created exclusively, holding its pid, host
and process start time); a second run exits at once with one line naming the holder. A lock left
by a killed run is recognised - same host, and that pid no longer runs or is now another process
(its start time differs) - and taken over. A lock from another host cannot be checked from here:
the message says to delete it if that run is gone. Plain Python, no torch: it is taken before the
heavy imports.
"""

from __future__ import annotations

import json
import os
import socket
import time

from megatie.errors import ConfigError

LOCK_NAME = ".megatie.lock"


class RunLockedError(ConfigError):
    """Another live run holds the run directory."""


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart;
    None when it is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


class RunLock:
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid()),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self) -> "RunLock":
        for _ in range(3):  # a stale lock removed by a racing run: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._is_stale(holder):
                    raise RunLockedError(self._busy_message(holder)) from None
                self._remove_stale(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.mine, f)
            self.held = True
            return self
        raise RunLockedError(f"could not take the run lock {self.path!r}: another run keeps taking it")

    def release(self) -> None:
        if self.held and self._holder() == self.mine:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: written by a run killed mid-write (the write is a few bytes)

    def _is_stale(self, holder: dict) -> bool:
        if not holder:
            return self._old_enough()
        if holder.get("host") != self.mine["host"]:
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return True
        return holder.get("start") is not None and process_start_time(pid) != holder.get("start")

    def _old_enough(self) -> bool:
        """An empty or garbled lock is stale only once no writer can still be filling it."""
        try:
            return time.time() - os.path.getmtime(self.path) > 10
        except OSError:
            return True

    def _remove_stale(self, holder: dict | None) -> None:
        if holder is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _busy_message(self, holder: dict) -> str:
        if not holder:
            return (f"{os.path.dirname(self.path)!r} is locked by a run that is starting ({self.path}); use "
                    "another --out-dir")
        where = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
        if holder.get("host") != self.mine["host"]:
            return (f"{os.path.dirname(self.path)!r} is in use by {where} (another host: megatie cannot check "
                    f"it); use another --out-dir, or delete {self.path} if that run has ended")
        return f"{os.path.dirname(self.path)!r} is in use by a running training run ({where}); use another --out-dir"
