"""Content-addressed stage caching and the run manifest.

A stage's key hashes its resolved config sections and a fingerprint (artifact hashes +
metrics) of every upstream stage it reads. A rerun skips a stage whose key is unchanged
and whose outputs still hash as recorded; otherwise it reruns and says why. Forcing a
stage also forces everything downstream of it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from compressor.config import config_to_dict
from compressor.digest import content_hash
from pipeline.context import RunContext, environment_facts
from rundir import layout
from rundir.artifacts import artifact_matches, read_manifest, write_json
from rundir.records import RecordError, read_record


def _digest(data: object) -> str:
    return content_hash(data)


def fingerprint(run_dir: Path, rec: dict | None) -> str | None:
    """What downstream stages depend on: an upstream record's artifacts and metrics.

    Upstream files that no longer hash as recorded (edited, truncated) give a fingerprint
    of their own, so the stages reading them rerun and meet the damage instead of skipping.
    """
    if rec is None:
        return None
    if not outputs_verify(run_dir, rec):
        return "changed-on-disk"
    return _digest(
        {"status": rec.get("status"), "artifacts": rec.get("artifacts", {}), "metrics": rec.get("metrics")}
    )


def stage_key(ctx: RunContext, name: str, module: ModuleType) -> dict:
    """The parts of a stage's cache key and their combined hash.

    A stage that declares ``ENVIRONMENT`` (library versions, ONNX Runtime's providers,
    the GPU) is keyed on those facts too, so measurements and builds made under
    another environment are not reused. A stage's optional ``key_extra(ctx)`` adds
    settings and facts it reads only in some configurations.
    """
    cfg = config_to_dict(ctx.cfg)
    config = {s: cfg[s] for s in module.SECTIONS if s in cfg}
    extra = getattr(module, "key_extra", None)
    if extra is not None:  # what a stage reads only under some settings (e.g. a latency target)
        config.update(extra(ctx))
    inputs = {up: fingerprint(ctx.run_dir, _upstream(ctx.run_dir, up)) for up in module.INPUTS}
    parts: dict = {"config": _digest(config), "inputs": inputs}
    names = getattr(module, "ENVIRONMENT", [])
    if names:
        facts = environment_facts(ctx.device)
        parts["environment"] = {n: facts.get(n) for n in names}
    return {"key": _digest({"stage": name, **parts}), **parts, "sections": list(module.SECTIONS)}


def _upstream(run_dir: Path, stage: str) -> dict | None:
    """An upstream stage's record as written; a damaged one reads as absent (its stage reruns)."""
    try:
        rec = read_record(run_dir, stage)
    except RecordError:
        return None
    return rec.data if rec else None


def outputs_verify(run_dir: Path, rec: dict) -> bool:
    """True when every artifact in ``rec`` exists with its recorded size and hash."""
    return all(artifact_matches(run_dir / rel, entry) for rel, entry in rec.get("artifacts", {}).items())


def why_rerun(ctx: RunContext, name: str, key: dict, forced: bool) -> str | None:
    """None when the stage can be skipped, else the reason it must run."""
    if forced:
        return "forced with --force"
    try:
        found = read_record(ctx.run_dir, name, done_only=False)
    except RecordError:
        return "its record is damaged"
    if found is None:
        return "not run yet"
    rec = found.data
    if rec.get("status") != "ok":
        return f"last run ended with status {rec.get('status')!r}"
    old = rec.get("cache", {})
    if old.get("key") == key["key"]:
        return None if outputs_verify(ctx.run_dir, rec) else "its outputs are missing or changed"
    if old.get("config") != key["config"]:
        cfg = config_to_dict(ctx.cfg)
        before = rec.get("config", {})
        sections = [s for s in key.get("sections", before) if s in cfg and before.get(s) != cfg[s]]
        return f"its config changed ({', '.join(sections)})" if sections else "its config changed"
    env_old, env_new = old.get("environment", {}), key.get("environment", {})
    if env_old != env_new:
        diffs = [f"{n} {env_old.get(n)} -> {v}" for n, v in env_new.items() if env_old.get(n) != v]
        return f"its environment changed ({'; '.join(diffs)})"
    changed = [up for up, fp in key["inputs"].items() if old.get("inputs", {}).get(up) != fp]
    return f"input from {', '.join(changed)} changed" if changed else "its cache key changed"


def dependents(stages: dict[str, ModuleType], roots: set[str]) -> set[str]:
    """``roots`` and every stage that (transitively) reads one of them."""
    out = set(roots)
    grew = True
    while grew:
        grew = False
        for name, module in stages.items():
            if name not in out and out & set(module.INPUTS):
                out.add(name)
                grew = True
    return out


def update_manifest(ctx: RunContext, name: str, rec: dict) -> None:
    """Replace ``name``'s entries in ``RUN/manifest.json`` with the artifacts of ``rec``."""
    manifest = read_manifest(ctx.run_dir)
    arts = {k: v for k, v in manifest.get("artifacts", {}).items() if v.get("stage") != name}
    for rel, entry in rec.get("artifacts", {}).items():
        arts[rel] = {
            **entry,
            "stage": name,
            "config": rec.get("config", {}),
            "versions": rec.get("versions", {}),
        }
    out = {"config_name": ctx.cfg.name, "artifacts": dict(sorted(arts.items()))}
    if "records" in manifest:  # the records' hashes (written with each record, see RunContext.write_record)
        out["records"] = manifest["records"]
    write_json(layout.manifest_path(ctx.run_dir), out)
