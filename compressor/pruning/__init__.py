"""Diff-Pruning and its baselines on diffusers UNets, through torch-pruning, and the ratio searches.

- :mod:`compressor.pruning.structure` - the structural driver (:func:`prune_structure`), the repairs
  of what torch-pruning leaves stale in diffusers modules, resolution levels, replay.
- :mod:`compressor.pruning.search` - the ratio for a MACs/params target (:func:`search_ratio`) and
  for a measured latency target (:class:`LatencySearch`: uniform ratios, bisection, per-level
  allocation), timed through a :class:`Timer` that ``deploy.latency`` supplies.
- :mod:`compressor.pruning.driver` - :func:`prune_unet`: the ratio, the Taylor pass
  (:mod:`compressor.taylor`), the pruning, and the :class:`PruneResult` describing it.

Every name is importable from ``compressor.pruning`` itself.
"""

from compressor.pruning.driver import PruneResult, prune_unet
from compressor.pruning.search import (
    LatencySearch,
    Timer,
    allocate_levels,
    cache_dir,
    kept_fraction,
    level_latency_table,
    monotone_savings,
    pruned_copy,
    search_latency,
    search_ratio,
    structure_trial,
    table_key,
    time_ratios,
    uniform_ratios,
)
from compressor.pruning.structure import (
    attention_modules,
    build_pruner,
    head_dims,
    importance_by_level,
    layer_widths,
    level_blocks,
    level_of_modules,
    level_ratio_dict,
    preserve_attention_scale,
    prune_structure,
    pruned_heads,
    reinitialize,
    replay_history,
    set_attention_heads,
    stem_ratio,
    sync_module_attributes,
    uses_whole_heads,
)

__all__ = [
    "LatencySearch",
    "PruneResult",
    "Timer",
    "allocate_levels",
    "attention_modules",
    "build_pruner",
    "cache_dir",
    "head_dims",
    "importance_by_level",
    "kept_fraction",
    "layer_widths",
    "level_blocks",
    "level_latency_table",
    "level_of_modules",
    "level_ratio_dict",
    "monotone_savings",
    "preserve_attention_scale",
    "prune_structure",
    "pruned_heads",
    "set_attention_heads",
    "uses_whole_heads",
    "prune_unet",
    "pruned_copy",
    "reinitialize",
    "replay_history",
    "search_latency",
    "search_ratio",
    "stem_ratio",
    "structure_trial",
    "sync_module_attributes",
    "table_key",
    "time_ratios",
    "uniform_ratios",
]
