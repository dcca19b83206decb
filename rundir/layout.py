"""Where everything lives in a run directory: the one module that knows the layout.

Every stage, command and backend asks here for paths inside ``RUN/`` (and inside a saved
model folder) instead of joining them by hand, so a layout change is one edit. It sits in
the bottom layer (pure paths, no imports of the rest) so that ``deploy/`` can read
finished runs without importing the pipeline. What the files hold is read through
:mod:`rundir.records`.

    RUN/run.json                          which config the run belongs to
    RUN/manifest.json                     the run's manifest: every artifact's hash (``verify``)
    RUN/.lock                             held while a process writes into the run
    RUN/sweep-cell.json                   a sweep's nested run only: the settings key it finished
                                          its stages under (``pipeline.sweep.cells``)
    RUN/<stage>/record.json               what a stage did (config, metrics, artifacts, versions)
    RUN/prune/model/                      the pruned UNet: weights, structure file, probe
    RUN/finetune/model/, model-raw/       the finetuned UNet (EMA) and its raw weights
    RUN/distill_steps/model/              the few-step student (the final model when present)
    RUN/distill_steps/rounds/<steps>/     every round's student
    RUN/<train|finetune|distill_steps>/checkpoints/<key>/   resumable checkpoints, keyed by the
                                          stage's cache key (distill_steps: one folder a round)
    RUN/train/diffusers/                  the trained dense model as a diffusers folder
    RUN/export/<dense|pruned>/unet.<precision>.onnx, unet-{full,shallow}-l<level>.<precision>.onnx
    RUN/export/shared/text_encoder.<precision>.onnx, vae_decoder.<precision>.onnx   a text-to-image
                                          model's text encoder and VAE decoder (never compressed:
                                          exported once, shared by the dense and compressed UNets)
    RUN/build/<dense|pruned>/unet.engine  TensorRT engines (+ unet.engine.json, the engine's
                                          metadata), build/timing.cache
    RUN/build/shared/text_encoder.plan, vae_decoder.plan   the shared graphs' engines (+ .plan.json)
    RUN/samples/grid.png, RUN/quality/samples.safetensors, RUN/report/report.{md,html}
    RUN/encoded/latents.safetensors, text.safetensors, encoded.json   the latent and text-embedding
                                          cache of a conditioned model's data (its keys and hashes in
                                          encoded.json; ``compressor.encoded_cache``)
    RUN/plan/plan.{json,md,png}           ``compress-deploy plan`` (the latency plan)
    RUN/ablation/<variant>/seed-<k>/      ``compress-deploy ablate``'s nested runs (``distill/``: the
                                          distillation sweep's, ``macs-<r>/seed-<k>/``)
    RUN/levers/levers.{json,md}           ``scripts/levers_table.py`` (each lever, alone and stacked)

    <model folder>/unet.safetensors       weights
    <model folder>/unet.json              the structure file: dense config + pruning history
    <model folder>/probe.safetensors      a fixed input and the noise it gave (exact reload check)
"""

from __future__ import annotations

from pathlib import Path

RUN_FILE = "run.json"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
SWEEP_CELL = "sweep-cell.json"
RECORD = "record.json"
MODELS = ("dense", "pruned")
MODEL_STAGES = ("distill_steps", "finetune", "prune")  # the compressed model's stages, newest first
# one name per model, in every record, table and report
MODEL_NAMES = {"prune": "pruned", "finetune": "finetuned", "distill_steps": "student"}
COMPRESSED_NAMES = tuple(MODEL_NAMES[s] for s in MODEL_STAGES)  # the final model: the first of these present
CHECKPOINTS = "checkpoints"
ABLATION = "ablation"
PLAN = "plan"
DIFFUSERS = "diffusers"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS_FILE = "unet.safetensors"
STRUCTURE_FILE = "unet.json"
PROBE_FILE = "probe.safetensors"
TRAINER_STATE = "trainer.json"
ENGINE_FILE = "unet.engine"
ENCODED = "encoded"


def stage_dir(run: Path, stage: str) -> Path:
    """``RUN/<stage>``."""
    return Path(run) / stage


def record_path(run: Path, stage: str) -> Path:
    """``RUN/<stage>/record.json``."""
    return stage_dir(run, stage) / RECORD


def model_dir(run: Path, stage: str, raw: bool = False) -> Path:
    """The saved UNet a stage wrote (``prune`` or ``finetune``; ``raw``: finetune's non-EMA copy)."""
    return stage_dir(run, stage) / ("model-raw" if raw else "model")


def student_round_dir(run: Path, steps: int) -> Path:
    """The student of the ``distill_steps`` round that ended at ``steps`` steps."""
    return stage_dir(run, "distill_steps") / "rounds" / str(steps)


def checkpoints_dir(run: Path, stage: str = "finetune") -> Path:
    """Resumable checkpoints of a training stage (``train`` or ``finetune``)."""
    return stage_dir(run, stage) / CHECKPOINTS


def diffusers_dir(run: Path) -> Path:
    """The ``train`` stage's dense model as a diffusers folder."""
    return stage_dir(run, "train") / DIFFUSERS


def ablation_dir(run: Path) -> Path:
    """Where ``compress-deploy ablate`` keeps its nested runs."""
    return Path(run) / ABLATION


def sweep_cell_file(run: Path) -> Path:
    """``RUN/sweep-cell.json`` of a sweep's nested run: the key of the settings it finished under."""
    return Path(run) / SWEEP_CELL


def levers_dir(run: Path) -> Path:
    """Where ``scripts/levers_table.py`` writes the levers table."""
    return Path(run) / "levers"


def frontier_dir(run: Path) -> Path:
    """Where ``compress-deploy frontier`` (and a latency target over levers) keeps the frontier."""
    return Path(run) / "frontier"


def frontier_ratio_dir(frontier: Path, ratio: float) -> Path:
    """The nested run of one pruning ratio inside a frontier folder."""
    return Path(frontier) / f"ratio-{ratio:g}"


def frontier_student_dir(frontier: Path, ratio: float) -> Path:
    """The nested run of a frontier's few-step students at ``ratio`` (its rounds are the students)."""
    return Path(frontier) / f"ratio-{ratio:g}-students"


def frontier_points_dir(frontier: Path) -> Path:
    """Per-job results (quality, latency, reference images) inside a frontier folder."""
    return Path(frontier) / "points"


def plan_dir(run: Path) -> Path:
    """Where ``compress-deploy plan`` writes the latency plan."""
    return Path(run) / PLAN


def weights_file(folder: Path) -> Path:
    """A saved model's weights."""
    return Path(folder) / WEIGHTS_FILE


def structure_file(folder: Path) -> Path:
    """A saved model's structure file (dense config, pruning history, shapes)."""
    return Path(folder) / STRUCTURE_FILE


def probe_file(folder: Path) -> Path:
    """A saved model's probe (fixed input and output, for the exact-reload check)."""
    return Path(folder) / PROBE_FILE


def trainer_state(checkpoint: Path) -> Path:
    """The optimizer/step state inside one checkpoint folder."""
    return Path(checkpoint) / TRAINER_STATE


def onnx_path(run: Path, model: str, precision: str, part: str = "unet", level: int = 0) -> Path:
    """The exported ONNX of ``model`` (dense|pruned) at ``precision`` (fp32|fp16).

    ``part``: the plain call (``unet.<precision>.onnx``) or a feature-reuse pass split at
    ``level`` (``unet-full-l<level>.<precision>.onnx``, ``unet-shallow-l<level>...``).
    """
    name = "unet" if part == "unet" else f"unet-{part}-l{level}"
    return stage_dir(run, "export") / model / f"{name}.{precision}.onnx"


SHARED_GRAPHS = ("text_encoder", "vae_decoder")


def shared_onnx_path(run: Path, component: str, precision: str) -> Path:
    """``RUN/export/shared/<component>.<precision>.onnx``: a pipeline graph the dense and compressed
    UNets share (``text_encoder`` or ``vae_decoder``: only the UNet is compressed)."""
    if component not in SHARED_GRAPHS:
        raise ValueError(f"shared graph {component!r}; one of {', '.join(SHARED_GRAPHS)}")
    return stage_dir(run, "export") / "shared" / f"{component}.{precision}.onnx"


def engine_path(run: Path, model: str, part: str = "unet", level: int = 0) -> Path:
    """The TensorRT engine of ``model`` (dense|pruned): the plain call or a feature-reuse pass.

    ``part`` as in :func:`onnx_path`: ``unet.engine`` or ``unet-full-l<level>.engine`` /
    ``unet-shallow-l<level>.engine`` (each built from the ONNX graph of the same name).
    """
    if part == "unet":
        return stage_dir(run, "build") / model / ENGINE_FILE
    return stage_dir(run, "build") / model / f"unet-{part}-l{level}.engine"


def engine_info_path(engine: Path) -> Path:
    """The engine's metadata file beside it (TensorRT version, GPU, profile, sha256)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def timing_cache(run: Path) -> Path:
    """TensorRT's timing cache, shared by the run's engine builds."""
    return stage_dir(run, "build") / "timing.cache"


def encoded_dir(run: Path) -> Path:
    """``RUN/encoded``: the cache of a conditioned model's encoded data (one per run: the VAE and the
    text encoder are never pruned, so every stage reads the same)."""
    return Path(run) / ENCODED


def encoded_latents(run: Path) -> Path:
    """The VAE latents of the run's training images."""
    return encoded_dir(run) / "latents.safetensors"


def encoded_text(run: Path) -> Path:
    """The text encoder's embeddings of the run's captions (and of the empty prompt)."""
    return encoded_dir(run) / "text.safetensors"


def encoded_index(run: Path) -> Path:
    """The keys, sizes and sha256 of the encoded files (a file is reused only when both match)."""
    return encoded_dir(run) / "encoded.json"


def samples_grid(run: Path) -> Path:
    """The dense-vs-compressed sample grid."""
    return stage_dir(run, "samples") / "grid.png"


def prompt_pairs(run: Path) -> Path:
    """A conditional model's samples per prompt, dense beside compressed."""
    return stage_dir(run, "samples") / "prompts.png"


def quality_samples(run: Path) -> Path:
    """Every model's quality samples."""
    return stage_dir(run, "quality") / "samples.safetensors"


def report_dir(run: Path) -> Path:
    """The report's folder (report.md, report.html, plots)."""
    return stage_dir(run, "report")


def run_file(run: Path) -> Path:
    """``RUN/run.json``."""
    return Path(run) / RUN_FILE


def manifest_path(run: Path) -> Path:
    """``RUN/manifest.json``."""
    return Path(run) / MANIFEST


def lock_path(run: Path) -> Path:
    """``RUN/.lock``."""
    return Path(run) / LOCK_FILE


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a half-written file or folder (atomic writes use these names)."""
    name = path.name
    return name.endswith(".tmp") or ".tmp." in name or name.startswith(".tmp-")


def shared_engine_path(run: Path, component: str) -> Path:
    """``RUN/build/shared/<component>.plan``: the TensorRT engine of a shared pipeline graph (``text_encoder``
    or ``vae_decoder``, built from :func:`shared_onnx_path`'s graph), engine info beside it."""
    if component not in SHARED_GRAPHS:
        raise ValueError(f"shared graph {component!r}; one of {', '.join(SHARED_GRAPHS)}")
    return stage_dir(run, "build") / "shared" / f"{component}.plan"


def sized_onnx_path(run: Path, graph: str, precision: str) -> Path:
    """``RUN/build/graphs/<graph>.<precision>.onnx``: a graph (``dense`` / ``pruned`` UNet, ``vae_decoder``)
    exported with dynamic height and width by the build stage, for engines over ``build.sizes``."""
    if graph not in ("dense", "pruned", "vae_decoder"):
        raise ValueError(f"sized graph {graph!r}; one of dense, pruned, vae_decoder")
    return stage_dir(run, "build") / "graphs" / f"{graph}.{precision}.onnx"
