"""Measured latency of pruned structures on a deployment backend, and the latency search.

The latency-targeted search lives here whole: the prune stage builds a
:class:`LatencySearch` from its config and calls it once (:meth:`LatencySearch.prepare`);
nothing here calls back into the stage. Latency-targeted pruning (``prune.target_latency``)
and ``compress-deploy plan`` both ask the same question: how fast is the UNet pruned at
ratio r on this backend, at this batch, relative to dense? Latency depends on the
structure (layer widths), not on the weights, so each candidate is pruned on a copy with
the magnitude criterion (the run's own criterion then chooses the channels at the ratio
that was picked). Every candidate is timed alternately with the dense model in the same
process (:func:`time_alternating`), so drift and warm-up cancel; the figure kept is the
median of ``repeat`` calls.

Long because the latency search lives here whole, as said above: the probe that times a
structure, the uniform and the per-level (hardware-aware) searches and their cached table
share one measurement protocol, and the prune stage calls one entry point.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.config import LatencyTarget, PruneConfig, RunConfig
from compressor.digest import content_hash
from compressor.errors import ConfigError
from compressor.models import count_macs_params
from compressor.sampling import make_scheduler
from deploy.bench import percentile_ms, sampler_call, time_alternating, unet_call
from deploy.runtimes import Backend, load_backend


def backend_unavailable(name: str) -> str:
    """Why ``name`` cannot be timed here ('' when it can)."""
    if name == "tensorrt":
        from deploy import tensorrt_backend

        return tensorrt_backend.unavailable_reason()
    return ""


@dataclass
class LatencyProbe:
    """Times one backend at one batch size, a UNet call or the whole DDIM sampler."""

    backend: str
    batch: int
    what: str = "unet"
    steps: int = 20
    device: torch.device = torch.device("cpu")
    threads: int | None = None
    warmup: int = 2
    repeat: int = 10
    precision: str = "fp16"  # TensorRT engines only
    scheduler_config: dict | None = None
    scheduler: str = "ddim"  # the timed sampler's solver (what="sampler")

    def __post_init__(self) -> None:
        reason = backend_unavailable(self.backend)
        if reason:
            raise ConfigError(f"latency on {self.backend}: not measurable here ({reason})")
        self._dir = tempfile.TemporaryDirectory(prefix="latency-")
        self._dense: tuple[nn.Module, Backend] | None = None
        self._counts: tuple[nn.Module, tuple[float, float]] | None = None

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        device: torch.device,
        scheduler_config: dict,
        backend: str | None = None,
        batch: int | None = None,
        what: str | None = None,
        repeat: int | None = None,
        threads: int | None = None,
        scheduler: str = "ddim",
    ) -> LatencyProbe:
        """A probe set up from a run config: ``prune.target_latency`` unless overridden.

        torch is timed on the run's device, ONNX Runtime on the CPU, TensorRT engines at
        ``build.precision``; the sampler runs ``bench.sampler_steps`` DDIM steps.
        """
        lat = cfg.prune.target_latency
        backend = backend or lat.backend
        return cls(
            backend,
            batch or lat.batch,
            what or lat.what,
            cfg.bench.sampler_steps,
            device if backend == "torch" else torch.device("cpu"),
            threads if threads is not None else lat.threads,
            lat.warmup,
            repeat or lat.repeat,
            cfg.build.precision,
            scheduler_config,
            scheduler,
        )

    def dense(self, unet: nn.Module) -> Backend:
        """The backend of the dense model, loaded once per probe."""
        if self._dense is None or self._dense[0] is not unet:
            self._dense = (unet, self.load(unet, "dense"))
        return self._dense[1]

    def dense_counts(self, unet: nn.Module) -> tuple[float, float]:
        """(MACs, params) of the dense model, counted once per probe."""
        if self._counts is None or self._counts[0] is not unet:
            self._counts = (unet, count_macs_params(unet))
        return self._counts[1]

    def load(self, unet: nn.Module, label: str) -> Backend:
        """A backend over a private copy of ``unet`` (ONNX / engine files in a temporary folder)."""
        if self.backend == "torch":
            return load_backend("torch", unet=unet, device=self.device)
        from export.onnx_export import export_unet

        precision = self.precision if self.backend == "tensorrt" else "fp32"
        onnx_file = Path(self._dir.name) / f"{label}.{precision}.onnx"
        export_unet(unet, onnx_file, precision, fold=self.backend == "tensorrt")
        if self.backend == "onnxruntime":
            backend = load_backend("onnxruntime", file=onnx_file, threads=self.threads)
            _remove(onnx_file)  # the session holds the model: trials of big models must not fill the disk
            return backend
        from compressor.runlayout import engine_info_path
        from deploy import tensorrt_backend
        from deploy.engines import Profile
        from export.onnx_export import onnx_input_shapes

        engine = onnx_file.with_suffix(".plan")
        tensorrt_backend.build_engine(
            onnx_file,
            engine,
            Profile(self.batch, self.batch, self.batch),
            onnx_input_shapes(onnx_file),
            precision,
            4.0,
            3,
            Path(self._dir.name) / "timing.cache",
            label,
        )
        _remove(onnx_file)
        backend = load_backend("tensorrt", file=engine)
        _remove(engine, engine_info_path(engine))
        return backend

    def _call(self, backend: Backend, shape: tuple) -> Callable[[], object]:
        device = "cuda" if self.backend == "tensorrt" else self.device
        if self.what == "unet":
            return unet_call(backend.predict, shape, self.batch, device)
        scheduler = make_scheduler(self.scheduler, self.scheduler_config or {})
        return sampler_call(backend.predict, scheduler, shape, self.batch, self.steps, device)

    def measure(self, dense: Backend, candidate: Backend, shape: tuple) -> tuple[float, float]:
        """(dense median ms, candidate median ms), timed alternately (torch on ``threads`` threads)."""
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            calls = {"dense": self._call(dense, shape), "candidate": self._call(candidate, shape)}
            warmup = self.warmup if self.what == "unet" else min(1, self.warmup)
            times = time_alternating(calls, warmup, self.repeat)
        finally:
            torch.set_num_threads(before)
        return percentile_ms(times["dense"])[0], percentile_ms(times["candidate"])[0]

    def describe(self) -> str:
        """E.g. 'onnxruntime, UNet call at batch 16'."""
        what = "UNet call" if self.what == "unet" else f"{self.steps}-step {self.scheduler} sampler"
        return f"{self.backend}, {what} at batch {self.batch}"


def _remove(*paths: Path) -> None:
    for path in paths:
        for p in (path, path.with_name(path.name + ".data")):
            p.unlink(missing_ok=True)


def pruned_copy(
    unet: nn.Module, ratio: float, round_to: int | None, level_ratios: dict[int, float] | None = None
) -> nn.Module:
    """``unet`` pruned at ``ratio`` (or per level) on a copy (magnitude: only the structure matters)."""
    import torch_pruning as tp

    from compressor.pruning import prune_structure, stem_ratio

    trial = copy.deepcopy(unet)
    if level_ratios:
        ratio = stem_ratio(level_ratios)
    if ratio > 0 or any((level_ratios or {}).values()):
        imp = tp.importance.GroupMagnitudeImportance(p=1)
        prune_structure(trial, imp, ratio, round_to, level_ratios=level_ratios)
    return trial.eval()


def time_structure(
    unet: nn.Module,
    probe: LatencyProbe,
    round_to: int | None,
    shape: tuple,
    ratio: float,
    level_ratios: dict[int, float] | None = None,
) -> dict:
    """One trial: ``unet`` pruned at ``ratio`` (or per level) on a copy, timed against dense.

    Row: ratio, macs, params, macs_kept, params_kept, dense_ms, median_ms, speedup, seconds
    (and ``levels`` for a per-level allocation).
    """
    from compressor.pruning import stem_ratio

    began = time.perf_counter()
    macs_dense, params_dense = probe.dense_counts(unet)
    trial = pruned_copy(unet, ratio, round_to, level_ratios)
    macs, params = count_macs_params(trial)
    label = f"r{ratio:.4f}" if not level_ratios else "l" + "-".join(f"{r:.3f}" for r in level_ratios.values())
    dense_ms, ms = probe.measure(probe.dense(unet), probe.load(trial, label), shape)
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
    probe: LatencyProbe,
    round_to: int | None,
    shape: tuple,
    stop: Callable[[dict], bool] | None = None,
    on_trial: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One :func:`time_structure` row per ratio (mildest first), stopping after the first ``stop`` accepts."""
    rows = []
    for ratio in ratios:
        row = time_structure(unet, probe, round_to, shape, ratio)
        rows.append(row)
        done = stop(row) if stop else False
        if on_trial:
            on_trial(row)
        if done:
            break
    return rows


def search_latency(
    unet: nn.Module,
    target,
    probe: LatencyProbe,
    round_to: int | None,
    shape: tuple,
    mode: str = "uniform",
    iterations: int = 4,
    on_trial: Callable[[dict], None] | None = None,
) -> tuple[float, list[dict]]:
    """The mildest ratio whose measured latency reaches ``target`` (a LatencyTarget), and every trial.

    Walks the uniform-width ratios from the mildest and stops at the first that meets the
    target with its noise margin; ``fine`` then bisects between it and the previous ratio.
    Raises ConfigError naming the best reachable figure when no ratio meets the target.
    """
    from compressor.pruning import uniform_ratios

    def meets(row: dict) -> bool:
        row["meets"] = target.met(row["speedup"], row["median_ms"])
        return row["meets"]

    rows = time_ratios(unet, uniform_ratios(unet), probe, round_to, shape, meets, on_trial)
    if not rows[-1]["meets"]:
        best = max(rows, key=lambda r: r["speedup"])
        raise ConfigError(
            f"prune.target_latency: {target.goal()} on {probe.describe()} is not reachable: the most "
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
            (row,) = time_ratios(unet, [mid], probe, round_to, shape, meets, on_trial)
            rows.append(row)
            lo, hi = (lo, mid) if row["meets"] else (mid, hi)
        chosen = hi
    return chosen, sorted(rows, key=lambda r: r["ratio"])


def cache_dir() -> Path:
    """Where measured latency tables are kept (``$COMPRESS_DEPLOY_CACHE``, else ~/.cache)."""
    import os

    root = os.environ.get("COMPRESS_DEPLOY_CACHE") or Path.home() / ".cache" / "compress-deploy"
    return Path(root) / "latency-tables"


def table_key(unet: nn.Module, probe: LatencyProbe, round_to: int | None, host: dict) -> str:
    """Digest of what a latency table depends on: architecture, backend settings, host."""
    import os
    import platform

    facts = {
        "unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "probe": [probe.backend, probe.batch, probe.what, probe.steps, probe.threads, probe.precision],
        "device": str(probe.device),
        "round_to": round_to,
        "host": host,
        "cpu": [platform.machine(), platform.processor(), os.cpu_count()],
    }
    return content_hash(facts, 20)


def level_latency_table(
    unet: nn.Module,
    probe: LatencyProbe,
    round_to: int | None,
    shape: tuple,
    ratios: list[float],
    host: dict,
    on_trial: Callable[[dict], None] | None = None,
) -> tuple[list[dict], bool]:
    """Measured saving of pruning one resolution level at a time, per ratio; (rows, from cache).

    Row: level, ratio, dense_ms, median_ms, saving (1 - pruned/dense). Cached per
    architecture, backend, batch, host (see :func:`table_key`).
    """
    import json

    from compressor.pruning import level_blocks

    path = cache_dir() / f"{table_key(unet, probe, round_to, host)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["rows"], True
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged cache entry is measured again
    dense = probe.dense(unet)
    rows = []
    for level in sorted(level_blocks(unet)):
        for ratio in ratios:
            trial = pruned_copy(unet, 0.0, round_to, {level: ratio})
            dense_ms, ms = probe.measure(dense, probe.load(trial, f"l{level}r{ratio:.4f}"), shape)
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
    table: list[dict], importance: dict[int, dict], target, limit: int | None = None, scale: float = 1.0
) -> list[dict]:
    """Per-level ratio allocations predicted to meet ``target``, most importance kept first.

    Predicted saving is ``scale`` times the sum of the levels' measured savings (each
    level timed alone, see :func:`monotone_savings`; ``scale`` calibrates the sum against
    allocations measured whole); importance kept is the total minus what each level's
    ratio removes. Every level chooses from 0 and the table's ratios, so the uniform
    allocations are candidates too.
    """
    import itertools

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


# -- the search: the prune stage's one entry point ---------------------------------------------

Log = Callable[[str], None]
CALIBRATIONS = 4  # allocations measured whole before the uniform search decides


class LatencySearch:
    """The latency-targeted search for one run: uniform ratios, bisection, or per-level allocation.

    Built from the run's config (:meth:`from_config`); :meth:`prepare` returns the prune
    config to prune with (the ratio the measurements chose, or none when the allocation is
    made after the Taylor pass) and, for ``prune.search: latency``, the allocator that
    ``compressor.pruning.prune_unet`` calls with the criterion's importance. :attr:`trials`
    and :attr:`summary` are the record's ``trials`` and ``target.target_latency``.
    """

    def __init__(
        self, cfg: PruneConfig, probe: LatencyProbe, shape: tuple, host: dict, log: Log | None = None
    ) -> None:
        self.cfg = cfg
        self.target: LatencyTarget = cfg.target_latency
        self.probe = probe
        self.shape = shape
        self.host = host
        self.log = log or (lambda message: None)
        self.trials: list[dict] = []
        self.summary: dict = {**dataclasses.asdict(self.target), "probe": probe.describe()}

    @classmethod
    def from_config(
        cls, cfg: RunConfig, device: torch.device, scheduler_config: dict, shape: tuple, host: dict, log: Log
    ) -> LatencySearch:
        """The search ``cfg.prune`` asks for, timed by a probe built from ``cfg``."""
        return cls(cfg.prune, LatencyProbe.from_config(cfg, device, scheduler_config), shape, host, log)

    def prepare(self, unet: nn.Module) -> tuple[PruneConfig, Callable[[nn.Module, object], dict] | None]:
        """(prune config without the latency target, allocator or None); measures uniform searches now."""
        cleared = dataclasses.replace(self.cfg, target_latency=LatencyTarget())
        if self.cfg.search == "latency":
            self.summary["search"] = "latency"
            return cleared, self.allocate
        ratio = self._uniform(unet)
        return dataclasses.replace(cleared, ratio=ratio), None

    # -- uniform ratios (and bisection) -------------------------------------------------------

    def _show_trial(self, row: dict) -> None:
        verdict = "meets" if row["meets"] else "misses"
        self.log(
            f"trial ratio {row['ratio']:.4f}: {row['macs_kept']:.3f} of MACs, "
            f"dense {row['dense_ms']:.2f} ms, pruned {row['median_ms']:.2f} ms, "
            f"{row['speedup']:.2f}x ({verdict} the target)"
        )

    def _uniform(self, unet: nn.Module) -> float:
        lat = self.target
        self.log(f"latency search: {lat.goal()} on {self.probe.describe()} (margin {lat.margin:.0%})")
        began = time.perf_counter()
        ratio, self.trials = search_latency(
            unet, lat, self.probe, self.cfg.round_to, self.shape, self.cfg.search, on_trial=self._show_trial
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

    # -- hardware-aware allocation --------------------------------------------------------------

    def allocate(self, unet: nn.Module, importance) -> dict[int, float]:
        """A ratio per resolution level: the most importance kept that meets the target when measured.

        Per-level latency table (measured once per architecture/backend/batch/host,
        cached), the importance each level's ratio would remove, allocations predicted to
        meet the target ranked by importance kept; the best few are measured for real
        and the first that meets the target (with its margin) wins; if none does, the
        uniform search (with bisection) decides.
        """
        from compressor.pruning import importance_by_level, uniform_ratios

        began = time.perf_counter()
        ratios = uniform_ratios(unet)
        self.log(f"hardware-aware allocation: {self.target.goal()} on {self.probe.describe()}")
        table, cached = level_latency_table(
            unet, self.probe, self.cfg.round_to, self.shape, ratios, self.host, self._show_row
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
            ratio, rows = search_latency(unet, self.target, self.probe, self.cfg.round_to, self.shape, "fine")
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
        measured: set[tuple] = set()
        scale = 1.0
        for _ in range(CALIBRATIONS):
            fresh = [c for c in ranked if tuple(c["levels"].items()) not in measured]
            if not fresh:
                break
            cand = fresh[0]
            measured.add(tuple(cand["levels"].items()))
            row = time_structure(unet, self.probe, self.cfg.round_to, self.shape, 0.0, cand["levels"])
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
