"""Config loading: every shipped config validates; bad values name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.config import RunConfig, config_from_mapping, config_to_dict, load_config, parse_override
from compressor.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == path.stem
    first = path.read_text().splitlines()[:6]
    assert any(f"compress-deploy configs/{path.name}" in line for line in first), first


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prune": {"ratio": 1.5}}, "prune.ratio: expected a number in [0.0, 1.0), got 1.5"),
        ({"prune": {"threshold": -0.1}}, "prune.threshold: expected a number in [0.0, 1.0), got -0.1"),
        ({"prune": {"ratio": "big"}}, "prune.ratio: expected a number"),
        ({"prune": {"method": "l1"}}, "prune.method: expected one of 'diff-pruning'"),
        ({"prune": {"rattio": 0.3}}, "prune.rattio: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"finetune": {"lr": 0}}, "finetune.lr: expected a number > 0.0, got 0"),
        ({"finetune": {"steps": 1.5}}, "finetune.steps: expected an integer >= 0, got 1.5"),
        ({"prune": {"timestep_stride": True}}, "prune.timestep_stride: expected an integer"),
        ({"model": "digits"}, "model: expected a mapping"),
        ({"stages": []}, "stages: expected a non-empty list"),
        ({"prune": {"ratio": 0.3, "target_macs": 0.5}}, "give exactly one"),
        ({"quality": {"num_samples": "many"}}, "quality.num_samples: expected an integer >= 2 or 'auto'"),
        ({"quality": {"num_samples": 1}}, "quality.num_samples: expected an integer >= 2"),
        ({"acceptance": {"max_fd_increase": 0}}, "acceptance.max_fd_increase: expected a number > 0.0"),
    ],
)
def test_bad_values_name_the_dotted_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_mapping(data)
    assert message in str(err.value)


def test_defaults_live_in_the_dataclasses():
    cfg = config_from_mapping({})
    assert cfg.prune.method == "diff-pruning"
    assert cfg.prune.threshold == 0.05
    assert cfg.finetune.lr == 2e-4
    assert cfg.finetune.ema_decay == 0.9999


def test_quality_samples_may_be_auto():
    cfg = config_from_mapping({}, ["quality.num_samples=auto", "quality.max_samples=3072"])
    assert cfg.quality.num_samples == "auto" and cfg.quality.max_samples == 3072
    assert cfg.quality.fixed_samples == cfg.quality.chunk_samples == 1024
    assert config_from_mapping({}, ["quality.num_samples=300"]).quality.fixed_samples == 300


def test_overrides_go_through_the_same_validation():
    cfg = config_from_mapping({}, ["prune.ratio=0.3", "model.init=random", "prune.round_to=8"])
    assert cfg.prune.ratio == 0.3 and cfg.model.init == "random" and cfg.prune.round_to == 8
    with pytest.raises(ConfigError, match=r"prune.ratio: expected a number in \[0.0, 1.0\), got 1.5"):
        config_from_mapping({}, ["prune.ratio=1.5"])
    with pytest.raises(ConfigError, match="prune.nope: unknown key"):
        config_from_mapping({}, ["prune.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config_from_mapping({}, ["prune.ratio"])


def test_exponent_numbers_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML) reads 5e-4 as text; a number field takes it as the number it writes."""
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lr: 5e-4\n")
    assert load_config(path).finetune.lr == 5e-4
    assert config_from_mapping({}, ["distill_steps.lr=2e-4"]).distill_steps.lr == 2e-4
    with pytest.raises(ConfigError, match="finetune.lr: expected a number > 0.0, got 'nan'"):
        config_from_mapping({"finetune": {"lr": "nan"}})


def test_override_can_clear_a_target_with_null():
    cfg = config_from_mapping({"prune": {"target_macs": 0.5}}, ["prune.target_macs=null", "prune.ratio=0.3"])
    assert cfg.prune.target_macs is None and cfg.prune.ratio == 0.3


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=hello") == (["a"], "hello")
    with pytest.raises(ConfigError):
        parse_override("1a=2")


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("prune:\n  ratio: [0.3\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_config(p)


def test_name_defaults_to_file_stem(tmp_path):
    p = tmp_path / "my-run.yaml"
    p.write_text("seed: 3\n")
    cfg = load_config(p)
    assert cfg.name == "my-run" and cfg.seed == 3


def test_missing_target_is_reported_by_the_prune_config():
    cfg = config_from_mapping({})
    with pytest.raises(ConfigError, match="no pruning target"):
        cfg.prune.require_target()


def test_one_place_sets_a_pruning_target_and_nulls_the_others():
    from compressor.config import prune_target_overrides

    base = load_config(CONFIGS[0].parent / "demo.yaml")  # target_macs 0.57
    at = config_from_mapping(config_to_dict(base), prune_target_overrides(ratio=0.3)).prune
    assert (at.ratio, at.target_macs, at.target_params, at.target_latency.active) == (0.3, None, None, False)
    assert at.method == base.prune.method
    dense = config_from_mapping(config_to_dict(base), prune_target_overrides(ratio=0.0)).prune
    assert dense.method == "magnitude"  # nothing removed: no importance pass
    macs = config_from_mapping(config_to_dict(base), prune_target_overrides(target_macs=0.4)).prune
    assert (macs.ratio, macs.target_macs) == (None, 0.4)
    with pytest.raises(ValueError, match="exactly one"):
        prune_target_overrides(ratio=0.3, target_macs=0.4)


def test_the_config_package_exports_every_section_and_no_module_is_long():
    """``compressor/config/`` keeps each section beside what it configures: every section is importable
    from the package, and no module of it grows past 400 lines."""
    import dataclasses
    import typing

    import compressor.config as package

    sections, todo = set(), [RunConfig]
    while todo:
        for tp in typing.get_type_hints(todo.pop()).values():
            if dataclasses.is_dataclass(tp) and tp not in sections:
                sections.add(tp)
                todo.append(tp)
    assert len(sections) >= 15
    assert [cls.__name__ for cls in sections if getattr(package, cls.__name__, None) is not cls] == []
    assert [name for name in package.__all__ if not hasattr(package, name)] == []
    folder = Path(package.__file__).parent
    lengths = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert len(lengths) > 5
    assert {name: n for name, n in lengths.items() if n > 400} == {}, "split the long config module"
