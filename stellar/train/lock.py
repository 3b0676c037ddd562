"""One live run per run directory: ``DIR/.lock`` names the process that holds it.

    with RunLock(run_dir):           # raises RunLockedError naming the live run's pid and host
        ...                          # train

The lock file is created with O_CREAT | O_EXCL (atomic, also on NFS v3+) and holds JSON: pid,
host, the process's start time (Linux ``/proc``), torchrun's run id and restart count. Rank 0
takes it for the whole run, on one process or many; it is removed at the end.

A lock left by a process that is gone is *stale* and is taken over (with a warning):
- same host, and no process with that pid (or one with another start time: the pid was reused);
- a previous attempt of the same torchrun job (same ``--rdzv-id``, not ``none``, lower restart
  count): torchrun stops every worker before it restarts them, wherever rank 0 now runs.
A lock held from another host cannot be checked from here: the error says so and asks to remove
the file by hand if that run is known to be dead.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from . import distributed

LOCK = ".lock"


class RunLockedError(FileExistsError):
    """The run directory is in use by a live run."""


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # someone else's process: alive
        return True
    return True


def _run_id() -> str | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if run_id in (None, "", "none") else run_id


def describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since', '?')})"


class RunLock:
    """The lock of ``run_dir``; ``acquire`` raises ``RunLockedError`` while a live run holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": distributed.host(), "start_time": _start_time(os.getpid()),
                "run_id": _run_id(), "restart": distributed.restart_count(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def read(self) -> dict | None:
        """The holder's record; {} for an unreadable file; None when there is no lock."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def holder_alive(self, info: dict) -> bool:
        """Whether the process named by ``info`` may still be running (unknowable hosts count as alive)."""
        if not info:                    # being written right now, or garbage: decided by its age
            try:
                return time.time() - self.path.stat().st_mtime < 10.0
            except FileNotFoundError:
                return False
        mine = self._mine()
        if info.get("run_id") and info["run_id"] == mine["run_id"] and int(info.get("restart", 0)) < mine["restart"]:
            return False                # an earlier attempt of this torchrun job: torchrun stopped it
        if info.get("host") != mine["host"]:
            return True
        pid = int(info.get("pid", -1))
        if pid == os.getpid():
            return True
        if not _pid_alive(pid):
            return False
        recorded = info.get("start_time")
        return recorded is None or _start_time(pid) in (None, recorded)

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.read()
                if info is None:
                    continue            # released meanwhile: try again
                if self.holder_alive(info):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by a live run: {describe(info)}. Wait for it, stop it, "
                        f"or choose another --out. If that run is dead (e.g. on another host), delete {self.path}.")
                self._take_over(info)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._mine(), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunLockedError(f"could not take {self.path}: other processes keep taking it")

    def _take_over(self, info: dict) -> None:
        """Move a stale lock aside (``rename`` is atomic: of two processes only one wins) and drop it."""
        aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        warnings.warn(f"{self.path}: took over the stale lock of {describe(info) if info else 'an unknown process'}, "
                      f"which is no longer running", RuntimeWarning, stacklevel=3)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = self.read()
        if info and info.get("pid") == os.getpid() and info.get("host") == distributed.host():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
