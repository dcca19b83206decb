"""One writer per run directory: an advisory lock on ``RUN/.lock``.

The lock is an ``flock`` held on the open file for as long as the process writes into the
run, so the kernel drops it when the process dies, however it dies. The file also records
who holds it (pid, start time, host, command) for the message a second writer gets; a file
left behind by a killed process is taken over with a note. Read-only commands (``check``,
``verify``, ``sample``) do not take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from compressor.errors import UserError
from rundir import layout

_HELD: dict[str, int] = {}  # lock file -> how many holders of this process are inside it


class RunLock:
    """``with RunLock(run_dir, command):`` - raises UserError while another live process holds it."""

    def __init__(self, run_dir: Path, command: str) -> None:
        self.path = layout.lock_path(run_dir)
        self.command = command
        self.fd: int | None = None
        self.nested = False  # this process held the lock already: entering and leaving change nothing

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the live holder; re-entrant within a process
        (the sweep around a run holds it while the run's stages take it again)."""
        key = str(self.path.resolve())
        if _HELD.get(key):
            _HELD[key] += 1
            self.nested = True
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise UserError(
                    f"run directory {self.path.parent} is in use by pid {holder.get('pid', '?')} "
                    f"(started {holder.get('started', '?')}, `{holder.get('command', '?')}`); "
                    "wait for it or pass another --run-dir"
                ) from None
            # the file may have been removed and recreated between open and flock: retry on the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read(fd)
        if stale.get("pid") and stale.get("pid") != os.getpid():
            print(
                f"note: taking over the lock of {self.path.parent} left by pid {stale['pid']} "
                f"(started {stale.get('started', '?')}), which is no longer running",
                file=sys.stderr,
            )
        info = {
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": socket.gethostname(),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        _HELD[key] = 1

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing is left in the run directory); a nested
        holder only steps out."""
        key = str(self.path.resolve())
        if self.nested:
            _HELD[key] -= 1
            self.nested = False
            return
        if self.fd is None:
            return
        _HELD.pop(key, None)
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
