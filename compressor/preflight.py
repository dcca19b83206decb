"""Settings that cannot work are refused before long work starts.

The config's own rules (:mod:`compressor.config`) check each key and the rules between keys. What
depends on the model (its training timesteps, its resolution levels, its blocks) is checked here,
against the model's configs read without its weights (:func:`compressor.models.read_model_configs`),
when the runner starts and before the first stage writes anything:

- sampling steps (``sample.steps``, ``quality.steps``, ``bench.sampler_steps``, ``bench.variants``,
  ``parity.sampler_steps``, ``export.calibration_steps`` with int8, ``distill_steps.start_steps``, the
  frontier's ``steps`` a latency target may move) at most the training timesteps, as no scheduler
  has more steps to take;
- ``parity.timesteps`` below them, ``prune.timestep_stride`` (the Taylor pass) below them too;
- ``distill_steps.target_steps`` and the frontier's ``students`` dividing them (the student's grid);
- sizes: a ``model.sample_size`` the UNet's downsampling halves evenly, a ``sample.cache_level``
  inside its levels (when features are reused), ``finetune.distill.feature_points`` among its blocks.

The model itself is refused first when the stages would get it wrong (:func:`check_model_supported`):
only unconditional pixel-space models run through most of them today, so a model with text or class
conditioning, or one working on latents (a VAE), is one ModelError naming the stages that would get
it wrong, not a failure deep inside one. The stages of :data:`CONDITIONAL_STAGES` (every default
stage; ``train``, which trains the demo's base model from scratch, is not one) take text- or
class-conditioned models, pixel or latent: they train on the encoded data with its conditioning and
sample with the run's prompts under guidance; a run of those alone is not refused, and neither is
``compress-deploy frontier``.

Data needs no check here: images are resized to the model's sample size. A setting that asks for a
stage the config's stage list lacks (``distill_steps.target_steps`` without ``distill_steps``) is
refused too, with the fix (:func:`check_stages_asked`). Each refusal is one ConfigError line naming
every key that cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compressor.config import DEFAULT_STAGES, RunConfig, StepDistillConfig
from compressor.errors import ConfigError, ModelError
from compressor.stack import SamplerVariant

if TYPE_CHECKING:  # annotations only: the description module imports torch
    from compressor.components import ModelSpec

# the stages that run text- or class-conditioned and latent models: every default stage (not train)
CONDITIONAL_STAGES = tuple(DEFAULT_STAGES)


def stages_refusing(spec: ModelSpec, stages: list[str]) -> list[str]:
    """Which of ``stages`` would get the model of ``spec`` wrong: none for an unconditional pixel-space
    model; the stages outside :data:`CONDITIONAL_STAGES` for a conditioned or latent one."""
    if not spec.refusal():
        return []
    return [s for s in stages if s not in CONDITIONAL_STAGES]


@dataclass(frozen=True)
class ModelFacts:
    """What settings are checked against: the model's schedule length and its UNet's shape."""

    name: str
    num_train_timesteps: int
    class_name: str
    sample_size: int
    levels: int  # resolution levels, one per down block
    blocks: tuple[str, ...]  # down.I, mid, up.I (the names finetune.distill.feature_points takes)

    @classmethod
    def from_configs(cls, name: str, unet: dict, scheduler: dict) -> ModelFacts:
        """From a diffusers UNet config and scheduler config (diffusers' defaults where a key is absent)."""
        down, up = list(unet.get("down_block_types") or []), list(unet.get("up_block_types") or [])
        class_name = unet.get("_class_name", "UNet2DModel")
        mid_default = "UNetMidBlock2D" if class_name == "UNet2DModel" else "UNetMidBlock2DCrossAttn"
        has_mid = unet.get("mid_block_type", mid_default) is not None
        blocks = [f"down.{i}" for i in range(len(down))] + (["mid"] if has_mid else [])
        size = unet.get("sample_size") or 0
        return cls(
            name=name,
            num_train_timesteps=int(scheduler.get("num_train_timesteps") or 1000),
            class_name=class_name,
            sample_size=int(size if isinstance(size, int) else size[0]),
            levels=len(down),
            blocks=tuple(blocks + [f"up.{i}" for i in range(len(up))]),
        )


def model_facts(cfg: RunConfig) -> ModelFacts | None:
    """The facts of the model ``cfg.model`` names, from its configs alone; None where they cannot be
    read cheaply (a hub id that is not a shipped architecture; the model's loader checks later)."""
    # lazy: pulls in torch, which importing compressor.preflight alone does not
    from compressor.models import read_model_configs

    found = read_model_configs(cfg.model)
    return None if found is None else ModelFacts.from_configs(cfg.model.name, *found)


def check_model_supported(spec: ModelSpec, name: str, where: str = "the pipeline's stages") -> None:
    """Refuse, in one ModelError line, a model the stages would get wrong: text or class conditioning
    (they sample without it) or latents (they would score and train on latents, not images).

    ``where``: who refuses, e.g. ``stages prune, samples`` or ``compress-deploy frontier``.
    Also called on the loaded model (:attr:`pipeline.context.RunContext.dense`), for models whose
    configs are not read up front (hub ids).
    """
    why = spec.refusal()
    if not why:
        return
    kinds = [k for k, on in (("conditional", spec.conditioning != "none"), ("latent", spec.latent)) if on]
    raise ModelError(
        f"model {name} {why}: the {' '.join(kinds)} pipeline is not supported by {where} yet; point "
        "model.name at an unconditional pixel-space model (a UNet without vae, text_encoder, tokenizer "
        "or num_class_embeds)"
    )


def check_latent_channels(spec: ModelSpec, name: str) -> None:
    """ModelError, one line, for a latent model whose UNet does not take its VAE's latents (channels)."""
    if spec.vae is None:
        return
    latent = spec.vae.get("latent_channels")
    takes = spec.unet.get("in_channels")
    if isinstance(latent, int) and isinstance(takes, int) and latent != takes:
        raise ModelError(
            f"model {name}: its UNet takes {takes} input channels but its VAE's latents have {latent}; "
            "point model.name at a pipeline whose unet/ and vae/ belong together"
        )


def check_model_settings(cfg: RunConfig, frontier: bool = False, stages: list[str] | None = None) -> None:
    """Refuse a model the stages would get wrong (:func:`check_model_supported`), then, in one
    ConfigError line, every setting of ``cfg`` that cannot work with its model.

    ``frontier``: also check the whole ``frontier`` grid (``compress-deploy frontier``, which takes
    conditioned and latent models as its stages do); otherwise only the lists a latency target over
    levers may move. ``stages``: the stages about to run; a
    conditioned model is refused naming those of them outside :data:`CONDITIONAL_STAGES`
    (:func:`stages_refusing`), and passes when there are none.
    """
    from compressor.models import read_model_spec  # heavy (torch, diffusers): only when checking

    spec = read_model_spec(cfg.model)
    if spec is None:
        return
    if not frontier and not stages:
        check_model_supported(spec, cfg.model.name)
    elif not frontier:
        refusing = stages_refusing(spec, stages)
        if refusing:
            where = f"stage{'s' if len(refusing) > 1 else ''} {', '.join(refusing)}"
            check_model_supported(spec, cfg.model.name, where)
    check_latent_channels(spec, cfg.model.name)
    facts = ModelFacts.from_configs(cfg.model.name, dict(spec.unet), dict(spec.scheduler))
    problems = model_problems(cfg, facts, frontier)
    if cfg.acceptance.min_adherence_ratio is not None and spec.conditioning == "none":
        problems.append(
            "acceptance.min_adherence_ratio is set but the model is unconditional: prompt adherence needs "
            "prompts or classes; unset it"
        )
    if problems:
        raise ConfigError(
            f"settings that cannot work with model {facts.name} ({facts.num_train_timesteps} training "
            f"timesteps, sample size {facts.sample_size}, {facts.levels} levels): {'; '.join(problems)}"
        )


def model_problems(cfg: RunConfig, facts: ModelFacts, frontier: bool = False) -> list[str]:
    """One sentence (key, value, what is allowed) per setting of ``cfg`` that ``facts`` rule out."""
    return [*_step_problems(cfg, facts, frontier), *_size_problems(cfg, facts, frontier)]


def _step_problems(cfg: RunConfig, facts: ModelFacts, frontier: bool) -> list[str]:
    t = facts.num_train_timesteps
    steps: dict[str, int] = {"sample.steps": cfg.sample.steps, "bench.sampler_steps": cfg.bench.sampler_steps,
                             "parity.sampler_steps": cfg.parity.sampler_steps}  # fmt: skip
    if cfg.quality.steps is not None:
        steps["quality.steps"] = cfg.quality.steps
    for i, text in enumerate(cfg.bench.variants or []):
        steps[f"bench.variants[{i}] ({text})"] = SamplerVariant.parse(text, f"bench.variants[{i}]").steps
    if "int8" in cfg.export.precisions:
        steps["export.calibration_steps"] = cfg.export.calibration_steps
    d = cfg.distill_steps
    if d.active:
        steps["distill_steps.start_steps"] = d.start_steps
    levers = _levers(cfg, frontier)
    for i, n in enumerate(cfg.frontier.steps if "steps" in levers else []):
        steps[f"frontier.steps[{i}]"] = n
    above = [(key, n) for key, n in steps.items() if n > t]
    out = [f"{key}={n} is above the model's {t} training timesteps (at most {t}{_start_hint(key, d, t)})"
           for key, n in above]  # fmt: skip
    late = [s for s in cfg.parity.timesteps if s >= t]
    if late:
        out.append(f"parity.timesteps has {', '.join(map(str, late))}: timesteps run from 0 to {t - 1}")
    if cfg.prune.method in ("diff-pruning", "taylor") and cfg.prune.timestep_stride >= t:
        out.append(
            f"prune.timestep_stride={cfg.prune.timestep_stride} leaves only timestep 0 of the model's {t} "
            f"for the Taylor pass (at most {t - 1}; the paper uses 1)"
        )
    students = {"distill_steps.target_steps": d.target_steps} if d.active else {}
    students.update({f"frontier.students[{i}]": n for i, n in enumerate(cfg.frontier.students)
                     if n > 0 and "student" in levers})  # fmt: skip
    divisors = ", ".join(str(n) for n in (1, 2, 4, 5, 8, 10, 20, 25) if t % n == 0)
    for key, n in students.items():
        if n is not None and t % n:
            out.append(f"{key}={n} does not divide the model's {t} training timesteps (e.g. {divisors})")
    return out


def _start_hint(key: str, d: StepDistillConfig, t: int) -> str:
    """For ``distill_steps.start_steps``: the largest ``target_steps`` x 2^k within ``t`` steps."""
    target = d.target_steps
    if key != "distill_steps.start_steps" or not target or 2 * target > t:
        return ""
    n = target
    while 2 * n <= t:
        n *= 2
    return f", e.g. {n} = {target} x {n // target}"


def _size_problems(cfg: RunConfig, facts: ModelFacts, frontier: bool) -> list[str]:
    out = []
    halvings = max(facts.levels - 1, 0)
    if facts.class_name == "UNet2DModel" and facts.sample_size % 2**halvings:
        key = "model.sample_size" if cfg.model.sample_size is not None else "the model's sample_size"
        out.append(
            f"{key}={facts.sample_size}: must be a multiple of {2**halvings}, as the UNet halves it "
            f"{halvings} time{'' if halvings == 1 else 's'} (e.g. "
            f"{facts.sample_size // 2**halvings * 2**halvings or 2**halvings})"
        )
    reuse = cfg.sample.cache_interval > 1 or cfg.export.feature_reuse
    reuse = reuse or ("cache" in _levers(cfg, frontier) and any(n > 1 for n in cfg.frontier.cache_intervals))
    top = facts.levels - 2
    if reuse and not 0 <= cfg.sample.cache_level <= top:
        allowed = f"0..{top}" if top >= 0 else "none: the UNet has one level, so features cannot be reused"
        out.append(f"sample.cache_level={cfg.sample.cache_level}: the UNet's boundaries are {allowed}")
    if cfg.finetune.distill.weight_features > 0:
        kinds = {"down", "up"}
        unknown = [p for p in cfg.finetune.distill.feature_points if p not in facts.blocks and p not in kinds]
        if unknown:
            out.append(
                f"finetune.distill.feature_points has {', '.join(unknown)}, not blocks of this UNet "
                f"(choose from {', '.join(facts.blocks)}, or down, up for all of a kind)"
            )
    return out


def _levers(cfg: RunConfig, frontier: bool) -> list[str]:
    """The frontier levers whose lists are used: all of them for the frontier command, else those a
    latency target over levers may move."""
    if frontier:
        return ["prune", "steps", "scheduler", "cache", "precision", "student"]
    lat = cfg.prune.target_latency
    return list(lat.levers) if lat.uses_frontier else []


def check_stages_asked(cfg: RunConfig, stages: list[str], order: list[str]) -> None:
    """Refuse a setting that asks for a stage the config's stage list (``stages``) lacks, with the fix.

    ``distill_steps.target_steps`` asks for a few-step student, which only the ``distill_steps`` stage
    trains (a latency target whose levers include ``student`` adds the stage itself). ``order``: every
    stage name in pipeline order, for the ``--stages`` the message proposes.
    """
    lat = cfg.prune.target_latency
    adds_itself = lat.uses_frontier and "student" in lat.levers
    if cfg.distill_steps.active and "distill_steps" not in stages and not adds_itself:
        fixed = sorted([*stages, "distill_steps"], key=order.index)
        raise ConfigError(
            f"distill_steps.target_steps={cfg.distill_steps.target_steps} asks for a few-step student, but "
            f"the config's stages ({', '.join(stages)}) lack distill_steps, so none would be trained; add "
            f"distill_steps to `stages:` in the config, or pass --stages {','.join(fixed)}"
        )
