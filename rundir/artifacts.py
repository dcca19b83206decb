"""Run-directory artifacts: atomic writes, hashes and the verified manifest.

``RUN/manifest.json`` lists every artifact a stage wrote with its size, sha256, the
stage and the config sections that produced it, and library versions; under ``records``, the
sha256 and size of every stage record (``RUN/<stage>/record.json``) as written. Loaders of ONNX
files and engines call :func:`verify_against_manifest` before parsing a file, so a
tampered or truncated artifact is refused before any parser touches it; the record readers
(:mod:`rundir.records`) check a record against its hash before trusting what it says.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from compressor.errors import ArtifactError
from rundir import layout

MANIFEST = layout.MANIFEST
BOOKKEEPING = {layout.MANIFEST, layout.RUN_FILE, layout.LOCK_FILE, layout.SWEEP_CELL}


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory (a file already read, e.g. an engine about to be deserialised)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}


def artifact_matches(path: Path, entry: dict) -> bool:
    """True when ``path`` exists with the recorded ``bytes`` and ``sha256`` of ``entry``.

    Hashes are memoised per process on (path, size, mtime), so the many stages of one run
    that check the same upstream files hash each of them once.
    """
    path = Path(path)
    if not path.is_file():
        return False
    st = path.stat()
    if st.st_size != entry["bytes"]:
        return False
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key] == entry["sha256"]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temporary file, fsynced, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def find_run_dir(path: Path) -> Path | None:
    """The run directory holding ``path`` (the nearest parent with a run.json), if any."""
    for parent in Path(path).resolve().parents:
        if layout.run_file(parent).is_file():
            return parent
    return None


def read_manifest(run_dir: Path) -> dict:
    """``RUN/manifest.json`` (empty when the run has none yet)."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return {"artifacts": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"{path} is damaged; rerun the pipeline to rewrite it") from None


def note_record(run_dir: Path, record: Path) -> None:
    """List ``record`` (a stage record just written) in the manifest's ``records`` with its sha256.

    The first time a manifest lists records (a run written before record hashes), the records
    already in the run are listed as they are: the readers then refuse any later edit of them.
    """
    manifest = read_manifest(run_dir)
    listed = manifest.get("records")
    if not isinstance(listed, dict):
        found = sorted(run_dir.glob(f"*/{layout.RECORD}"))
        listed = {str(p.relative_to(run_dir)): _size_and_hash(p) for p in found}
    listed[str(Path(record).relative_to(run_dir))] = _size_and_hash(Path(record))
    manifest["records"] = dict(sorted(listed.items()))
    write_json(layout.manifest_path(run_dir), manifest)


def listed_records(run_dir: Path) -> dict[str, dict] | None:
    """The manifest's ``records`` (relative path -> sha256, bytes); None for a run written before
    record hashes (or without a manifest), whose records cannot be verified."""
    listed = read_manifest(run_dir).get("records")
    return listed if isinstance(listed, dict) else None


def _size_and_hash(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_against_manifest(path: Path) -> None:
    """Refuse ``path`` if the manifest of its run lists it with another hash or size.

    Files outside a run directory, or not (yet) in its manifest, pass unchecked.
    """
    run_dir = find_run_dir(path)
    if run_dir is None:
        return
    entry = read_manifest(run_dir)["artifacts"].get(str(Path(path).resolve().relative_to(run_dir.resolve())))
    if entry is None:
        return
    if not Path(path).is_file():
        raise ArtifactError(
            f"{path} is listed in {run_dir / MANIFEST} but missing; rerun its stage ({entry['stage']})"
        )
    if not artifact_matches(path, entry):
        raise ArtifactError(
            f"{path} differs from {run_dir / MANIFEST} (tampered or truncated); "
            f"rerun its stage with --force {entry['stage']}"
        )


def verify_run(run_dir: Path) -> dict[str, list[str]]:
    """Re-hash every artifact and stage record of a run: missing, changed and extra files (relative
    paths; records are listed when the manifest has their hashes)."""
    manifest = read_manifest(run_dir)["artifacts"]
    missing, changed = [], []
    for rel, entry in sorted({**manifest, **(listed_records(run_dir) or {})}.items()):
        if not (run_dir / rel).is_file():
            missing.append(rel)
        elif not artifact_matches(run_dir / rel, entry):
            changed.append(rel)
    extra = []
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        if not path.is_file() or rel in manifest or path.name in BOOKKEEPING or path.name == "record.json":
            continue
        nested = rel.startswith(f"{layout.ABLATION}/")
        cache = path.relative_to(run_dir).parts[0] == layout.ENCODED  # checked by its own index
        if layout.CHECKPOINTS in path.parts or layout.is_temporary(path) or nested or cache:
            continue  # training state, caches, interrupted writes and nested ablation runs are not artifacts
        extra.append(rel)
    return {"missing": missing, "changed": changed, "extra": extra}
