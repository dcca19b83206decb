"""One content hash for every cache key, and the spread over seeds the sweeps summarise."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from compressor.digest import content_hash, mean_std

ROOT = Path(__file__).resolve().parent.parent


def test_content_hash_keeps_the_keys_existing_caches_were_written_with():
    data = {"b": [1, 2.5, None], "a": {"z": Path("/x"), "y": "s"}}
    legacy = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    assert content_hash(data) == legacy and len(legacy) == 64
    for length in (12, 16, 20):  # the distillation sweep's, the frontier's, the latency tables'
        assert content_hash(data, length) == legacy[:length]
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})  # key order is not content
    assert content_hash({"a": 1}) != content_hash({"a": 2})


def test_every_cache_hashes_through_the_one_helper():
    """No module of the project hashes JSON for a cache key on its own any more."""
    packages = ("compressor", "rundir", "pipeline", "deploy", "export", "scripts")
    sources = [p for d in packages for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 50
    own = [str(p.relative_to(ROOT)) for p in sources if "hashlib.sha256(json.dumps" in p.read_text()]
    assert own == ["compressor/digest.py"]


def test_mean_std_over_seeds():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert (
        mean_std([4.0, None]) == (4.0, 0.0)
        and mean_std([None]) == (None, None)
        and mean_std([]) == (None, None)
    )
