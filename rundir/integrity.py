"""Whether a stage record can be trusted before anything is decided from it.

Two checks every record reader (:func:`rundir.records.read_record`) makes: the record's bytes
against the sha256 the run's manifest lists for it (written with the record, see
:func:`rundir.artifacts.note_record`), and every interval ``*_ci`` in it ordered low to high.
The frontier's cached measurements are checked for the second too. Pure checks: the readers word
the refusal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rundir.artifacts import listed_records, sha256_bytes


def differs_from_manifest(run: Path, path: Path, raw: bytes) -> bool:
    """True when the manifest of ``run`` lists ``path`` with another sha256 or size than ``raw``'s.

    A record the manifest does not list (a run written before record hashes, a stage folder
    copied from another run) does not differ; :func:`rundir.records.verify_records`, for
    readers that draw a verdict, refuses it.
    """
    entry = (listed_records(run) or {}).get(str(Path(path).relative_to(run)))
    if entry is None:
        return False
    return len(raw) != entry.get("bytes") or sha256_bytes(raw) != entry.get("sha256")


def reversed_interval(data: Any, where: str) -> str | None:
    """The dotted key and value (``metrics.models.finetuned.fd_ratio_ci is [2, 1]``) of the first
    interval under ``data`` (any ``*_ci`` holding [low, high]) whose low end is above its high end,
    else None. ``where``: the dotted name of ``data`` itself."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key.endswith("_ci") and _is_pair(value) and value[0] > value[1]:
                return f"{where}.{key} is [{value[0]:g}, {value[1]:g}]"
            found = reversed_interval(value, f"{where}.{key}")
            if found:
                return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found = reversed_interval(value, f"{where}[{i}]")
            if found:
                return found
    return None


def _is_pair(value: Any) -> bool:
    """Two finite numbers (a NaN end, e.g. of an unmeasured figure, is no interval to order)."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
