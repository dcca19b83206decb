"""The light half of the sweep engine: cell folders, content-hash keys and keyed JSON records.

What makes every nested run of a sweep resumable, shared by the method ablation, the distillation
sweep and the frontier's measurements:

* :func:`slug`: one name -> folder rule for a sweep's settings (``RUN/ablation/<slug>/seed-<k>/``);
* :func:`key_of`: the content hash (:func:`compressor.digest.content_hash`) a cached result is
  filed under;
* :func:`cached`: a JSON record that counts only under its key (a changed key measures again),
  refused when it holds an interval whose low end is above its high end;
* :func:`stage_keys`: the cache keys a nested run's finished stages were written under;
* :func:`finished` / :func:`mark_finished`: a cell's own record, keyed by its settings, that lets a
  rerun reuse a finished cell without starting its pipeline.

Nothing here starts a pipeline (:mod:`pipeline.sweep.engine` does), so the frontier's light half
(:mod:`pipeline.frontier.nested`, imported by the runner) keys its measurements with it without a
circle of imports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.config import RunConfig, config_to_dict
from compressor.digest import content_hash
from compressor.errors import UserError
from rundir import layout
from rundir.artifacts import write_json
from rundir.integrity import reversed_interval
from rundir.records import read_record

KEY_LENGTH = 16  # the frontier's fingerprints and the cells' keys (the distillation scores keep 12)


@dataclass(frozen=True)
class Cell:
    """One setting at one seed: its nested run directory and the overrides that make its config
    (after the command line's; the seed's last)."""

    setting: str
    seed: int
    folder: Path
    overrides: tuple[str, ...]


def slug(name: str) -> str:
    """A setting's folder name: letters, digits and ``=.-`` kept, every other character a dash
    (``diff-pruning T=0.05 [shared]`` -> ``diff-pruning-T=0.05-shared``; ``macs-0.57`` as it is)."""
    return "".join(c if c.isalnum() or c in "=.-" else "-" for c in name).strip("-").replace("--", "-")


def cell_folder(root: Path, setting: str, seed: int) -> Path:
    """``ROOT/<slug of the setting>/seed-<seed>/``: a cell's nested run."""
    return Path(root) / slug(setting) / f"seed-{seed}"


def key_of(*parts: Any, length: int = KEY_LENGTH) -> str:
    """The key a cached result is filed under: the content hash of ``parts`` (as a list), its first
    ``length`` hex digits."""
    return content_hash(list(parts), length)


def read_json(path: Path) -> Any:
    """The JSON at ``path``, or None when it is missing or unreadable (a half-written file reads as
    absent: it is measured again)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cached(
    path: Path, key: str | None = None, field: str = "fingerprint", needs: Iterable[str] = ()
) -> dict | None:
    """The cached record at ``path`` when it holds ``key`` under ``field`` (``key`` None: a key in the
    file name) and every field of ``needs``; None: measure it. UserError when it holds an interval
    whose low end is above its high end (it was edited or damaged)."""
    data = read_json(path)
    if not isinstance(data, dict) or (key is not None and data.get(field) != key):
        return None
    if any(name not in data for name in needs):
        return None
    bad = reversed_interval(data, Path(path).stem)
    if bad:
        raise UserError(
            f"{path}: {bad}, an interval whose low end is above its high end (edited or damaged); "
            "delete the file to measure it again"
        )
    return data


def stage_keys(run: Path, stages: Iterable[str]) -> dict[str, str | None]:
    """Stage -> the cache key its completed record in the nested run ``run`` was written under
    (None: not completed)."""
    found = {s: read_record(run, s) for s in stages}
    return {s: (r.data.get("cache", {}).get("key") if r is not None else None) for s, r in found.items()}


def settings_key(cfg: RunConfig) -> str:
    """A cell's key: the content hash of its whole resolved config."""
    return key_of(config_to_dict(cfg))


def finished(run: Path, key: str, stages: Iterable[str]) -> bool:
    """Whether the cell in ``run`` finished ``stages`` under ``key`` and its stages' records are still
    the ones it finished with (a stage rerun since, or a record gone, is not finished)."""
    stages = list(stages)
    done = cached(layout.sweep_cell_file(run), key, field="key")
    if done is None:
        return False
    now = stage_keys(run, stages)
    return all(now[s] is not None and done.get("stages", {}).get(s) == now[s] for s in stages)


def mark_finished(run: Path, key: str, stages: Iterable[str]) -> None:
    """Record that the cell in ``run`` finished ``stages`` under ``key``, with their records' keys (a
    cell finetuned too counts as finished for a sweep that measures it after pruning only)."""
    done = stage_keys(run, stages)
    write_json(layout.sweep_cell_file(run), {"key": key, "stages": {s: k for s, k in done.items() if k}})
