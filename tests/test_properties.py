"""Property-based tests: arbitrary config input gives a valid config or one clean ConfigError."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.config import RunConfig, apply_overrides, config_from_mapping, load_config, parse_override
from compressor.errors import ConfigError

KEYS = [
    "prune",
    "ratio",
    "target_macs",
    "threshold",
    "model",
    "name",
    "init",
    "finetune",
    "lr",
    "steps",
    "bench",
    "batch_sizes",
    "backends",
    "seed",
    "stages",
    "data",
    "source",
    "x",
    "",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["digits", "random", "pretrained", "diff-pruning", "fp16", "0.3"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=12,
)
mappings = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_or_clean(fn, *args):
    try:
        result = fn(*args)
    except ConfigError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        return None
    return result


@SETTINGS
@given(mappings)
def test_arbitrary_mappings_validate_or_fail_cleanly(data):
    cfg = _valid_or_clean(config_from_mapping, data)
    assert cfg is None or isinstance(cfg, RunConfig)


@SETTINGS
@given(st.lists(st.text(max_size=40), max_size=4))
def test_arbitrary_overrides_validate_or_fail_cleanly(overrides):
    cfg = _valid_or_clean(config_from_mapping, {}, overrides)
    assert cfg is None or isinstance(cfg, RunConfig)


@SETTINGS
@given(
    st.sampled_from(["prune.ratio", "finetune.lr", "model.name", "bench.batch_sizes", "seed", "stages"]),
    st.text(max_size=30),
)
def test_overrides_of_real_keys_with_arbitrary_values(key, raw):
    _valid_or_clean(config_from_mapping, {}, [f"{key}={raw}"])


@SETTINGS
@given(st.text(max_size=60))
def test_override_parser_never_crashes(text):
    parsed = _valid_or_clean(parse_override, text)
    if parsed is not None:
        keys, _ = parsed
        assert keys and all(k.isidentifier() for k in keys)
        _valid_or_clean(apply_overrides, {}, [text])


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_yaml_files_load_or_fail_cleanly(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        cfg = _valid_or_clean(load_config, path)
        assert cfg is None or isinstance(cfg, RunConfig)
