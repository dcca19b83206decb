"""Compare the deterministic artifacts of two run directories byte for byte (sha256).

    python scripts/compare_runs.py REF_RUN OTHER_RUN

Compares every file of the prune, finetune, samples and export stages (records and
training checkpoints left out: they hold timings and paths), prints same/DIFF per file,
the step the other run's finetune resumed from, and exits 1 if any file differs.
Used by kill_resume_check.sh and interrupt_check.sh.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DETERMINISTIC_STAGES = ("prune", "finetune", "samples", "export")


def digest(path: Path) -> str | None:
    """sha256 of a file, None if it is missing."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def main(ref: Path, other: Path) -> int:
    """Print the comparison; 1 if any deterministic artifact differs."""
    record = other / "finetune" / "record.json"
    if record.is_file():
        print("finetune resumed from step:", json.loads(record.read_text())["metrics"]["resumed_from"])
    same = diff = 0
    for path in sorted(ref.rglob("*")):
        rel = path.relative_to(ref)
        if not path.is_file() or rel.parts[0] not in DETERMINISTIC_STAGES:
            continue
        if "checkpoints" in rel.parts or path.name == "record.json":
            continue
        equal = digest(path) == digest(other / rel)
        print(f"{'same' if equal else 'DIFF'}  {rel}")
        same, diff = same + equal, diff + (not equal)
    print(f"{same} identical, {diff} different deterministic artifacts")
    return 1 if diff else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python scripts/compare_runs.py REF_RUN OTHER_RUN", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
