"""Where stacks are timed: each stack's whole sampler, alternately with the dense reference sampler,
in this process on the backend it ships on (never farmed out: timings must not share the machine),
at every timed batch (:attr:`~pipeline.frontier.grid.Spec.timed_batches`).

A conditional model's stacks are timed as the user waits for them: the whole text-to-image call
(:func:`deploy.whole_call.whole_call`: the text encoder, the guided UNet loop, the VAE decoder; the
encoder and decoder the dense run's shared graphs, the same for every stack), each record keeping the
milliseconds per component of the stack and of the reference beside the call's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor.errors import UserError
from compressor.persist import load_unet, student_sampling
from compressor.sampling import make_scheduler
from compressor.stack import Stack
from deploy.runtimes import load_backend
from deploy.stopwatch import host_facts, percentile_ms, sampler_call, time_alternating
from deploy.whole_call import unavailable_reason, whole_call
from pipeline.frontier.grid import Spec, stack_guidance
from pipeline.frontier.nested import model_run, ratio_config, ratio_key
from pipeline.frontier.scoring import job_context
from pipeline.sweep.cells import cached, key_of
from rundir import layout
from rundir.artifacts import write_json
from rundir.records import final_model_dir


def time_stacks(
    spec: Spec, stacks: list[Stack], on_point: Callable[[Stack, dict], None] | None = None
) -> dict:
    """Time each stack's sampler (a conditional model's whole call) alternately with the dense
    reference's (this process), at every timed batch. Stack -> its record at ``spec.batch``
    (``latency_ms``, ``reference_ms``, ``speedup``; a whole call's ``components`` and
    ``reference_components``) with ``by_batch``: batch -> the record at that batch."""

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, 0.0)
    dense_run = layout.frontier_ratio_dir(spec.root, 0.0)
    ctx = job_context(cfg, dense_run, "bench")
    shape, sched_cfg, ref = ctx.image_shape(), ctx.dense.scheduler_config, spec.reference
    conditional = ctx.dense.conditioning != "none"
    if conditional:
        reason = unavailable_reason(ctx.dense, spec.backend, dense_run)
        if reason:
            raise UserError(f"frontier: cannot time the whole text-to-image call: {reason}")
    host = host_facts()
    predictors: dict = {}
    graphs: dict = {}  # the text encoder's and VAE decoder's sessions, shared by every call

    def predictor(ratio: float, precision: str, reuse: bool, student: bool = False):
        key = (ratio, precision, reuse, student)
        if key not in predictors:
            run, model = model_run(spec, ratio, student)
            level = cfg.sample.cache_level if reuse else None
            unet = None
            if spec.backend == "torch":
                unet = ctx.dense.unet if model == "dense" else load_unet(final_model_dir(run)[1])[0]
            predictors[key] = load_backend(spec.backend, unet=unet, run_dir=run, model=model,
                                           precision=precision, threads=spec.threads,
                                           device=ctx.device, cache_level=level).predict  # fmt: skip
        return predictors[key]

    def call(predict, scheduler: str, schedule: dict, batch: int, steps: int, interval: int, guidance: float):
        if not conditional:  # the UNet loop is the whole call
            return sampler_call(predict, make_scheduler(scheduler, schedule), shape, batch, steps,
                                ctx.device, interval, cfg.sample.cache_schedule)  # fmt: skip
        return whole_call(ctx.dense, spec.backend, predict, make_scheduler(scheduler, schedule), ctx.prompts,
                          batch, steps, guidance, ctx.device, dense_run, spec.threads, graphs, interval,
                          cfg.sample.cache_schedule)  # fmt: skip

    dense = predictor(0.0, "fp32", False)
    references = {b: call(dense, ref.scheduler, sched_cfg, b, ref.steps, 1, cfg.sample.guidance_scale)
                  for b in spec.timed_batches}  # fmt: skip
    out = {}
    ratio_keys = {(s.ratio, s.student_steps > 0): ratio_key(spec, s.ratio, s.student_steps > 0)
                  for s in stacks}  # fmt: skip
    for stack in stacks:
        student = stack.student_steps > 0
        by_batch = {}
        for batch in spec.timed_batches:
            path = (
                layout.frontier_points_dir(spec.root) / f"{stack.key()}.latency.{spec.backend}-b{batch}.json"
            )
            fingerprint = key_of(ratio_keys[(stack.ratio, student)], stack.as_dict(), str(ref),
                                 spec.backend, batch, spec.threads, spec.repeat, spec.warmup,
                                 host)  # fmt: skip
            found = None if spec.retime else cached(path, fingerprint)
            if found is None:
                schedule = student_schedule(spec, stack) if student else sched_cfg
                reuse = stack.cache_interval > 1
                candidate = call(predictor(stack.ratio, stack.precision, reuse, student), stack.scheduler,
                                 schedule, batch, stack.steps, stack.cache_interval,
                                 stack_guidance(cfg, stack))  # fmt: skip
                calls = {"reference": references[batch], "candidate": candidate}
                times = time_alternating(calls, spec.warmup, spec.repeat)
                ref_ms, ms = percentile_ms(times["reference"])[0], percentile_ms(times["candidate"])[0]
                found = {"fingerprint": fingerprint, "latency_ms": ms, "reference_ms": ref_ms,
                         "speedup": ref_ms / ms, "host": host}  # fmt: skip
                if conditional:  # the whole call by component, the stack's and the reference's
                    found["components"] = candidate.component_ms(spec.repeat)
                    found["reference_components"] = references[batch].component_ms(spec.repeat)
                write_json(path, found)
            by_batch[batch] = found
        out[stack] = {**by_batch[spec.batch], "by_batch": by_batch}
        if on_point:
            on_point(stack, out[stack])
    return out


def student_schedule(spec: Spec, stack: Stack) -> dict:
    """The scheduler config a student stack samples with (its round's structure file)."""

    run, _ = model_run(spec, stack.ratio, True)
    return student_sampling(layout.student_round_dir(run, stack.student_steps))[0]
