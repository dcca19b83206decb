"""The whole run (:class:`RunConfig`): its top-level keys, its sections, the rules between
sections, and loading a YAML file or a mapping (plus ``key=value`` overrides) into it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from compressor.config.acceptance_config import AcceptanceConfig
from compressor.config.deploy_config import BenchConfig, BuildConfig, ExportConfig, ParityConfig
from compressor.config.fields import _build, _spec, apply_overrides
from compressor.config.frontier_config import FrontierConfig
from compressor.config.model_config import DataConfig, ModelConfig
from compressor.config.prune_config import PruneConfig
from compressor.config.sampling_config import QualityConfig, SampleConfig
from compressor.config.training_config import FinetuneConfig, StepDistillConfig
from compressor.errors import ConfigError
from compressor.stack import SamplerVariant

DEFAULT_STAGES = (
    "prune",
    "finetune",
    "distill_steps",
    "samples",
    "export",
    "build",
    "quality",
    "parity",
    "bench",
    "check",
    "report",
)


@dataclass
class RunConfig:
    """The whole run: one section per pipeline concern."""

    name: str = _spec("run", "run name (default: the config file's stem)")
    seed: int = _spec(0, "global seed", ge=0)
    device: Literal["auto", "cpu", "cuda"] = _spec("auto", "torch device")
    threads: int | None = _spec(None, "torch CPU threads", ge=1)
    stages: list[str] = _spec(list(DEFAULT_STAGES), "stages run when --stages is not given")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill_steps: StepDistillConfig = field(default_factory=StepDistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)

    def check(self) -> None:
        """Cross-field rules that single-field checks cannot express."""
        variants = [str(v) for v in self.bench.sampler_variants()]  # each parsed, errors name the entry
        if "int8" in self.export.precisions and "fp32" not in self.export.precisions:
            raise ConfigError("export.precisions: int8 is quantized from the fp32 export; list fp32 too")
        if self.acceptance.variant is not None:
            wanted = str(SamplerVariant.parse(self.acceptance.variant, "acceptance.variant"))
            if wanted not in variants:
                raise ConfigError(
                    f"acceptance.variant={self.acceptance.variant}: bench does not time it; add it to "
                    f"bench.variants (now {', '.join(variants)})"
                )
        d = self.finetune.distill
        if d.weight_task + d.weight_output + d.weight_features == 0:
            raise ConfigError(
                "finetune.distill: weight_task, weight_output and weight_features are all 0, so the "
                "finetune has no loss; set weight_task=1 (the plain loss) or a distillation weight"
            )
        self._check_distill_steps()
        targets = self.prune.targets()
        b = self.build
        if not b.min_batch <= b.opt_batch <= b.max_batch:
            raise ConfigError(
                "build: need min_batch <= opt_batch <= max_batch, got "
                f"{b.min_batch}/{b.opt_batch}/{b.max_batch}"
            )
        if self.prune.search == "latency" and not self.prune.target_latency.active:
            raise ConfigError(
                "prune.search=latency allocates channels under a measured latency target; set "
                "prune.target_latency.speedup or prune.target_latency.ms (and prune.target_macs=null)"
            )
        lat = self.prune.target_latency
        if lat.uses_frontier and lat.what != "sampler":
            raise ConfigError(
                f"prune.target_latency.levers={list(lat.levers)}: steps, solver, reuse and precision act on "
                "the whole sampler; set prune.target_latency.what=sampler"
            )
        if lat.uses_frontier and self.prune.search == "latency":
            raise ConfigError(
                "prune.target_latency.levers: the frontier picks the pruning ratio among frontier.ratios; "
                "use prune.search=uniform (or levers: [prune] for the per-level latency search)"
            )
        if len(targets) > 1:
            extra = " ".join(f"prune.{k}=null" for k in targets[1:])
            raise ConfigError(
                f"prune: {', '.join('prune.' + k for k in targets)} are all set; give exactly one "
                f"(e.g. add `{extra}`)"
            )

    def _check_distill_steps(self) -> None:
        """``distill_steps``: start_steps = target_steps x 2^k (k >= 1)."""
        d = self.distill_steps
        if d.target_steps is None:
            return
        n = d.start_steps
        while n > d.target_steps and n % 2 == 0:
            n //= 2
        if n != d.target_steps or d.start_steps == d.target_steps:
            raise ConfigError(
                f"distill_steps.start_steps={d.start_steps} must be distill_steps.target_steps="
                f"{d.target_steps} times a power of two (each round halves the steps), e.g. "
                f"start_steps={d.target_steps * 8}"
            )


def config_from_mapping(data: Any, overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw mapping (plus overrides) into a :class:`RunConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    cfg = _build(RunConfig, data, "")
    cfg.check()
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML config file; ``name`` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; pass a YAML config") from None
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    elif data is None:
        data = {"name": path.stem}
    return config_from_mapping(data, overrides)
