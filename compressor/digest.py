"""Content hashes for cache keys, and small summaries over seeds: one place for every cache and sweep.

Every content-hashed cache of the project (the pipeline's stage cache, the frontier's points, the
latency tables of the pruning search, the sweeps' cells, the encoded latents and text) keys its
entries with :func:`content_hash`: the sha256 of the data's canonical JSON (sorted keys, ``str`` for
what JSON cannot hold), cut to the length that cache has always used, so existing caches keep their
keys; over bytes too large for JSON (weights, pixels) with :func:`stream_hash`.
No torch here: the run directory's bookkeeping imports it.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Iterable


def content_hash(data: object, length: int | None = None) -> str:
    """The sha256 hex digest of ``data``'s canonical JSON (sorted keys, ``default=str``), its first
    ``length`` characters when given (the whole 64 otherwise)."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    return digest if length is None else digest[:length]


def stream_hash(chunks: Iterable[bytes]) -> str:
    """The sha256 hex digest of ``chunks`` fed in order: for keys over bytes too large to hold as JSON
    (a module's weights, a dataset's pixels; :mod:`compressor.encoded_cache`)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not None (std 0 for one value;
    (None, None) for none): a figure's spread over seeds."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else 0.0)
