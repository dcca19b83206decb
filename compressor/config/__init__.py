"""Typed, validated run configuration.

A YAML file loads into :class:`RunConfig`. Every field is declared once, with its type, default
and allowed range; unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the dotted key. Command-line ``key=value`` overrides are parsed as YAML scalars and go
through the same validation.

Each section lives in the module of what it configures (``<section>_config``, so that no file
name repeats a module the section configures, such as ``compressor/training.py``); this package
re-exports every name, so ``from compressor.config import ...`` is the one import:

- ``fields``: the generic machinery (``_spec``, coercion and range checks, ``field_spec``,
  ``check_value``, ``parse_value``, ``describe_field``, ``parse_override``, ``apply_overrides``,
  ``config_to_dict``) and the shared types ``Backend``, ``BACKENDS``, ``Scheduler``
- ``model_config``: ``model``, ``data``
- ``prune_config``: ``prune`` and ``prune.target_latency``; ``prune_target_overrides``
- ``training_config``: ``finetune``, ``finetune.distill``, ``distill_steps``
- ``sampling_config``: ``sample``, ``quality``
- ``deploy_config``: ``export``, ``parity``, ``bench``, ``build``, and ``ServeConfig`` (the serve flags)
- ``acceptance_config``: ``acceptance``
- ``frontier_config``: ``frontier``
- ``run_config``: ``RunConfig`` (the top-level keys, the rules between sections), ``DEFAULT_STAGES``,
  ``config_from_mapping``, ``load_config``
"""

from __future__ import annotations

from compressor.config.acceptance_config import AcceptanceConfig
from compressor.config.deploy_config import BenchConfig, BuildConfig, ExportConfig, ParityConfig, ServeConfig
from compressor.config.fields import (
    BACKENDS,
    Backend,
    Scheduler,
    apply_overrides,
    check_value,
    config_to_dict,
    describe_field,
    field_spec,
    parse_override,
    parse_value,
)
from compressor.config.frontier_config import FrontierConfig
from compressor.config.model_config import DataConfig, ModelConfig
from compressor.config.prune_config import LatencyTarget, PruneConfig, prune_target_overrides
from compressor.config.run_config import DEFAULT_STAGES, RunConfig, config_from_mapping, load_config
from compressor.config.sampling_config import QualityConfig, SampleConfig
from compressor.config.training_config import DistillConfig, FinetuneConfig, StepDistillConfig
from compressor.errors import ConfigError
from compressor.stack import SamplerVariant

__all__ = [
    "BACKENDS",
    "DEFAULT_STAGES",
    "AcceptanceConfig",
    "Backend",
    "BenchConfig",
    "BuildConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "FinetuneConfig",
    "FrontierConfig",
    "LatencyTarget",
    "ModelConfig",
    "ParityConfig",
    "PruneConfig",
    "QualityConfig",
    "RunConfig",
    "SampleConfig",
    "SamplerVariant",
    "Scheduler",
    "ServeConfig",
    "StepDistillConfig",
    "apply_overrides",
    "check_value",
    "config_from_mapping",
    "config_to_dict",
    "describe_field",
    "field_spec",
    "load_config",
    "parse_override",
    "parse_value",
    "prune_target_overrides",
]
