"""The sweep engine: settings x seeds, each cell a nested run of the ordinary pipeline, and what every
sweep writes for people.

A :class:`Sweep` names the run's config and command-line overrides, where the cells live, the
settings (name -> the overrides that make it), the seeds and the stages each cell runs. Each cell is
the nested run ``ROOT/<slug of the setting>/seed-<k>/`` (:func:`pipeline.sweep.cells.cell_folder`)
with the config ``CONFIG + command line + setting + seed=<k>``. :func:`run_nested` runs one through
:func:`pipeline.runner.run_pipeline` (cached, resumable and locked like any run) unless it finished
under the same settings (the content hash of its config, :func:`pipeline.sweep.cells.settings_key`),
in which case its records are reused as they are.

Then the summary: :func:`spread` (mean and std over seeds, :func:`compressor.digest.mean_std`),
:func:`paired_difference` / :func:`compare` / :func:`tally` (the paired interval of two scored
cells' Frechet difference, seed by seed), and the writers: :func:`table` and :func:`document` (the
Markdown), :func:`write_summary` (``summary.{json,md,png}`` and any further chart).

The two sweeps over it: :mod:`pipeline.sweep.ablation` (the method ablation) and
:mod:`pipeline.sweep.distillation` (plain vs distilled finetuning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressor.config import RunConfig, load_config
from compressor.digest import mean_std
from pipeline.runner import run_pipeline
from pipeline.sweep.cells import Cell, cell_folder, finished, mark_finished, settings_key
from rundir.artifacts import write_json


@dataclass(frozen=True)
class Sweep:
    """What a sweep runs: every setting at every seed, each a nested run of ``stages``."""

    config: Path  # the run's config file
    overrides: tuple[str, ...]  # the command line's key=value (before the setting's and the seed's)
    root: Path  # the cells' parent folder
    settings: Mapping[str, Sequence[str]]  # setting name -> its overrides
    seeds: tuple[int, ...]
    stages: tuple[str, ...]
    suffix: str  # added to the config's name in the nested runs ("-ablation")

    def cell(self, setting: str, seed: int) -> Cell:
        """One setting at one seed."""
        return Cell(
            setting, seed, cell_folder(self.root, setting, seed), (*self.settings[setting], f"seed={seed}")
        )

    def cells(self, setting: str | None = None) -> list[Cell]:
        """Every cell (setting by setting, seeds in order), or one setting's."""
        names = list(self.settings) if setting is None else [setting]
        return [self.cell(name, seed) for name in names for seed in self.seeds]

    def config_of(self, cell: Cell) -> RunConfig:
        """A cell's config: the run's, the command line's overrides, the setting's and its seed."""
        cfg = load_config(self.config, [*self.overrides, *cell.overrides])
        cfg.name = f"{cfg.name}{self.suffix}"
        return cfg

    def finished(self, cell: Cell) -> bool:
        """Whether ``cell`` finished this sweep's stages under its current settings."""
        return finished(cell.folder, settings_key(self.config_of(cell)), self.stages)

    def run(self, cell: Cell) -> RunConfig:
        """Run ``cell`` (or reuse it when it is finished); returns its config."""
        cfg = self.config_of(cell)
        run_nested(cfg, cell.folder, self.stages)
        return cfg


def run_nested(cfg: RunConfig, run: Path, stages: Iterable[str]) -> bool:
    """The cache-and-run primitive of a sweep's cell: ``stages`` of ``cfg`` in the nested run ``run``
    through the runner, unless the cell finished them under the same settings; True when it ran."""
    stages = list(stages)
    key = settings_key(cfg)
    if finished(run, key, stages):
        return False
    run_pipeline(cfg, run, stages)
    mark_finished(run, key, stages)
    return True


# -- the summary over seeds -----------------------------------------------------------------------


def spread(values: Sequence[float | None], name: str, keep: str | None = None) -> dict:
    """``{name}_mean`` and ``{name}_std`` over the seeds' ``values`` (None skipped), after the values
    themselves under ``keep`` when given."""
    mean, std = mean_std(list(values))
    return {**({keep: list(values)} if keep else {}), f"{name}_mean": mean, f"{name}_std": std}


def paired_difference(boot: Any, a: dict, b: dict, figure: str = "fd") -> list[float] | None:
    """The paired interval of ``a[figure] - b[figure]`` (two cells scored on the same quality seeds)
    from their replicates ``{figure}_replicates`` under the resampling ``boot``; None when either was
    scored before replicates were kept."""
    reps = f"{figure}_replicates"
    if not a.get(reps) or not b.get(reps):
        return None
    return boot.interval(a[figure] - b[figure], np.asarray(a[reps]) - np.asarray(b[reps]))


def compare(a: dict, b: dict, difference: Callable[[dict, dict], Any] | None) -> str:
    """``lower``, ``higher`` or ``within noise``: a's Frechet distance against b's, from the paired
    interval of their difference (bare figures when no interval can be formed)."""
    ci = difference(a, b) if difference else None
    low, high = ci if ci else (a["fd"] - b["fd"],) * 2
    return "lower" if high < 0 else "higher" if low > 0 else "within noise"


def tally(mine: list[dict], theirs: list[dict], difference: Callable[[dict, dict], Any] | None) -> str:
    """How many seeds' cells of ``mine`` are lower, within noise and higher than ``theirs``'."""
    found = [compare(a, b, difference) for a, b in zip(mine, theirs, strict=True)]
    counts = ", ".join(f"{found.count(word)} {word}" for word in ("lower", "within noise", "higher"))
    return f"{counts} (of {len(found)} seeds)"


# -- what people read -----------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def document(title: str, *blocks: str) -> str:
    """A Markdown document: ``# title``, then every non-empty block (a paragraph, a table, a
    ``## heading``, a list), one blank line apart."""
    return "\n\n".join([f"# {title}", *(b for b in blocks if b)]) + "\n"


def write_summary(root: Path, data: dict, text: str, charts: Mapping[str, Callable[[Path], Any]]) -> None:
    """``ROOT/summary.json`` and ``summary.md``, then every chart (file name -> draw(path)); prints the
    text and where it went."""
    write_json(root / "summary.json", data)
    (root / "summary.md").write_text(text)
    for name, draw in charts.items():
        draw(root / name)
    print(text)
    print(f"wrote {root / 'summary.md'}, summary.json and summary.png")
