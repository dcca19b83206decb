"""The speed-quality frontier: every stack of levers measured on the backend it ships on.

A *stack* is a pruning ratio (0 = the dense model; otherwise ``prune.ratio`` with the run's
criterion, then the run's finetune), a solver, a step count, a feature-reuse interval and a
precision. For every stack the frontier records

* **quality**: the Frechet distance (the quality stage's features, against the training
  images) and SSIM against the dense reference sampler's images (``sample.scheduler`` at
  ``sample.steps``, fp32) from the same seeds. An fp32 stack's images do not depend on the
  backend, so they are sampled in torch; fp16 and int8 stacks through ONNX Runtime, which
  runs them;
* **latency**: the whole sampler at ``batch`` on the named backend, timed alternately with
  the dense reference sampler in the same process (as ``bench`` does); speed-up =
  reference ms / stack ms.

Work is split into independent jobs: one per pruning ratio (a nested run under
``OUT/ratio-<r>/`` through :func:`pipeline.runner.run_pipeline`, so its stages are cached,
resumable and locked like any run), one for the reference images, one per stack's
quality. :func:`run_jobs` runs them in this process one after another, or on Ray (an
existing cluster by address, or a local one) when asked. Latency is measured afterwards in
this process, one stack at a time: timings must not share the machine with other work, and
they belong to the host the user ships on, not to whichever worker a job landed on.
Every job writes its result to ``OUT/points/`` keyed by a fingerprint of its inputs, so a
rerun measures only what is missing or changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compressor import runlayout
from compressor.config import (
    LatencyTarget,
    PruneConfig,
    RunConfig,
    SamplerVariant,
    config_from_mapping,
    config_to_dict,
)
from compressor.errors import UserError
from pipeline.context import log, write_json

LEVERS = ("prune", "steps", "scheduler", "cache", "precision")
SOLVERS = ("ddim", "dpmsolver++", "unipc")  # deterministic: a seed fixes the image


@dataclass(frozen=True)
class Stack:
    """One combination of levers."""

    ratio: float
    scheduler: str
    steps: int
    cache_interval: int = 1
    precision: str = "fp32"

    @property
    def variant(self) -> SamplerVariant:
        return SamplerVariant(self.scheduler, self.steps, self.cache_interval)

    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``r0.25-dpmsolver++-10-c2-fp32``."""
        return f"r{self.ratio:g}-{self.scheduler}-{self.steps}-c{self.cache_interval}-{self.precision}"

    def label(self) -> str:
        """A short human label, e.g. ``pruned 0.25 + DPM++ 10 + cache 2``."""
        model = "dense" if self.ratio == 0 else f"pruned {self.ratio:g}"
        solver = {"ddim": "DDIM", "dpmsolver++": "DPM++", "unipc": "UniPC"}[self.scheduler]
        text = f"{model} + {solver} {self.steps}"
        if self.cache_interval > 1:
            text += f" + cache {self.cache_interval}"
        if self.precision != "fp32":
            text += f" + {self.precision}"
        return text

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Grid:
    """The lever values to combine."""

    ratios: list[float]
    schedulers: list[str]
    steps: list[int]
    cache_intervals: list[int] = field(default_factory=lambda: [1])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])

    def stacks(self) -> list[Stack]:
        """Every valid combination: feature reuse needs fewer full passes than steps and runs the
        fp32/fp16 passes only (they are not quantized)."""
        out = []
        for r, s, n, c, p in itertools.product(
            self.ratios, self.schedulers, self.steps, self.cache_intervals, self.precisions
        ):
            if c > 1 and (c >= n or p == "int8"):
                continue
            out.append(Stack(float(r), s, int(n), int(c), p))
        return out

    def check(self) -> None:
        """UserError for values no stack can use."""
        bad = [s for s in self.schedulers if s not in SOLVERS]
        if bad:
            raise UserError(
                f"frontier: solver {bad[0]!r} is stochastic or unknown; choose from {', '.join(SOLVERS)}"
            )
        if not self.stacks():
            raise UserError("frontier: the grid has no valid stack (check --steps and --cache-intervals)")


@dataclass
class Spec:
    """Everything a job needs (plain data, so it pickles to Ray workers)."""

    base: dict  # the run config as a mapping
    out: str
    grid: Grid
    backend: str = "onnxruntime"
    batch: int = 16
    samples: int = 256
    threads: int | None = None
    repeat: int = 3
    warmup: int = 1

    @property
    def root(self) -> Path:
        return Path(self.out)

    def config(self) -> RunConfig:
        return config_from_mapping(self.base)

    @property
    def reference(self) -> SamplerVariant:
        """The dense reference sampler: the run's own solver and steps, no reuse."""
        s = self.config().sample
        return SamplerVariant(s.scheduler, s.steps)


def spec_from_config(cfg: RunConfig, out: Path, grid: Grid | None = None, **changes) -> Spec:
    """A frontier spec from the run config's ``frontier`` section (``changes`` override it)."""
    f = cfg.frontier
    grid = grid or Grid(list(f.ratios), list(f.schedulers), list(f.steps), list(f.cache_intervals),
                        list(f.precisions))  # fmt: skip
    threads = f.threads or cfg.bench.threads
    spec = Spec(config_to_dict(cfg), str(out), grid, f.backend, f.batch,
                f.samples or cfg.quality.num_samples, threads, f.repeat, f.warmup)  # fmt: skip
    spec = dataclasses.replace(spec, **{k: v for k, v in changes.items() if v is not None})
    spec.grid.check()
    return spec


def lever_grid(cfg: RunConfig, levers: list[str], base: Grid | None = None) -> Grid:
    """The grid a latency target may search: free levers span ``base`` (default: the ``frontier``
    section), the others stay at the run's sampler (``sample.scheduler``/``steps``, no reuse, fp32)."""
    f, s = base or cfg.frontier, cfg.sample
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise UserError(f"prune.target_latency.levers: unknown lever {unknown[0]!r}; choose from {LEVERS}")
    return Grid(
        ratios=list(f.ratios) if "prune" in levers else [0.0],
        schedulers=list(f.schedulers) if "scheduler" in levers else [s.scheduler],
        steps=list(f.steps) if "steps" in levers else [s.steps],
        cache_intervals=list(f.cache_intervals) if "cache" in levers else [1],
        precisions=list(f.precisions) if "precision" in levers else ["fp32"],
    )


# -- nested runs, one per pruning ratio ------------------------------------------------------


def ratio_overrides(spec: Spec, ratio: float) -> list[str]:
    """What a ratio's nested run changes in the run config."""
    grid = spec.grid
    precisions = ["fp32"] + [p for p in ("fp16", "int8") if p in grid.precisions]
    reuse = any(c > 1 for c in grid.cache_intervals)
    over = [
        f"prune.ratio={ratio}",
        "prune.target_macs=null",
        "prune.target_params=null",
        "prune.target_latency.speedup=null",
        "prune.target_latency.ms=null",
        "prune.target_latency.levers=[prune]",
        "prune.search=uniform",
        f"export.precisions=[{','.join(precisions)}]",
        f"export.feature_reuse={'true' if reuse else 'false'}",
    ]
    if ratio == 0:  # nothing is removed: no importance pass is needed
        over.append("prune.method=magnitude")
    return over


def ratio_config(spec: Spec, ratio: float) -> RunConfig:
    """A ratio's nested-run config: the run's, with no latency target of its own (so runs that
    differ only in their target share the nested runs) and the ratio's overrides."""
    base = {**spec.base, "prune": {**spec.base["prune"], "target_latency": config_to_dict(LatencyTarget())}}
    return config_from_mapping(base, ratio_overrides(spec, ratio))


# What a stack's images depend on besides the model (whose stage keys are fingerprinted).
SAMPLING_SECTIONS = ("model", "data", "seed", "sample", "quality")


def _sampling(cfg: RunConfig) -> dict:
    d = config_to_dict(cfg)
    return {k: d[k] for k in SAMPLING_SECTIONS}


def ratio_stages(ratio: float, backend: str = "onnxruntime") -> list[str]:
    """Ratio 0 is the dense model as it is: no finetune (its export holds the dense graphs); a
    TensorRT frontier also builds the engines it times."""
    stages = ["prune", "export"] if ratio == 0 else ["prune", "finetune", "export"]
    return stages + ["build"] if backend == "tensorrt" else stages


def fit_ratio(spec: Spec, ratio: float) -> dict:
    """Job: prune (and finetune) at ``ratio`` and export, in the nested run ``OUT/ratio-<r>``."""
    import torch

    from compressor.records import read_metrics
    from pipeline.runner import run_pipeline

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, ratio)
    run = runlayout.frontier_ratio_dir(spec.root, ratio)
    run_pipeline(cfg, run, ratio_stages(ratio, spec.backend))
    prune = read_metrics(run, "prune")
    return {"ratio": ratio, "run": str(run), "macs_kept": prune.macs_kept, "params_kept": prune.params_kept}


# -- quality ---------------------------------------------------------------------------------


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, fingerprint: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("fingerprint") == fingerprint else None


def _model_run(spec: Spec, ratio: float) -> tuple[Path, str]:
    """(nested run, model name in it) of a ratio: ratio 0 is the dense model of its run."""
    return runlayout.frontier_ratio_dir(spec.root, ratio), "dense" if ratio == 0 else "pruned"


def _ratio_key(spec: Spec, ratio: float) -> str:
    """Fingerprint of a ratio's model and sampling: its nested stages' cache keys (each the hash of
    the config sections and inputs that stage depends on) and the sampling settings."""
    from compressor.records import read_record

    run, _ = _model_run(spec, ratio)
    stages = {s: (read_record(run, s) or {}) for s in ratio_stages(ratio, spec.backend)}
    keys = {s: getattr(r, "data", {}).get("cache", {}).get("key") for s, r in stages.items()}
    return _fingerprint(_sampling(ratio_config(spec, ratio)), keys)


def reference_images(spec: Spec) -> dict:
    """Job: the dense reference sampler's images (torch fp32) and their Frechet distance."""
    import numpy as np
    import torch

    from compressor.sampling import generate, make_scheduler
    from pipeline.context import RunContext

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, 0.0)
    ref = spec.reference
    path = runlayout.frontier_points_dir(spec.root) / "reference.json"
    fingerprint = _fingerprint(_sampling(cfg), str(ref), spec.samples)
    images_file = runlayout.frontier_points_dir(spec.root) / "reference-images.npy"
    found = _cached(path, fingerprint)
    if found is not None and images_file.is_file():
        return found
    ctx = RunContext(cfg, runlayout.frontier_ratio_dir(spec.root, 0.0))
    log("frontier", f"reference: dense {ref.scheduler} {ref.steps} steps, {spec.samples} images")
    images = generate(
        ctx.torch_predictor(ctx.dense.unet), make_scheduler(ref.scheduler, ctx.dense.scheduler_config),
        ctx.image_shape(), spec.samples, ref.steps, seed=cfg.sample.seed, batch_size=cfg.sample.batch_size,
    )  # fmt: skip
    scorer, metric = _scorer(ctx)
    score = scorer.score(images)
    images_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = images_file.with_name(images_file.name + ".tmp.npy")
    np.save(tmp, images.numpy())
    tmp.replace(images_file)
    reps = runlayout.frontier_points_dir(spec.root) / "reference-fd-replicates.npy"
    np.save(reps.with_name(reps.name + ".tmp.npy"), score.fd_reps.numpy())
    reps.with_name(reps.name + ".tmp.npy").replace(reps)
    figures = scorer.figures(score, "fd")
    result = {"fingerprint": fingerprint, "metric": metric, "reference": str(ref), **figures}
    write_json(path, result)
    return result


def _scorer(ctx):
    """The quality stage's scorer (features, KID scale, bootstrap) for a frontier job, and the metric."""
    from compressor.data import stack
    from compressor.quality import make_scorer
    from pipeline.stages.quality import bootstrap

    feature, metric = ctx.frechet_features()
    real = (stack(ctx.dataset, ctx.cfg.quality.num_reference) + 1) / 2
    return make_scorer(real, feature, metric, bootstrap(ctx), ctx.cfg.quality.inception_weights), metric


def score_stack(spec: Spec, stack: Stack) -> dict:
    """Job: a stack's Frechet distance and SSIM vs the reference images (needs :func:`reference_images`)."""
    import numpy as np
    import torch

    from compressor.intervals import ssim_figures
    from compressor.persist import load_unet
    from compressor.records import final_model_dir
    from compressor.sampling import generate, make_scheduler
    from deploy.runtimes import load_backend
    from pipeline.context import RunContext

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, stack.ratio)
    path = runlayout.frontier_points_dir(spec.root) / f"{stack.key()}.quality.json"
    fingerprint = _fingerprint(
        _ratio_key(spec, stack.ratio), stack.as_dict(), spec.samples, str(spec.reference)
    )
    found = _cached(path, fingerprint)
    if found is not None:
        return found
    run, model = _model_run(spec, stack.ratio)
    ctx = RunContext(cfg, run)
    level = cfg.sample.cache_level if stack.cache_interval > 1 else None
    if stack.precision == "fp32":  # the same images on every backend: torch
        unet = ctx.dense.unet if model == "dense" else load_unet(final_model_dir(run)[1])[0]
        predict = load_backend("torch", unet=unet, cache_level=level).predict
    else:  # fp16 / int8: the ONNX file that runs them
        predict = load_backend("onnxruntime", run_dir=run, model=model, precision=stack.precision,
                               threads=spec.threads, cache_level=level).predict  # fmt: skip
    log("frontier", f"quality: {stack.label()}, {spec.samples} images")
    images = generate(
        predict, make_scheduler(stack.scheduler, ctx.dense.scheduler_config), ctx.image_shape(),
        spec.samples, stack.steps, seed=cfg.sample.seed, batch_size=cfg.sample.batch_size,
        cache_interval=stack.cache_interval, cache_schedule=cfg.sample.cache_schedule,
    )  # fmt: skip
    scorer, metric = _scorer(ctx)
    score = scorer.score(images)
    points = runlayout.frontier_points_dir(spec.root)
    reference = torch.from_numpy(np.load(points / "reference-images.npy"))
    ref_fd = json.loads((points / "reference.json").read_text())["fd"]  # the reference job's
    ref_reps = torch.from_numpy(np.load(points / "reference-fd-replicates.npy"))
    ratio = score.fd / ref_fd
    result = {
        "fingerprint": fingerprint,
        "metric": metric,
        **scorer.figures(score, "fd"),
        "fd_ratio": ratio,
        "fd_ratio_ci": scorer.boot.interval(ratio, score.fd_reps / ref_reps),
    }
    sim = ssim_figures(scorer.boot, images, reference)
    result.update(ssim=sim["ssim_vs_dense"], ssim_ci=sim["ssim_vs_dense_ci"])
    write_json(path, result)
    return result


# -- running jobs ----------------------------------------------------------------------------


def run_jobs(fn: Callable, jobs: list[tuple], ray: str | None = None, cpus: int | None = None) -> list:
    """``fn(*job)`` for every job: in this process in turn, or as Ray tasks (``ray``: an address,
    or ``local`` for a Ray started here with ``cpus`` CPUs); results in job order."""
    if not ray:
        return [fn(*job) for job in jobs]
    remote = _ray_remote(fn, ray, cpus)
    import ray as ray_module

    return ray_module.get([remote.remote(*job) for job in jobs])


def _ray_remote(fn: Callable, address: str, cpus: int | None):
    try:
        import ray
    except ImportError:
        raise UserError(
            "--ray: Ray is not installed; `pip install 'compress-deploy[ray]'` or run without --ray"
        ) from None
    if not ray.is_initialized():
        kwargs = {"num_cpus": cpus} if address == "local" else {"address": address}
        try:
            ray.init(include_dashboard=False, log_to_driver=True, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--ray {address}: cannot connect ({str(exc).splitlines()[0][:160]})") from None
    return ray.remote(num_cpus=1)(fn)


# -- latency ---------------------------------------------------------------------------------


def time_stacks(
    spec: Spec, stacks: list[Stack], on_point: Callable[[Stack, dict], None] | None = None
) -> dict:
    """Time each stack's sampler alternately with the dense reference sampler (this process)."""
    import torch

    from compressor.sampling import make_scheduler
    from deploy.bench import host_facts, percentile_ms, sampler_call, time_alternating
    from deploy.runtimes import load_backend
    from pipeline.context import RunContext

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, 0.0)
    ctx = RunContext(cfg, runlayout.frontier_ratio_dir(spec.root, 0.0))
    shape, sched_cfg, ref = ctx.image_shape(), ctx.dense.scheduler_config, spec.reference
    host = host_facts()
    predictors: dict = {}

    def predictor(ratio: float, precision: str, reuse: bool):
        key = (ratio, precision, reuse)
        if key not in predictors:
            run, model = _model_run(spec, ratio)
            level = cfg.sample.cache_level if reuse else None
            unet = None
            if spec.backend == "torch":
                from compressor.persist import load_unet
                from compressor.records import final_model_dir

                unet = ctx.dense.unet if model == "dense" else load_unet(final_model_dir(run)[1])[0]
            predictors[key] = load_backend(spec.backend, unet=unet, run_dir=run, model=model,
                                           precision=precision, threads=spec.threads,
                                           device=ctx.device, cache_level=level).predict  # fmt: skip
        return predictors[key]

    reference = sampler_call(predictor(0.0, "fp32", False), make_scheduler(ref.scheduler, sched_cfg),
                             shape, spec.batch, ref.steps, ctx.device)  # fmt: skip
    out = {}
    ratio_keys = {r: _ratio_key(spec, r) for r in {s.ratio for s in stacks}}  # records read once per ratio
    for stack in stacks:
        path = (
            runlayout.frontier_points_dir(spec.root)
            / f"{stack.key()}.latency.{spec.backend}-b{spec.batch}.json"
        )
        fingerprint = _fingerprint(ratio_keys[stack.ratio], stack.as_dict(), str(ref), spec.backend,
                                   spec.batch, spec.threads, spec.repeat, spec.warmup, host)  # fmt: skip
        found = _cached(path, fingerprint)
        if found is None:
            call = sampler_call(predictor(stack.ratio, stack.precision, stack.cache_interval > 1),
                                make_scheduler(stack.scheduler, sched_cfg), shape, spec.batch, stack.steps,
                                ctx.device, stack.cache_interval, cfg.sample.cache_schedule)  # fmt: skip
            times = time_alternating({"reference": reference, "candidate": call}, spec.warmup, spec.repeat)
            ref_ms, ms = percentile_ms(times["reference"])[0], percentile_ms(times["candidate"])[0]
            found = {"fingerprint": fingerprint, "latency_ms": ms, "reference_ms": ref_ms,
                     "speedup": ref_ms / ms, "host": host}  # fmt: skip
            write_json(path, found)
        out[stack] = found
        if on_point:
            on_point(stack, found)
    return out


# -- the frontier ----------------------------------------------------------------------------


def pareto(points: list[dict]) -> list[bool]:
    """Which points no other point beats: at least as fast and as good, and better in one."""
    flags = []
    for p in points:
        dominated = any(
            q is not p
            and q["speedup"] >= p["speedup"]
            and q["fd"] <= p["fd"]
            and (q["speedup"] > p["speedup"] or q["fd"] < p["fd"])
            for q in points
        )
        flags.append(not dominated)
    return flags


QUALITY_KEYS = ("fd", "fd_ci", "fd_ratio", "fd_ratio_ci", "ssim", "ssim_ci", "kid", "kid_std", "kid_ci")


def _ci(point: dict) -> list[float]:
    """A point's Frechet interval (a bare figure where none was recorded)."""
    return point.get("fd_ci") or [point["fd"], point["fd"]]


def mark_noise(points: list[dict]) -> None:
    """``within_noise``: the keys of the other points whose Frechet interval overlaps this one's."""
    from compressor.intervals import overlap

    for p in points:
        p["within_noise"] = [q["key"] for q in points if q is not p and overlap(_ci(p), _ci(q))]


def choose(points: list[dict], speedup: float | None = None, ms: float | None = None,
           margin: float = 0.0, grid: Grid | None = None) -> dict | None:  # fmt: skip
    """Among the points meeting the target (with ``margin``) within ``grid``: the fastest of those whose
    Frechet interval overlaps that of the best (lowest Frechet distance) such point.

    A point whose quality cannot be told from the best one's at this sample count is as good, so
    the faster wins. The returned point carries ``choice``: the rule, the best point, the stacks
    within noise of it, and whether the rule moved the choice away from the best.
    """
    from compressor.intervals import overlap

    allowed = set(grid.stacks()) if grid else None

    def met(p: dict) -> bool:
        if speedup is not None:
            return p["speedup"] >= speedup * (1 + margin)
        return p["latency_ms"] <= ms * (1 - margin)  # type: ignore[operator]

    meets = [p for p in points if (allowed is None or Stack(**p["stack"]) in allowed) and met(p)]
    if not meets:
        return None
    best = min(meets, key=lambda p: (p["fd"], -p["speedup"]))
    tied = [p for p in meets if p is best or overlap(_ci(p), _ci(best))]
    chosen = max(tied, key=lambda p: (p["speedup"], -p["fd"]))
    choice = {
        "rule": "fastest stack meeting the target whose Frechet interval overlaps the best such stack's",
        "meeting_target": len(meets),
        "best": {k: best[k] for k in ("key", "label", "speedup", "fd") if k in best} | {"fd_ci": _ci(best)},
        "within_noise_of_best": [p["key"] for p in tied],
        "moved_from_best": chosen is not best,
    }
    return {**chosen, "choice": choice}


def measure(spec: Spec, ray: str | None = None, cpus: int | None = None) -> dict:
    """Fit every ratio, score every stack (jobs), time every stack (here); the frontier as a dict."""
    from tqdm import tqdm

    stacks = spec.grid.stacks()
    ratios = sorted({s.ratio for s in stacks} | {0.0})
    log("frontier", f"{len(stacks)} stacks over {len(ratios)} pruning ratios -> {spec.root}")
    fitted = {r["ratio"]: r for r in run_jobs(fit_ratio, [(spec, r) for r in ratios], ray, cpus)}
    ref = run_jobs(reference_images, [(spec,)], ray, cpus)[0]
    scores = dict(zip(stacks, run_jobs(score_stack, [(spec, s) for s in stacks], ray, cpus), strict=True))
    bar = tqdm(total=len(stacks), desc="[frontier] timing", unit="stack", leave=False)

    def shown(stack: Stack, t: dict) -> None:
        bar.update(1)
        log("frontier", f"{stack.label()}: {t['latency_ms']:.1f} ms, {t['speedup']:.2f}x, "
                        f"{ref['metric']} {scores[stack]['fd']:.2f}")  # fmt: skip

    try:
        times = time_stacks(spec, stacks, shown)
    finally:
        bar.close()
    points = []
    for stack in stacks:
        q, t = scores[stack], times[stack]
        points.append({
            "stack": stack.as_dict(), "key": stack.key(), "label": stack.label(),
            "macs_kept": fitted[stack.ratio]["macs_kept"] if stack.ratio else 1.0,
            "latency_ms": t["latency_ms"], "reference_ms": t["reference_ms"], "speedup": t["speedup"],
            **{k: q[k] for k in QUALITY_KEYS},
        })  # fmt: skip
    for p, flag in zip(points, pareto(points), strict=True):
        p["pareto"] = flag
    mark_noise(points)
    cfg = spec.config()
    return {
        "config": cfg.name,
        "model": cfg.model.name,
        "backend": spec.backend,
        "batch": spec.batch,
        "threads": spec.threads,
        "samples": spec.samples,
        "metric": ref["metric"],
        "reference": {
            "stack": Stack(0.0, spec.reference.scheduler, spec.reference.steps).as_dict(),
            **{k: ref[k] for k in ("fd", "fd_ci", "kid", "kid_std", "kid_ci")},
        },  # fmt: skip
        "interval": {
            "level": spec.config().quality.interval_level,
            "resamples": spec.config().quality.resamples,
        },  # fmt: skip
        "grid": dataclasses.asdict(spec.grid),
        "ratios": {f"{r:g}": fitted[r] for r in ratios},
        "points": points,
    }


def _with_ci(value: float, ci: list | None, digits: int) -> str:
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _kid(value: float | None, ci: list | None) -> str:
    """KID x 1000 (the usual way it is printed) with its interval."""
    if value is None:
        return "-"
    return f"{1e3 * value:.2f}" + (f" [{1e3 * ci[0]:.2f}, {1e3 * ci[1]:.2f}]" if ci else "")


def table(frontier: dict) -> str:
    """The frontier as a Markdown table, fastest first, Pareto points in bold, every quality figure
    with its interval; "within noise of" lists the Pareto rows whose Frechet interval overlaps."""
    metric = frontier["metric"]
    lines = [
        f"| # | stack | MACs kept | ms (batch {frontier['batch']}) | speed-up | {metric} | {metric} ratio "
        "| KID x 1e3 | SSIM | Pareto | within noise of |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(frontier["points"], key=lambda p: -p["speedup"])
    row = {p["key"]: i + 1 for i, p in enumerate(order)}
    for i, p in enumerate(order, 1):
        mark = "**yes**" if p["pareto"] else ""
        label = f"**{p['label']}**" if p["pareto"] else p["label"]
        ties = sorted(row[k] for k in p.get("within_noise", []) if k in row and order[row[k] - 1]["pareto"])
        lines.append(
            f"| {i} | {label} | {p['macs_kept']:.2f} | {p['latency_ms']:.1f} | {p['speedup']:.2f}x "
            f"| {_with_ci(p['fd'], p.get('fd_ci'), 1)} | {_with_ci(p['fd_ratio'], p.get('fd_ratio_ci'), 2)} "
            f"| {_kid(p.get('kid'), p.get('kid_ci'))} | {_with_ci(p['ssim'], p.get('ssim_ci'), 3)} | {mark} "
            f"| {', '.join(map(str, ties))} |"
        )
    return "\n".join(lines)


def plot(frontier: dict, path: Path) -> Path:
    """Speed-up (log) against Frechet distance, one colour per ratio, the Pareto front drawn and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = frontier["points"]
    fig, ax = plt.subplots(figsize=(9, 6))
    ratios = sorted({p["stack"]["ratio"] for p in points})
    cmap = plt.get_cmap("viridis", max(len(ratios), 2))
    for i, r in enumerate(ratios):
        mine = [p for p in points if p["stack"]["ratio"] == r]
        name = "dense" if r == 0 else f"pruned {r:g} ({mine[0]['macs_kept']:.2f} of MACs)"
        low = [p["fd"] - _ci(p)[0] for p in mine]
        high = [_ci(p)[1] - p["fd"] for p in mine]
        ax.errorbar([p["speedup"] for p in mine], [p["fd"] for p in mine], yerr=[low, high], fmt="o",
                    color=cmap(i), label=name, alpha=0.7, capsize=2, elinewidth=0.8)  # fmt: skip
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["speedup"])
    ax.plot([p["speedup"] for p in front], [p["fd"] for p in front], "k--", lw=1, label="Pareto front")
    for i, p in enumerate(front):  # labels alternate: left-above, right-below, so neighbours stay legible
        ax.scatter([p["speedup"]], [p["fd"]], s=120, facecolors="none", edgecolors="red")
        offset, align = ((-8, 6), "right") if i % 2 == 0 else ((8, -10), "left")
        xy = (p["speedup"], p["fd"])
        ax.annotate(p["label"], xy, fontsize=7, xytext=offset, textcoords="offset points", ha=align)
    if frontier.get("chosen"):
        c = frontier["chosen"]
        ax.scatter([c["speedup"]], [c["fd"]], marker="*", s=250, color="red", label=f"chosen: {c['label']}")
    ax.axhline(frontier["reference"]["fd"], color="grey", lw=0.8, ls=":", label="dense reference")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ref = frontier["reference"]["stack"]
    where = f"({frontier['backend']}, batch {frontier['batch']})"
    ax.set_xlabel(f"sampler speed-up vs dense {ref['scheduler']} {ref['steps']} {where}")
    level = frontier.get("interval", {}).get("level")
    bars = f"; bars: {level:.0%} intervals" if level else ""
    ax.set_ylabel(f"{frontier['metric']} (log, lower is better{bars})")
    ax.set_title(f"{frontier['model']}: speed-quality frontier ({len(points)} stacks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def noise_note(frontier: dict) -> str:
    """What the brackets of a frontier's table mean."""
    interval = frontier.get("interval", {})
    level = interval.get("level")
    if not level:
        return "none recorded (measured before intervals)"
    how = "paired jackknife" if interval.get("method", "jackknife") == "jackknife" else "paired bootstrap"
    return (f"{level:.0%} intervals, {how} over the seeds; points whose Frechet intervals "
            "overlap are within noise of each other")  # fmt: skip


def choice_text(c: dict, target: str, metric: str) -> str:
    """One sentence: the chosen stack, and how the within-noise rule chose it."""
    text = (f"Chosen for {target}: **{c['label']}** ({c['speedup']:.2f}x, {metric} "
            f"{_with_ci(c['fd'], c.get('fd_ci'), 2)}, SSIM {c.get('ssim', float('nan')):.3f}).")  # fmt: skip
    choice = c.get("choice")
    if choice:
        n = len(choice["within_noise_of_best"])
        best = choice["best"]
        if choice["moved_from_best"]:
            text += (
                f" The lowest {metric} meeting the target is {best['label']} ({best['fd']:.2f}, "
                f"{best['speedup']:.2f}x); {n} stacks are within noise of it and this is the fastest."
            )
        else:
            text += f" It has the lowest {metric} of the {choice['meeting_target']} stacks meeting the target"
            text += (
                f" and is the fastest of the {n} within noise of it." if n > 1 else "; none is within noise."
            )
    return text


def write(frontier: dict, out: Path) -> None:
    """``frontier.json``, ``frontier.md`` and ``frontier.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "frontier.json", frontier)
    plot(frontier, out / "frontier.png")
    chosen = ""
    if frontier.get("chosen"):
        chosen = f"\n{choice_text(frontier['chosen'], frontier['target'], frontier['metric'])}\n"
    ref = frontier["reference"]
    text = (
        f"# Speed-quality frontier: {frontier['model']}\n\n"
        f"Latency: whole sampler, {frontier['backend']}, batch {frontier['batch']}, speed-up vs dense "
        f"{ref['stack']['scheduler']} {ref['stack']['steps']} timed alternately; quality: "
        f"{frontier['samples']} images per stack, {frontier['metric']} (dense reference "
        f"{_with_ci(ref['fd'], ref.get('fd_ci'), 2)}), SSIM vs the dense reference's images from the same "
        f"seeds; brackets: {noise_note(frontier)}.\n{chosen}\n"
        f"{table(frontier)}\n\n![frontier](frontier.png)\n"
    )
    (out / "frontier.md").write_text(text)


# -- a latency target over levers, inside a run -------------------------------------------------


class FrontierSearch:
    """``prune.target_latency`` with ``levers`` beyond ``prune``: measure the frontier of the free
    levers in ``RUN/frontier`` (the others stay at the run's sampler), choose the stack of lowest
    Frechet distance that meets the target with the target's margin, prune at its ratio.

    The rest of the run then uses the chosen stack (:func:`apply_stack`, ``RunContext.chosen``):
    quality samples the compressed model with it, bench times it against the dense reference
    sampler, and ``check`` gates on both.
    """

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.trials: list = []
        self.summary = None  # the pruning-only search's summary; this search records ``frontier``
        self.frontier: dict | None = None

    def prepare(self) -> PruneConfig:
        """Measure, choose, and return the prune config of the chosen ratio."""
        cfg = self.ctx.cfg
        lat = cfg.prune.target_latency
        levers = list(lat.levers)
        out = runlayout.frontier_dir(self.ctx.run_dir)
        where = Path(cfg.frontier.dir) if cfg.frontier.dir else out
        threads = lat.threads or cfg.frontier.threads or cfg.bench.threads
        spec = spec_from_config(cfg, where, lever_grid(cfg, levers), backend=lat.backend, batch=lat.batch,
                                threads=threads)  # fmt: skip
        found = measure(spec)
        found["measured_in"] = str(where)
        chosen = choose(found["points"], lat.speedup, lat.ms, lat.margin)
        found.update(target=lat.goal(), levers=levers, chosen=chosen)
        write(found, out)
        if chosen is None:
            fastest = max(found["points"], key=lambda p: p["speedup"])
            raise UserError(
                f"prune.target_latency: {lat.goal()} (sampler, {lat.backend}, batch {lat.batch}) is not "
                f"reachable with levers {', '.join(levers)}: the fastest measured stack is "
                f"{fastest['label']} at {fastest['speedup']:.2f}x; widen frontier.* or lower the target "
                f"(see {out / 'frontier.md'})"
            )
        self.frontier = {
            "target": lat.goal(),
            "levers": levers,
            "backend": lat.backend,
            "batch": lat.batch,
            "margin": lat.margin,
            "reference": found["reference"],
            "stacks": len(found["points"]),
            "measured_in": str(where),
            "chosen": chosen,
        }
        shown = choice_text(chosen, lat.goal(), found["metric"]).replace("**", "")
        log("prune", f"frontier: {len(found['points'])} stacks measured; {shown}")
        ratio = chosen["stack"]["ratio"]
        return dataclasses.replace(
            cfg.prune, ratio=ratio, target_macs=None, target_params=None, target_latency=LatencyTarget(),
            method="magnitude" if ratio == 0 else cfg.prune.method,
        )  # fmt: skip


def apply_stack(cfg: RunConfig, stack: dict | None) -> RunConfig:
    """The run config with what a chosen stack needs exported: its precision and, with reuse, the passes."""
    if not stack:
        return cfg
    export = cfg.export
    precisions = list(export.precisions)
    for needed in ("fp32", stack["precision"]):
        if needed not in precisions:
            precisions.append(needed)
    reuse = export.feature_reuse or stack["cache_interval"] > 1
    if precisions == list(export.precisions) and reuse == export.feature_reuse:
        return cfg
    return dataclasses.replace(
        cfg, export=dataclasses.replace(export, precisions=precisions, feature_reuse=reuse)
    )
