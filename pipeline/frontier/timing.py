"""Where stacks are timed: each stack's whole sampler, alternately with the dense reference sampler,
in this process on the backend it ships on (never farmed out: timings must not share the machine)."""

from __future__ import annotations

from collections.abc import Callable

from compressor.stack import Stack
from pipeline.frontier.grid import Spec
from pipeline.frontier.nested import model_run, ratio_config, ratio_key
from pipeline.sweep.cells import cached, key_of
from rundir import layout
from rundir.artifacts import write_json
from rundir.records import final_model_dir


def time_stacks(
    spec: Spec, stacks: list[Stack], on_point: Callable[[Stack, dict], None] | None = None
) -> dict:
    """Time each stack's sampler alternately with the dense reference sampler (this process)."""
    import torch

    # lazy: pulls in torch, which importing pipeline.frontier.timing alone does not
    from compressor.sampling import make_scheduler

    # lazy: pulls in torch, which importing pipeline.frontier.timing alone does not
    from deploy.runtimes import load_backend

    # lazy: pulls in torch, which importing pipeline.frontier.timing alone does not
    from deploy.stopwatch import host_facts, percentile_ms, sampler_call, time_alternating

    # lazy: pulls in torch, which importing pipeline.frontier.timing alone does not
    from pipeline.context import RunContext

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, 0.0)
    ctx = RunContext(cfg, layout.frontier_ratio_dir(spec.root, 0.0))
    shape, sched_cfg, ref = ctx.image_shape(), ctx.dense.scheduler_config, spec.reference
    host = host_facts()
    predictors: dict = {}

    def predictor(ratio: float, precision: str, reuse: bool, student: bool = False):
        key = (ratio, precision, reuse, student)
        if key not in predictors:
            run, model = model_run(spec, ratio, student)
            level = cfg.sample.cache_level if reuse else None
            unet = None
            if spec.backend == "torch":
                # lazy: pulls in torch, which importing pipeline.frontier.timing alone does not
                from compressor.persist import load_unet

                unet = ctx.dense.unet if model == "dense" else load_unet(final_model_dir(run)[1])[0]
            predictors[key] = load_backend(spec.backend, unet=unet, run_dir=run, model=model,
                                           precision=precision, threads=spec.threads,
                                           device=ctx.device, cache_level=level).predict  # fmt: skip
        return predictors[key]

    reference = sampler_call(predictor(0.0, "fp32", False), make_scheduler(ref.scheduler, sched_cfg),
                             shape, spec.batch, ref.steps, ctx.device)  # fmt: skip
    out = {}
    ratio_keys = {(s.ratio, s.student_steps > 0): ratio_key(spec, s.ratio, s.student_steps > 0)
                  for s in stacks}  # fmt: skip
    for stack in stacks:
        path = (
            layout.frontier_points_dir(spec.root) / f"{stack.key()}.latency.{spec.backend}-b{spec.batch}.json"
        )
        student = stack.student_steps > 0
        fingerprint = key_of(ratio_keys[(stack.ratio, student)], stack.as_dict(), str(ref),
                             spec.backend, spec.batch, spec.threads, spec.repeat, spec.warmup,
                             host)  # fmt: skip
        found = cached(path, fingerprint)
        if found is None:
            schedule = student_schedule(spec, stack) if student else sched_cfg
            call = sampler_call(predictor(stack.ratio, stack.precision, stack.cache_interval > 1, student),
                                make_scheduler(stack.scheduler, schedule), shape, spec.batch, stack.steps,
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


def student_schedule(spec: Spec, stack: Stack) -> dict:
    """The scheduler config a student stack samples with (its round's structure file)."""
    # lazy: pulls in torch, which importing pipeline.frontier.timing alone does not
    from compressor.persist import student_sampling

    run, _ = model_run(spec, stack.ratio, True)
    return student_sampling(layout.student_round_dir(run, stack.student_steps))[0]
