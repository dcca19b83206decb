"""Engine metadata, compatibility checks and optimisation profiles (plain Python).

An engine runs only with the TensorRT version and GPU architecture that built it. Each
engine file ``unet.engine`` has its metadata ``unet.engine.json`` beside it (the "engine
info"; the run's *manifest* is ``RUN/manifest.json``) recording the sha256 of the ONNX it
came from and of the engine, the TensorRT version, GPU name and compute capability, the
profile, the precision and the build time. Loading checks the engine info first and
refuses a mismatched or tampered engine with one line telling the user to rebuild.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import ArtifactError, ConfigError, UserError
from rundir.layout import engine_info_path

REBUILD = "rebuild the engines here with `compress-deploy build RUN` (it needs only the ONNX files)"


@dataclass(frozen=True)
class Profile:
    """One optimisation profile over the batch axis (min <= opt <= max)."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def validate(self) -> None:
        """Raise ConfigError unless 1 <= min <= opt <= max."""
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"build profile: need 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}; fix build.min_batch/opt_batch/max_batch"
            )

    def shapes(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shapes of every engine input, from each input's per-sample shape.

        ``inputs`` as :func:`export.onnx_export.onnx_input_shapes` reads them from the graph:
        ``{"sample": (C, H, W), "timestep": ()}`` plus ``feature`` for a shallow pass.
        """
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        return {name: tuple((b, *dims) for b in batches) for name, dims in inputs.items()}

    def check_batch(self, batch: int, engine: Path) -> None:
        """Raise UserError for a batch size the engine was not built for."""
        if not self.min_batch <= batch <= self.max_batch:
            raise UserError(
                f"batch {batch} is outside the profile of {engine} ({self.min_batch}..{self.max_batch}); "
                "use a batch in range or rebuild with build.min_batch/max_batch covering it"
            )


def write_engine_info(engine: Path, info: dict) -> Path:
    """Write the engine's metadata atomically beside ``engine``."""
    path = engine_info_path(engine)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
    return path


def read_engine_info(engine: Path) -> dict:
    """The metadata of ``engine``; ArtifactError when it or the engine is missing or damaged."""
    path = engine_info_path(engine)
    if not engine.is_file():
        raise ArtifactError(f"engine {engine} not found; {REBUILD}")
    if not path.is_file():
        raise ArtifactError(f"engine {engine} has no engine info {path.name}; {REBUILD}")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: damaged engine info; {REBUILD}") from None
    for key in (
        "tensorrt_version",
        "gpu_name",
        "compute_capability",
        "engine_sha256",
        "profile",
        "precision",
    ):
        if key not in info:
            raise ArtifactError(f"{path}: engine info lacks {key!r}; {REBUILD}")
    return info


def check_compatible(info: dict, engine: Path, tensorrt_version: str, gpu_name: str, capability: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture."""
    built = (info["tensorrt_version"], info["compute_capability"])
    if info["tensorrt_version"] != tensorrt_version:
        raise ArtifactError(
            f"{engine} was built with TensorRT {built[0]}, this is TensorRT {tensorrt_version}; {REBUILD}"
        )
    if info["compute_capability"] != capability and not info.get("hardware_compatible"):
        raise ArtifactError(
            f"{engine} was built for {info['gpu_name']} (compute capability {built[1]}), this is "
            f"{gpu_name} ({capability}); {REBUILD}"
        )


def check_integrity(info: dict, engine: Path, sha256: str) -> None:
    """Refuse an engine whose bytes differ from what its build recorded."""
    if info["engine_sha256"] != sha256:
        raise ArtifactError(f"{engine} does not match its engine info (truncated or replaced); {REBUILD}")


def profile_of(info: dict) -> Profile:
    p = info["profile"]
    return Profile(p["min_batch"], p["opt_batch"], p["max_batch"])
