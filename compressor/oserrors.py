"""Operating-system failures (disk full, permissions, read-only disks, ...) as one-line user errors."""

from __future__ import annotations

import errno
import os
import re

ADVICE = {
    errno.ENOSPC: "free some space or pass another --run-dir",
    errno.EDQUOT: "free some space or pass another --run-dir",
    errno.EACCES: "fix the permissions or pass another --run-dir",
    errno.EPERM: "fix the permissions or pass another --run-dir",
    errno.EROFS: "that file system is read-only; pass another --run-dir",
    errno.ENAMETOOLONG: "use a shorter --run-dir (or shorter names)",
    errno.ENOENT: "check that the folder exists",
    errno.ENOTDIR: "a part of that path is a file, not a folder; pass another --run-dir",
    errno.EEXIST: "remove it or pass another --run-dir",
}


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError when it is one or wraps one (safetensors: ``... (os error 28)``)."""
    if isinstance(exc, OSError):
        return exc
    match = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", str(exc))
    if match:
        code = int(match.group(1) or match.group(2))
        return OSError(code, os.strerror(code))
    cause = exc.__cause__ or exc.__context__
    return as_os_error(cause) if cause is not None and cause is not exc else None


def describe(exc: OSError, where: str, resume: bool = True, verb: str = "write") -> str:
    """One line: what failed (the path), why, what to do."""
    path = exc.filename or where
    cause = exc.strerror or str(exc) or type(exc).__name__
    advice = ADVICE.get(exc.errno, "check the path and the disk")
    tail = ", then rerun the same command to resume" if resume else ""
    return f"cannot {verb} {path}: {cause}; {advice}{tail}"
