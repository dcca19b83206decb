"""Engine metadata, compatibility checks and optimisation profiles (plain Python).

An engine runs only with the TensorRT version and GPU architecture that built it. Each
engine file ``unet.engine`` has its metadata ``unet.engine.json`` beside it (the "engine
info"; the run's *manifest* is ``RUN/manifest.json``) recording the sha256 of the ONNX it
came from and of the engine, the TensorRT version, GPU name and compute capability, the
profile, the precision and the build time. Loading checks the engine info first and
refuses a mismatched or tampered engine with one line telling the user to rebuild.

Which engines a run builds (:func:`run_graphs`, read from its exported graphs, no TensorRT needed):
the dense and compressed UNets (and feature reuse's passes); a conditioned UNet over UNet rows,
twice the images under classifier-free guidance; a conditional model's shared text encoder and VAE
decoder (``RUN/build/shared/<graph>.plan``) over images. Each input's per-item shape is the graph's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from compressor.config import BuildConfig
from compressor.errors import ArtifactError, ConfigError, ModelError, UserError
from compressor.persist import read_structure
from export.onnx_export import CONDITION_INPUTS, INPUT_NAMES, onnx_input_shapes
from rundir import layout
from rundir.layout import engine_info_path
from rundir.records import RecordError, final_model_dir, read_record

REBUILD = "rebuild the engines here with `compress-deploy build RUN` (it needs only the ONNX files)"


SPATIAL_INPUTS = ("sample", "latent_sample")  # (C, h, w) inputs whose side a size range varies


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: the batch axis (min <= opt <= max) and, where a size range is built,
    the side of the spatial inputs (``sizes``: min, opt, max in the inputs' own units, latents for a
    latent model; None: each graph's own size)."""

    min_batch: int
    opt_batch: int
    max_batch: int
    sizes: tuple[int, int, int] | None = None

    def validate(self) -> None:
        """Raise ConfigError unless 1 <= min <= opt <= max (batches and sizes)."""
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"build profile: need 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}; fix build.min_batch/opt_batch/max_batch"
            )
        if self.sizes is not None and not 1 <= self.sizes[0] <= self.sizes[1] <= self.sizes[2]:
            raise ConfigError(
                f"build profile: sizes {list(self.sizes)} are not min <= opt <= max; fix build.sizes"
            )

    @property
    def static(self) -> bool:
        """One shape only (min = opt = max on every axis): TensorRT's fastest engine."""
        same = self.min_batch == self.opt_batch == self.max_batch
        return same and (self.sizes is None or len(set(self.sizes)) == 1)

    def shapes(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shapes of every engine input, from each input's per-sample shape.

        ``inputs`` as :func:`export.onnx_export.onnx_input_shapes` reads them from the graph:
        ``{"sample": (C, H, W), "timestep": ()}`` plus ``feature`` for a shallow pass, a conditioned
        UNet's ``encoder_hidden_states`` (tokens, width) / ``class_labels`` (), a text encoder's
        ``input_ids`` (tokens,), a VAE decoder's ``latent_sample`` (C, h, w). The batch varies, and the
        side of ``sample`` / ``latent_sample`` where :attr:`sizes` is set.
        """
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        out = {}
        for name, dims in inputs.items():
            rows = []
            for i, b in enumerate(batches):
                item = tuple(dims)
                if self.sizes is not None and name in SPATIAL_INPUTS and len(item) == 3:
                    item = (item[0], self.sizes[i], self.sizes[i])
                rows.append((b, *item))
            out[name] = tuple(rows)
        return out

    def scaled(self, factor: int) -> Profile:
        """The same profile counting ``factor`` rows per item (a guided UNet runs 2 rows per image)."""
        return Profile(self.min_batch * factor, self.opt_batch * factor, self.max_batch * factor, self.sizes)

    def check_batch(self, batch: int, engine: Path) -> None:
        """Raise UserError for a batch size the engine was not built for."""
        if not self.min_batch <= batch <= self.max_batch:
            raise UserError(
                f"batch {batch} is outside the profile of {engine} ({self.min_batch}..{self.max_batch}); "
                "use a batch in range or rebuild with build.min_batch/max_batch (build.shapes) covering it"
            )

    def record(self) -> dict:
        """The engine info's ``profile``: min/opt/max batch (and sizes, when a size range was built)."""
        out: dict = {"min_batch": self.min_batch, "opt_batch": self.opt_batch, "max_batch": self.max_batch}
        if self.sizes is not None:
            out["sizes"] = list(self.sizes)
        return out


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
    """The profile an engine info records."""
    p = info["profile"]
    sizes = tuple(int(s) for s in p["sizes"]) if p.get("sizes") else None
    return Profile(p["min_batch"], p["opt_batch"], p["max_batch"], sizes)  # type: ignore[arg-type]


def covers(info: dict, name: str, shape: tuple[int, ...]) -> bool:
    """Whether an engine's recorded profile shapes (``profile_shapes``; else its batch profile over the
    recorded per-item ``inputs``) take input ``name`` at ``shape``."""
    shapes = info.get("profile_shapes") or {
        k: [list(r) for r in v]
        for k, v in profile_of(info).shapes({n: tuple(d) for n, d in info.get("inputs", {}).items()}).items()
    }
    if name not in shapes:
        return False
    lo, _, hi = shapes[name]
    return len(shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True))


def check_shapes(info: dict, shapes: dict[str, tuple[int, ...]], engine: Path) -> None:
    """UserError (one line: the engine, the input, its shape, the profile and the ``build.shapes`` fix)
    for an input shape outside an engine's recorded profile (:func:`covers`)."""
    for name, shape in shapes.items():
        if covers(info, name, shape):
            continue
        known = info.get("profile_shapes", {}).get(name)
        span = f" ({known[0]}..{known[2]})" if known else ""
        raise UserError(
            f"{engine}: input {name} of shape {list(shape)} is outside the profile it was built for{span}; "
            "call it within that profile or rebuild with build.shapes (static: one shape at build.opt_batch; "
            "dynamic: build.min_batch..max_batch, build.sizes) covering it"
        )


# -- the engines a run builds (read from its exported graphs; nothing here needs TensorRT) ----------


@dataclass(frozen=True)
class GraphBuild:
    """One engine a run builds: its record key, the ONNX graph it comes from, where it goes, its
    profile (over the graph's batch axis) and each input's per-item shape (from the graph)."""

    key: str  # metrics.engines key: dense, pruned, dense.full, ..., shared.text_encoder
    label: str
    part: str  # unet | full | shallow | text_encoder | vae_decoder
    onnx: Path
    engine: Path
    profile: Profile
    inputs: dict[str, tuple[int, ...]]
    precision: str  # the engine's: the ONNX file's


def _graph_inputs(src: Path, sized: bool = False) -> dict[str, tuple[int, ...]]:
    """The graph's inputs' per-item shapes; ArtifactError for a dimension besides the batch that is
    not fixed (the profile covers the batch only), but for the side of a spatial input when ``sized``
    (a size range fills it in)."""
    inputs = onnx_input_shapes(src)
    for name, dims in inputs.items():
        free = [i for i, d in enumerate(dims) if d <= 0]
        if sized and name in SPATIAL_INPUTS and len(dims) == 3 and set(free) <= {1, 2}:
            continue
        if free:
            raise ArtifactError(
                f"{src}: input {name} has a dynamic dimension besides the batch (per item {list(dims)}); "
                "the engine profile varies the batch only: re-export it with the export stage"
            )
    return inputs


def _output_dims(src: Path) -> dict[str, tuple[int, ...]]:
    """Each output of a graph and its per-item shape (the VAE decoder's image size)."""
    proto = onnx.load(str(src), load_external_data=False)
    return {
        v.name: tuple(int(d.dim_value) for d in v.type.tensor_type.shape.dim[1:]) for v in proto.graph.output
    }


def unet_downsampling(run_dir: Path) -> int:
    """How many times the run's UNet halves its input side (2 ** (down blocks - 1)), from the final
    model's structure file; ArtifactError when the run has none."""
    try:
        config = read_structure(final_model_dir(run_dir)[1])["unet_config"]
    except (ModelError, RecordError, KeyError):
        raise ArtifactError(
            f"{run_dir}: no compressed model's structure to read the UNet's downsampling from; build.sizes "
            "needs the run's prune stage (or leave build.sizes unset)"
        ) from None
    return 2 ** (len(config["down_block_types"]) - 1)


def _vae_factor(vae_onnx: Path | None) -> int:
    """Pixels per latent from the exported VAE decoder's input and output (1 without one)."""
    if vae_onnx is None or not vae_onnx.is_file():
        return 1
    latent = onnx_input_shapes(vae_onnx)["latent_sample"]
    image = _output_dims(vae_onnx)["sample"]
    return image[-1] // latent[-1] if latent[-1] > 0 and image[-1] > 0 else 1


def _exported_vae(run_dir: Path, precision: str) -> Path | None:
    """The exported VAE decoder graph a build at ``precision`` takes (None when the export wrote none)."""
    record = read_record(run_dir, "export")
    files = record.metrics.get("files", {}) if record is not None else {}
    vae = _shared_precision(run_dir, files, "vae_decoder", precision)
    return layout.shared_onnx_path(run_dir, "vae_decoder", vae) if vae else None


def sized_graphs_needed(run_dir: Path, cfg: BuildConfig) -> bool:
    """Whether ``build.sizes`` asks for sides other than the model's, so the build needs the UNet and VAE
    decoder graphs exported with dynamic height and width (:func:`rundir.layout.sized_onnx_path`,
    :mod:`export.sized_graphs`); False without build.sizes or before the export."""
    src = layout.onnx_path(run_dir, "dense", cfg.precision)
    if cfg.sizes is None or not src.is_file():
        return False
    side = onnx_input_shapes(src)["sample"][-1]
    return side > 0 and set(cfg.sizes) != {side * _vae_factor(_exported_vae(run_dir, cfg.precision))}


def check_sizes(run_dir: Path, cfg: BuildConfig) -> None:
    """ConfigError (one line, with the fix) for ``build.sizes`` the run's UNet cannot take (its downsampling
    times the VAE's, a non-square model), read from the exported graphs; nothing before the export."""
    src = layout.onnx_path(run_dir, "dense", cfg.precision)
    if cfg.sizes is not None and src.is_file():
        size_range(run_dir, cfg, onnx_input_shapes(src)["sample"], _exported_vae(run_dir, cfg.precision))


def _sized_source(
    run_dir: Path, src: Path, graph: str, precision: str, sizes: tuple[int, int, int] | None
) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The graph an engine over ``sizes`` is built from, with its inputs: ``src`` when it takes them
    (no size range, or the range is its own side), else the build's graph of dynamic height and width
    (ArtifactError naming how to make it when it is not there)."""
    inputs = _graph_inputs(src, sizes is not None)
    spatial = [inputs[n] for n in SPATIAL_INPUTS if n in inputs]
    if sizes is None or not spatial or spatial[0][1] <= 0 or set(sizes) == {spatial[0][1]}:
        return src, inputs
    sized = layout.sized_onnx_path(run_dir, graph, precision)
    if not sized.is_file():
        raise ArtifactError(
            f"{sized} not found: build.sizes needs the {graph} graph exported with dynamic height and "
            "width, which the build stage writes (compress-deploy CONFIG --stages build, or compress-deploy "
            "build RUN)"
        )
    return sized, _graph_inputs(sized, True)


def size_range(
    run_dir: Path, cfg: BuildConfig, unet_sample: tuple[int, ...], vae_onnx: Path | None
) -> tuple[tuple[int, int, int] | None, int]:
    """``build.sizes`` (image sides in pixels) as the spatial inputs' sides (latents for a latent model),
    and the pixels per latent (1 for a pixel model). (None, factor) without build.sizes. ConfigError,
    with the fix, for a side the UNet's downsampling (times the VAE's) does not divide."""
    factor = _vae_factor(vae_onnx)
    if cfg.sizes is None:
        return None, factor
    if unet_sample[1] != unet_sample[2]:
        raise ConfigError(
            f"build.sizes={cfg.sizes}: the model's samples are {unet_sample[1]}x{unet_sample[2]} (not "
            "square); size ranges are square sides: leave build.sizes unset"
        )
    multiple = factor * unet_downsampling(run_dir)
    bad = [s for s in cfg.sizes if s % multiple]
    if bad:
        lo = max(multiple, bad[0] // multiple * multiple)
        raise ConfigError(
            f"build.sizes={cfg.sizes}: {bad[0]} px is not a multiple of {multiple} (the UNet downsamples "
            f"{multiple // factor}x"
            + ("" if factor == 1 else f" latents {factor}x smaller than the image")
            + f"); use multiples of {multiple}, e.g. {lo} or {lo + multiple}"
        )
    return tuple(s // factor for s in cfg.sizes), factor  # type: ignore[return-value]


def _check_sized(
    src: Path, inputs: dict[str, tuple[int, ...]], sizes: tuple[int, int, int] | None, factor: int
):
    """ArtifactError when a size range asks a graph fixed at another side for sizes it cannot take."""
    if sizes is None:
        return
    for name in SPATIAL_INPUTS:
        dims = inputs.get(name)
        if dims is None or dims[1] <= 0 or set(sizes) == {dims[1]}:
            continue
        raise ArtifactError(
            f"{src} is exported at a fixed {dims[1]}x{dims[2]} {name} ({dims[1] * factor} px images): "
            f"build.sizes {[s * factor for s in sizes]} needs graphs with dynamic height and width, which "
            f"are not exported for feature reuse's passes; set build.sizes=null (the model's size) or "
            f"{[dims[1] * factor] * 3}, or export.feature_reuse=false"
        )


def _unet_conditions(src: Path, inputs: dict[str, tuple[int, ...]]) -> list[str]:
    """The conditioning inputs a UNet graph takes after ``sample, timestep`` (ArtifactError for others)."""
    names = list(inputs)
    conditions = [n for n in names if n in CONDITION_INPUTS]
    own = [n for n in names if n not in INPUT_NAMES and n not in CONDITION_INPUTS]
    expected = [*INPUT_NAMES, *[c for c in CONDITION_INPUTS if c in conditions], *own]
    if names[:2] != INPUT_NAMES or names != expected:
        raise ArtifactError(
            f"{src}: inputs {names} are not sample, timestep, then {' / '.join(CONDITION_INPUTS)}; "
            "re-export it with the export stage"
        )
    return conditions


def conditioned_unet(run_dir: Path, precision: str) -> bool:
    """Whether the run's exported dense UNet graph at ``precision`` takes conditioning (False when absent)."""
    src = layout.onnx_path(run_dir, "dense", precision)
    return src.is_file() and any(name in CONDITION_INPUTS for name in onnx_input_shapes(src))


def _shared_precision(run_dir: Path, files: dict, graph: str, precision: str) -> str | None:
    """The precision of ``graph``'s shared engine: the build's; int8 (the UNet alone is quantized) takes
    the fp16 graph, else the fp32 one. None when the export wrote no such graph."""
    choices = ["fp16", "fp32"] if precision == "int8" else [precision]
    exported = [key.split(".", 1)[1] for key in files if key.split(".", 1)[0] == graph]
    if not exported:
        return None
    for choice in choices:
        if choice in exported:
            return choice
    raise ArtifactError(
        f"{layout.shared_onnx_path(run_dir, graph, choices[-1])} not exported (only "
        f"{', '.join(sorted(exported))}); run the export stage with export.precisions incl. {choices[-1]}"
    )


def run_graphs(
    run_dir: Path, cfg: BuildConfig, reuse_level: int | None = None, guidance_scale: float = 1.0
) -> list[GraphBuild]:
    """Every engine the run's build makes, in build order (reads the ONNX graphs' inputs, builds nothing).

    The dense and pruned UNets (``reuse_level``: and their feature-reuse passes, not at int8); a UNet
    graph taking conditioning is built over UNet rows, ``build.*_batch`` x 2 when ``guidance_scale`` > 1
    (the guided sampler's unconditional and conditional halves in one call). The shared graphs the
    export stage wrote (its record's ``text_encoder.<p>`` / ``vae_decoder.<p>`` files; a text-conditioned
    UNet needs its text encoder), over ``build.*_batch`` images, from the build's precision (int8: fp16,
    else fp32). ArtifactError, naming the export settings, for a graph that is not there.

    ``build.shapes=static``: every profile is one shape (``opt_batch`` images, x 2 rows for a guided UNet);
    ``build.sizes``: the UNet's ``sample`` and the VAE decoder's ``latent_sample`` side ranges over the
    sizes (in latents), checked against the UNet's downsampling (:func:`size_range`); a range other than
    the model's own side is built from the build stage's graphs of dynamic height and width
    (:func:`sized_graphs_needed`, ``RUN/build/graphs/``), the feature-reuse passes are refused then.
    """
    cfg.check_shapes()
    images = Profile(*cfg.profile_batches())
    source = cfg.precision  # strongly typed on 10 and 11: the engine's precision is the ONNX file's
    parts = ["unet"]
    if reuse_level is not None and source != "int8":
        parts += ["full", "shallow"]
    level = reuse_level or 0
    graphs, conditions = [], []
    record = read_record(run_dir, "export")
    files = record.metrics.get("files", {}) if record is not None else {}
    shared = {g: _shared_precision(run_dir, files, g, source) for g in layout.SHARED_GRAPHS}
    vae = shared["vae_decoder"]
    vae_onnx = layout.shared_onnx_path(run_dir, "vae_decoder", vae) if vae else None
    sizes, factor = None, 1
    for model in ("dense", "pruned"):
        for part in parts:
            src = layout.onnx_path(run_dir, model, source, part, level)
            if not src.is_file():
                hint = "" if part == "unet" else f" and export.feature_reuse=true sample.cache_level={level}"
                raise ArtifactError(
                    f"{src} not found; run the export stage (with export.precisions incl. {source}{hint})"
                )
            inputs = _graph_inputs(src, cfg.sizes is not None)
            conditions = _unet_conditions(src, inputs) if part == "unet" else conditions
            if (model, part) == ("dense", "unet"):
                sizes, factor = size_range(
                    run_dir, cfg, inputs["sample"], vae_onnx if vae_onnx and vae_onnx.is_file() else None
                )
            if part == "unet":  # another size range than the model's: the build's graph of any side
                src, inputs = _sized_source(run_dir, src, model, source, sizes)
            _check_sized(src, inputs, sizes, factor)
            profile = Profile(*cfg.profile_batches(), sizes)
            rows = profile.scaled(2) if conditions and guidance_scale > 1 else profile
            label = model if part == "unet" else f"{model} {part} pass (level {level})"
            key = model if part == "unet" else f"{model}.{part}"
            dst = layout.engine_path(run_dir, model, part, level)
            graphs.append(GraphBuild(key, label, part, src, dst, rows, inputs, source))
    for graph in layout.SHARED_GRAPHS:
        precision = shared[graph]
        if precision is None:
            if graph == "text_encoder" and "encoder_hidden_states" in conditions:
                src = layout.shared_onnx_path(run_dir, graph, "fp16" if source == "int8" else source)
                raise ArtifactError(f"{src} not found; run the export stage (it exports the text encoder)")
            continue
        src = layout.shared_onnx_path(run_dir, graph, precision)
        if not src.is_file():
            raise ArtifactError(f"{src} not found; run the export stage")
        label = f"shared {graph.replace('_', ' ')}"
        dst = layout.shared_engine_path(run_dir, graph)
        src, inputs = _sized_source(run_dir, src, graph, precision, sizes if graph == "vae_decoder" else None)
        _check_sized(src, inputs, sizes, factor)
        own = Profile(
            images.min_batch, images.opt_batch, images.max_batch, sizes if graph == "vae_decoder" else None
        )
        graphs.append(GraphBuild(f"shared.{graph}", label, graph, src, dst, own, inputs, precision))
    return graphs
