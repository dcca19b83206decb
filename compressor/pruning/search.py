"""The pruning searches: the ratio for a MACs/params target, and the measured-latency search.

:func:`search_ratio` finds the ratio that keeps at most a fraction of MACs or params (counted on
copies). The latency search asks the same of measured latency: how fast is the UNet pruned at
ratio r on a backend, at a batch, relative to dense? Latency depends on the structure (layer
widths), not on the weights, so each candidate is pruned on a copy with the magnitude criterion
(:func:`pruned_copy`; the run's own criterion then chooses the channels at the ratio picked) and
handed to a :class:`Timer`, which times it alternately with the dense model. The timer is the
only thing the search needs from a deployment backend; :func:`deploy.latency.latency_timer` makes
one, and nothing here imports ``deploy``.

The prune stage builds a :class:`LatencySearch` and calls it once (:meth:`LatencySearch.prepare`):
uniform ratios from the mildest (:func:`search_latency`, bisected with ``prune.search: fine``),
or, with ``prune.search: latency``, a ratio per resolution level chosen after the Taylor pass
from a cached table of measured per-level savings (:func:`level_latency_table`,
:func:`allocate_levels`).

Long because the uniform and the per-level latency searches share one trial protocol, one
cached table and one entry point, beside the MACs/params search they mirror.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from torch import nn

from compressor.config import LatencyTarget, PruneConfig
from compressor.digest import content_hash
from compressor.errors import ConfigError
from compressor.models import count_macs_params
from compressor.pruning.structure import (
    importance_by_level,
    level_blocks,
    prune_structure,
    stem_ratio,
    uses_whole_heads,
)

Log = Callable[[str], None]
CALIBRATIONS = 4  # allocations measured whole before the uniform search decides


class Timer(Protocol):
    """How the latency search times a structure (:func:`deploy.latency.latency_timer` makes one)."""

    def describe(self) -> str:
        """What is timed, e.g. 'onnxruntime, UNet call at batch 16' (the log, the record, errors)."""
        ...

    def cache_facts(self) -> dict:
        """What a measured latency table depends on besides the architecture and the host:
        ``{"probe": [...], "device": ...}`` (part of :func:`table_key`)."""
        ...

    def time(self, dense: nn.Module, candidate: nn.Module, label: str) -> tuple[float, float]:
        """(dense median ms, candidate median ms), timed alternately in one process; ``label`` names
        the candidate (its files, if the backend writes any)."""
        ...


# -- structures on copies ------------------------------------------------------------------------


def pruned_copy(
    unet: nn.Module,
    ratio: float,
    round_to: int | None,
    level_ratios: dict[int, float] | None = None,
    heads: str = "auto",
) -> nn.Module:
    """``unet`` pruned at ``ratio`` (or per level) on a copy (magnitude: only the structure matters);
    ``heads``: ``prune.attention_heads`` (:func:`compressor.pruning.structure.uses_whole_heads`)."""
    import torch_pruning as tp

    trial = copy.deepcopy(unet)
    if level_ratios:
        ratio = stem_ratio(level_ratios)
    if ratio > 0 or any((level_ratios or {}).values()):
        imp = tp.importance.GroupMagnitudeImportance(p=1)
        whole = uses_whole_heads(trial, heads)
        prune_structure(trial, imp, ratio, round_to, level_ratios=level_ratios, whole_heads=whole)
    return trial.eval()


def kept_fraction(
    unet: nn.Module,
    ratio: float,
    round_to: int | None,
    dense: tuple[int, int],
    tokens: int | None = None,
    heads: str = "auto",
) -> tuple[float, float]:
    """(MACs, params) fractions kept if ``unet`` were pruned at ``ratio`` (on a copy); ``tokens``: the
    length of a conditional UNet's ``encoder_hidden_states`` the MACs are counted with."""
    trial = pruned_copy(unet, ratio, round_to, heads=heads)  # sizes: any criterion will do
    macs, params = count_macs_params(trial, tokens)
    return macs / dense[0], params / dense[1]


def uniform_ratios(unet: nn.Module) -> list[float]:
    """Ratios at which every GroupNorm group loses the same whole number of channels.

    At these ratios every prunable layer keeps the same fraction of its width (the
    paper's pruned models are of this kind); between them only the layers that no
    GroupNorm couples (attention q/k/v, time embedding) change.
    """
    sizes = [m.num_channels // m.num_groups for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    steps = min(sizes) if sizes else 32
    return [k / steps for k in range(1, steps)]


# -- a MACs / params target -----------------------------------------------------------------------


def search_ratio(
    unet: nn.Module,
    target: float,
    metric: str,
    round_to: int | None,
    dense: tuple[int, int],
    mode: str = "uniform",
    iterations: int = 8,
    on_trial: Callable[[float, float, float], None] | None = None,
    tokens: int | None = None,
    heads: str = "auto",
) -> tuple[float, list[dict]]:
    """The ratio giving the largest pruned model that keeps at most ``target`` of MACs/params.

    MACs are those of one UNet call with its conditioning (``tokens``: the text length a
    conditional UNet is counted with, see :func:`compressor.models.count_macs_params`).

    ``uniform`` walks :func:`uniform_ratios` from the mildest and stops at the first
    that meets the target; ``fine`` then bisects between that ratio and the previous
    one, which trims only the layers that no GroupNorm couples. Raises ConfigError
    when no ratio reaches the target.
    """
    index = 0 if metric == "macs" else 1
    trials: list[dict] = []

    def evaluate(r: float) -> float:
        fr = kept_fraction(unet, r, round_to, dense, tokens, heads)
        trials.append({"ratio": round(r, 6), "macs_kept": fr[0], "params_kept": fr[1]})
        if on_trial:
            on_trial(r, fr[0], fr[1])
        return fr[index]

    if target >= 1.0:
        return 0.0, trials
    previous = 0.0
    for r in uniform_ratios(unet):
        if evaluate(r) <= target:
            if mode == "fine":
                lo, hi = previous, r
                for _ in range(iterations):
                    mid = (lo + hi) / 2
                    if evaluate(mid) <= target:
                        hi = mid
                    else:
                        lo = mid
                r = hi
            return r, trials
        previous = r
    smallest = min(t[f"{metric}_kept"] for t in trials)
    raise ConfigError(
        f"prune.target_{metric}={target}: not reachable; the smallest model this architecture "
        f"allows keeps {smallest:.3f} of its {metric}. Raise the target or use prune.ratio"
    )


# -- a measured latency target: uniform ratios ---------------------------------------------------


def structure_trial(
    unet: nn.Module,
    timer: Timer,
    round_to: int | None,
    ratio: float,
    level_ratios: dict[int, float] | None = None,
    dense: tuple[int, int] | None = None,
) -> dict:
    """One trial: ``unet`` pruned at ``ratio`` (or per level) on a copy, timed against dense.

    Row: ratio, macs, params, macs_kept, params_kept, dense_ms, median_ms, speedup, seconds
    (and ``levels`` for a per-level allocation). ``dense`` is ``unet``'s (MACs, params) when
    already counted.
    """
    began = time.perf_counter()
    macs_dense, params_dense = dense if dense is not None else count_macs_params(unet)
    trial = pruned_copy(unet, ratio, round_to, level_ratios)
    macs, params = count_macs_params(trial)
    label = f"r{ratio:.4f}" if not level_ratios else "l" + "-".join(f"{r:.3f}" for r in level_ratios.values())
    dense_ms, ms = timer.time(unet, trial, label)
    row = {
        "ratio": round(stem_ratio(level_ratios) if level_ratios else ratio, 6),
        "macs": macs,
        "params": params,
        "macs_kept": macs / macs_dense,
        "params_kept": params / params_dense,
        "dense_ms": dense_ms,
        "median_ms": ms,
        "speedup": dense_ms / ms,
        "seconds": round(time.perf_counter() - began, 2),
    }
    if level_ratios:
        row["levels"] = {str(k): v for k, v in level_ratios.items()}
    return row


def time_ratios(
    unet: nn.Module,
    ratios: list[float],
    timer: Timer,
    round_to: int | None,
    stop: Callable[[dict], bool] | None = None,
    on_trial: Callable[[dict], None] | None = None,
    dense: tuple[int, int] | None = None,
) -> list[dict]:
    """One :func:`structure_trial` row per ratio (mildest first), stopping after the first ``stop``
    accepts."""
    dense = dense if dense is not None else count_macs_params(unet)
    rows = []
    for ratio in ratios:
        row = structure_trial(unet, timer, round_to, ratio, dense=dense)
        rows.append(row)
        done = stop(row) if stop else False
        if on_trial:
            on_trial(row)
        if done:
            break
    return rows


def search_latency(
    unet: nn.Module,
    target: LatencyTarget,
    timer: Timer,
    round_to: int | None,
    mode: str = "uniform",
    iterations: int = 4,
    on_trial: Callable[[dict], None] | None = None,
) -> tuple[float, list[dict]]:
    """The mildest ratio whose measured latency reaches ``target``, and every trial.

    Walks the uniform-width ratios from the mildest and stops at the first that meets the
    target with its noise margin; ``fine`` then bisects between it and the previous ratio.
    Raises ConfigError naming the best reachable figure when no ratio meets the target.
    """

    def meets(row: dict) -> bool:
        row["meets"] = target.met(row["speedup"], row["median_ms"])
        return row["meets"]

    dense = count_macs_params(unet)
    rows = time_ratios(unet, uniform_ratios(unet), timer, round_to, meets, on_trial, dense)
    if not rows[-1]["meets"]:
        best = max(rows, key=lambda r: r["speedup"])
        raise ConfigError(
            f"prune.target_latency: {target.goal()} on {timer.describe()} is not reachable: the most "
            f"aggressive pruning allowed (ratio {best['ratio']:g}, {best['macs_kept']:.1%} of MACs) measured "
            f"{best['speedup']:.2f}x ({best['median_ms']:.2f} ms vs dense {best['dense_ms']:.2f} ms); "
            "lower the target"
        )
    chosen = rows[-1]["ratio"]
    if mode == "fine":
        lo = rows[-2]["ratio"] if len(rows) > 1 else 0.0
        hi = chosen
        for _ in range(iterations):
            mid = (lo + hi) / 2
            (row,) = time_ratios(unet, [mid], timer, round_to, meets, on_trial, dense)
            rows.append(row)
            lo, hi = (lo, mid) if row["meets"] else (mid, hi)
        chosen = hi
    return chosen, sorted(rows, key=lambda r: r["ratio"])


# -- a measured latency target: a ratio per resolution level --------------------------------------


def cache_dir() -> Path:
    """Where measured latency tables are kept (``$COMPRESS_DEPLOY_CACHE``, else ~/.cache)."""
    root = os.environ.get("COMPRESS_DEPLOY_CACHE") or Path.home() / ".cache" / "compress-deploy"
    return Path(root) / "latency-tables"


def table_key(unet: nn.Module, timer: Timer, round_to: int | None, host: dict) -> str:
    """Digest of what a latency table depends on: architecture, backend settings, host."""
    facts = {
        "unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        **timer.cache_facts(),  # "probe", "device"
        "round_to": round_to,
        "host": host,
        "cpu": [platform.machine(), platform.processor(), os.cpu_count()],
    }
    return content_hash(facts, 20)


def level_latency_table(
    unet: nn.Module,
    timer: Timer,
    round_to: int | None,
    ratios: list[float],
    host: dict,
    on_trial: Callable[[dict], None] | None = None,
) -> tuple[list[dict], bool]:
    """Measured saving of pruning one resolution level at a time, per ratio; (rows, from cache).

    Row: level, ratio, dense_ms, median_ms, saving (1 - pruned/dense). Cached per
    architecture, backend, batch, host (see :func:`table_key`).
    """
    path = cache_dir() / f"{table_key(unet, timer, round_to, host)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["rows"], True
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged cache entry is measured again
    rows = []
    for level in sorted(level_blocks(unet)):
        for ratio in ratios:
            trial = pruned_copy(unet, 0.0, round_to, {level: ratio})
            dense_ms, ms = timer.time(unet, trial, f"l{level}r{ratio:.4f}")
            row = {
                "level": level,
                "ratio": ratio,
                "dense_ms": dense_ms,
                "median_ms": ms,
                "saving": 1 - ms / dense_ms,
            }
            rows.append(row)
            if on_trial:
                on_trial(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1))
    tmp.replace(path)
    return rows, False


def monotone_savings(table: list[dict]) -> dict[tuple[int, float], float]:
    """(level, ratio) -> saving, made non-decreasing in the ratio the pessimistic way.

    A level pruned harder cannot be slower; where noise says so, each saving becomes
    the smallest saving measured at that ratio or above (and never below 0).
    """
    out = {}
    for level in {r["level"] for r in table}:
        rows = sorted((r for r in table if r["level"] == level), key=lambda r: r["ratio"])
        floor = float("inf")
        for row in reversed(rows):
            floor = min(floor, row["saving"])
            out[(level, row["ratio"])] = max(0.0, floor)
    return out


def allocate_levels(
    table: list[dict],
    importance: dict[int, dict],
    target: LatencyTarget,
    limit: int | None = None,
    scale: float = 1.0,
) -> list[dict]:
    """Per-level ratio allocations predicted to meet ``target``, most importance kept first.

    Predicted saving is ``scale`` times the sum of the levels' measured savings (each
    level timed alone, see :func:`monotone_savings`; ``scale`` calibrates the sum against
    allocations measured whole); importance kept is the total minus what each level's
    ratio removes. Every level chooses from 0 and the table's ratios, so the uniform
    allocations are candidates too.
    """
    levels = sorted({r["level"] for r in table})
    saving = monotone_savings(table)
    ratios = sorted({r["ratio"] for r in table})
    total = sum(importance.get(lvl, {}).get("total", 0.0) for lvl in levels) or 1.0
    dense_ms = sum(r["dense_ms"] for r in table) / len(table)
    out = []
    for choice in itertools.product([0.0, *ratios], repeat=len(levels)):
        alloc = dict(zip(levels, choice, strict=True))
        saved = scale * sum(saving.get((lvl, r), 0.0) for lvl, r in alloc.items())
        if saved >= 1.0:
            continue
        speedup = 1 / (1 - saved)
        if not target.met(speedup, dense_ms * (1 - saved)):
            continue
        removed = sum(importance.get(lvl, {}).get("removed", {}).get(r, 0.0) for lvl, r in alloc.items() if r)
        out.append(
            {
                "levels": alloc,
                "predicted_speedup": speedup,
                "importance_kept": 1 - removed / total,
                "uniform": len(set(choice)) == 1,
            }
        )
    out.sort(key=lambda c: (-c["importance_kept"], -c["predicted_speedup"]))
    return out[:limit] if limit else out


# -- the search: the prune stage's one entry point -----------------------------------------------


class LatencySearch:
    """The latency-targeted search for one run: uniform ratios, bisection, or per-level allocation.

    Built from the run's prune config and a :class:`Timer`; :meth:`prepare` returns the prune
    config to prune with (the ratio the measurements chose, or none when the allocation is
    made after the Taylor pass) and, for ``prune.search: latency``, the allocator that
    :func:`compressor.pruning.prune_unet` calls with the criterion's importance. :attr:`trials`
    and :attr:`summary` are the record's ``trials`` and ``target.target_latency``.
    """

    def __init__(self, cfg: PruneConfig, timer: Timer, host: dict, log: Log | None = None) -> None:
        self.cfg = cfg
        self.target: LatencyTarget = cfg.target_latency
        self.timer = timer
        self.host = host
        self.log = log or (lambda message: None)
        self.trials: list[dict] = []
        self.summary: dict = {**dataclasses.asdict(self.target), "probe": timer.describe()}

    def prepare(self, unet: nn.Module) -> tuple[PruneConfig, Callable[[nn.Module, object], dict] | None]:
        """(prune config without the latency target, allocator or None); measures uniform searches now."""
        cleared = dataclasses.replace(self.cfg, target_latency=LatencyTarget())
        if self.cfg.search == "latency":
            self.summary["search"] = "latency"
            return cleared, self.allocate
        ratio = self._uniform(unet)
        return dataclasses.replace(cleared, ratio=ratio), None

    # -- uniform ratios (and bisection) ---------------------------------------------------------

    def _show_trial(self, row: dict) -> None:
        verdict = "meets" if row["meets"] else "misses"
        self.log(
            f"trial ratio {row['ratio']:.4f}: {row['macs_kept']:.3f} of MACs, "
            f"dense {row['dense_ms']:.2f} ms, pruned {row['median_ms']:.2f} ms, "
            f"{row['speedup']:.2f}x ({verdict} the target)"
        )

    def _uniform(self, unet: nn.Module) -> float:
        lat = self.target
        self.log(f"latency search: {lat.goal()} on {self.timer.describe()} (margin {lat.margin:.0%})")
        began = time.perf_counter()
        ratio, self.trials = search_latency(
            unet, lat, self.timer, self.cfg.round_to, self.cfg.search, on_trial=self._show_trial
        )
        chosen = next(t for t in self.trials if t["ratio"] == round(ratio, 6))
        milder = [t for t in self.trials if t["ratio"] < chosen["ratio"]]
        self.summary.update(
            chosen=chosen,
            next_milder=milder[-1] if milder else None,
            search_seconds=round(time.perf_counter() - began, 1),
        )
        self.log(
            f"latency search: ratio {ratio:.4f} measured {chosen['speedup']:.2f}x "
            f"({chosen['median_ms']:.2f} ms) in {self.summary['search_seconds']:.0f} s"
        )
        return ratio

    # -- hardware-aware allocation ----------------------------------------------------------------

    def allocate(self, unet: nn.Module, importance) -> dict[int, float]:
        """A ratio per resolution level: the most importance kept that meets the target when measured.

        Per-level latency table (measured once per architecture/backend/batch/host,
        cached), the importance each level's ratio would remove, allocations predicted to
        meet the target ranked by importance kept; the best few are measured for real
        and the first that meets the target (with its margin) wins; if none does, the
        uniform search (with bisection) decides.
        """
        began = time.perf_counter()
        ratios = uniform_ratios(unet)
        self.log(f"hardware-aware allocation: {self.target.goal()} on {self.timer.describe()}")
        table, cached = level_latency_table(
            unet, self.timer, self.cfg.round_to, ratios, self.host, self._show_row
        )
        if cached:
            self.log(f"latency table: {len(table)} rows from the cache (same architecture, backend, host)")
        imp = importance_by_level(unet, importance, ratios)
        total = sum(v["total"] for v in imp.values()) or 1.0
        self.summary.update(
            table=table,
            table_cached=cached,
            importance={str(k): v["total"] / total for k, v in imp.items()},
            uniform_reference=[
                {"ratio": r, "importance_kept": 1 - sum(v["removed"][r] for v in imp.values()) / total}
                for r in ratios
            ],
        )
        chosen, scale = self._measure_allocations(unet, table, imp)
        if chosen is None:
            self.log("no predicted allocation met the target when measured: the uniform search decides")
            ratio, rows = search_latency(unet, self.target, self.timer, self.cfg.round_to, "fine")
            self.trials.extend(rows)
            chosen = dict.fromkeys(sorted({r["level"] for r in table}), ratio)
            self.summary["chosen"] = next(t for t in rows if t["ratio"] == round(ratio, 6))
        self.summary["calibration"] = scale
        self.summary["search_seconds"] = round(time.perf_counter() - began, 1)
        return chosen

    def _show_row(self, row: dict) -> None:
        self.log(f"latency table: level {row['level']} at ratio {row['ratio']:g} saves {row['saving']:.1%}")

    def _measure_allocations(
        self, unet: nn.Module, table: list[dict], imp: dict
    ) -> tuple[dict | None, float]:
        """Measure the best predicted allocations, recalibrating the prediction after each miss."""
        lat = self.target
        ranked = allocate_levels(table, imp, lat)
        self.summary["candidates"] = len(ranked)
        if not ranked:
            self.log("no allocation is predicted to meet the target: the uniform search decides")
        dense = count_macs_params(unet) if ranked else None
        measured: set[tuple] = set()
        scale = 1.0
        for _ in range(CALIBRATIONS):
            fresh = [c for c in ranked if tuple(c["levels"].items()) not in measured]
            if not fresh:
                break
            cand = fresh[0]
            measured.add(tuple(cand["levels"].items()))
            row = structure_trial(unet, self.timer, self.cfg.round_to, 0.0, cand["levels"], dense)
            row.update(
                meets=lat.met(row["speedup"], row["median_ms"]),
                predicted_speedup=cand["predicted_speedup"],
                importance_kept=cand["importance_kept"],
            )
            self.trials.append(row)
            self.log(
                f"allocation {row['levels']}: predicted {cand['predicted_speedup']:.2f}x, measured "
                f"{row['speedup']:.2f}x, importance kept {cand['importance_kept']:.3f} "
                f"({'meets' if row['meets'] else 'misses'} the target)"
            )
            if row["meets"]:
                self.summary["chosen"] = row
                return cand["levels"], scale
            predicted = 1 - 1 / cand["predicted_speedup"]
            if predicted > 0 and row["speedup"] > 0:  # the sum of single-level savings was off by this
                scale = min(1.5, max(0.3, scale * (1 - 1 / row["speedup"]) / predicted))
                ranked = allocate_levels(table, imp, lat, scale=scale)
        return None, scale
