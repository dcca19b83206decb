"""Bundle verification, the solver loops and the sampler (imports numpy and onnxruntime only)."""

from __future__ import annotations

import hashlib
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np

from .bundle_errors import BundleError
from .guided_sampler import Pipeline, guided_eps

MANIFEST = "manifest.json"


# -- the bundle folder ----------------------------------------------------------------------


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(root: Path) -> dict:
    """The manifest, after checking every file it lists (present, same sha256); BundleError if not."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(
            f"{path} is missing: not a bundle folder (make one with `compress-deploy bundle`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"{path} is not readable JSON ({type(exc).__name__}); the bundle is damaged"
        ) from None
    # lazy: the package's __init__ imports this module (a circle if imported at the top)
    from . import FORMAT

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest; rebuild the bundle")
    for name, expected in sorted(manifest.get("files", {}).items()):
        file = root / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"{path}: file entry {name!r} points outside the bundle")
        if not file.is_file():
            raise BundleError(f"{file} is missing; the bundle is incomplete (copy it again)")
        if sha256(file) != expected:
            raise BundleError(f"{file} does not match its sha256 in manifest.json; the bundle was altered")
    return manifest


def load_tables(root: Path) -> dict[str, np.ndarray]:
    """The scheduler's arrays (NPZ without pickle)."""
    with np.load(root / "scheduler.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# -- noise and solvers ----------------------------------------------------------------------


def seed_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Image ``seed``'s starting noise: float32 standard normals of numpy's PCG64(seed)."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def split_output(out: np.ndarray, x: np.ndarray, alpha: np.float32, sigma: np.float32, kind: str):
    """(x0, eps) that a model output at a timestep with these alpha, sigma means: epsilon or v
    prediction (``v = alpha eps - sigma x0``), as diffusers' schedulers read ``prediction_type``."""
    if kind == "v_prediction":
        return (alpha * x - sigma * out).astype(np.float32), (alpha * out + sigma * x).astype(np.float32)
    return ((x - sigma * out) / alpha).astype(np.float32), out


class DDIM:
    """Deterministic DDIM (eta = 0), epsilon or v prediction, from diffusers' DDIMScheduler tables."""

    def __init__(self, settings: dict, tables: dict) -> None:
        self.timesteps = tables["timesteps"].astype(np.int64)
        self.prev = tables["prev_timesteps"].astype(np.int64)
        self.alphas = tables["alphas_cumprod"].astype(np.float32)
        self.final = np.float32(tables["final_alpha_cumprod"])
        self.clip = settings["clip_sample"]
        self.clip_range = np.float32(settings["clip_sample_range"])
        self.prediction = settings.get("prediction_type", "epsilon")

    def reset(self) -> None:
        """DDIM keeps no state between steps."""

    def step(self, i: int, out: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x at the next timestep from x and the model's output (noise or v) at step ``i``."""
        a_t = self.alphas[self.timesteps[i]]
        a_prev = self.alphas[self.prev[i]] if self.prev[i] >= 0 else self.final
        half = np.float32(0.5)
        x0, eps = split_output(out, x, a_t**half, np.float32(1 - a_t) ** half, self.prediction)
        if self.clip:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        direction = np.float32(1 - a_prev) ** np.float32(0.5) * eps
        return (a_prev ** np.float32(0.5) * x0 + direction).astype(np.float32)


class DPMSolverPP:
    """DPM-Solver++ 2M (midpoint), epsilon or v prediction, final sigma 0, first order at both ends."""

    def __init__(self, settings: dict, tables: dict) -> None:
        self.timesteps = tables["timesteps"].astype(np.int64)
        self.sigmas = tables["sigmas"].astype(np.float32)
        self.previous: np.ndarray | None = None
        self.prediction = settings.get("prediction_type", "epsilon")

    def reset(self) -> None:
        """Forget the previous step's data prediction (a new sampler run)."""
        self.previous = None

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = np.float32(1) / (sigma * sigma + np.float32(1)) ** np.float32(0.5)
        return alpha, sigma * alpha

    def _lambda(self, sigma: np.float32) -> np.float32:
        alpha, sig = self._alpha_sigma(sigma)
        return np.log(alpha) - np.log(sig)

    def step(self, i: int, out: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x at the next timestep from x and the model's output (noise or v) at step ``i``."""
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        x0 = split_output(out, x, alpha_s0, sigma_s0, self.prediction)[0]
        previous, self.previous = self.previous, x0
        nxt = self.sigmas[i + 1]
        if nxt == 0:  # the last step to sigma 0 lands on the data prediction itself
            return x0
        alpha_t, sigma_t = self._alpha_sigma(nxt)
        lambda_s0 = self._lambda(self.sigmas[i])
        h = self._lambda(nxt) - lambda_s0
        decay = alpha_t * (np.exp(-h) - np.float32(1))
        first = (sigma_t / sigma_s0) * x - decay * x0
        if previous is None or i == len(self.timesteps) - 1:
            return first.astype(np.float32)
        h_0 = lambda_s0 - self._lambda(self.sigmas[i - 1])
        d1 = (np.float32(1) / (h_0 / h)) * (x0 - previous)
        return (first - np.float32(0.5) * decay * d1).astype(np.float32)


SOLVERS = {"ddim": DDIM, "dpmsolver++": DPMSolverPP}


# -- ONNX Runtime -------------------------------------------------------------------------


class Graphs:
    """One model's ONNX Runtime sessions: the plain call, or the two feature-reuse passes."""

    def __init__(
        self, root: Path, files: dict, provider: str, threads: int | None, spin: bool = True
    ) -> None:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if "full" in files or not spin:  # sessions in turn: spinning threads would steal each other's cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for part, name in files.items():
            try:
                self.sessions[part] = ort.InferenceSession(str(root / name), opts, providers=[provider])
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
                why = str(exc).splitlines()[0][:160]
                raise BundleError(f"{root / name}: ONNX Runtime cannot load it ({why})") from None
        self.reuse = "full" in files

    def unet(self, sample: np.ndarray, timestep: np.ndarray, **condition: np.ndarray) -> np.ndarray:
        """The plain UNet call (the full pass's noise when reusing features); ``condition``: a
        conditioned graph's ``encoder_hidden_states`` or ``class_labels``."""
        part = "full" if self.reuse else "unet"
        return self.sessions[part].run(["noise"], {"sample": sample, "timestep": timestep, **condition})[0]

    def full(self, sample: np.ndarray, timestep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        noise, feature = self.sessions["full"].run(
            ["noise", "feature"], {"sample": sample, "timestep": timestep}
        )
        return noise, feature

    def shallow(self, sample: np.ndarray, timestep: np.ndarray, feature: np.ndarray) -> np.ndarray:
        feeds = {"sample": sample, "timestep": timestep, "feature": feature}
        return self.sessions["shallow"].run(["noise"], feeds)[0]


class Bundle:
    """A verified bundle: its settings, tables and the sessions (or engines) of each model.

    ``backend``: ``onnxruntime`` (the ONNX graphs on the provider the bundle was checked
    with) or ``tensorrt`` (the engines of a bundle made with ``--engine``; the default when it
    has them). ``fallback``: run on ONNX Runtime's CPU provider when the bundle's backend or
    provider is not usable here (the reason is kept in ``fallback_reason``).
    """

    def __init__(
        self, root: Path, threads: int | None = None, fallback: bool = False, backend: str | None = None
    ) -> None:
        self.root = Path(root)
        self.manifest = verify(self.root)
        self.settings = json.loads((self.root / "scheduler.json").read_text())
        self.acceptance = json.loads((self.root / "acceptance.json").read_text())
        self.tables = load_tables(self.root)
        # the denoiser's samples: latents for a latent model (``image_shape`` is then the decoded pixels)
        self.shape = tuple(self.manifest.get("sample_shape") or self.manifest["image_shape"])
        self.pipeline: Pipeline | None = None
        scheduler = self.settings["scheduler"]
        if scheduler not in SOLVERS:
            raise BundleError(
                f"scheduler.json: solver {scheduler!r} is not one this runtime has ({', '.join(SOLVERS)})"
            )
        self.full_steps = set(self.settings.get("full_steps") or [])
        engines = self.manifest.get("engines") or {}
        backend = backend or ("tensorrt" if engines else "onnxruntime")
        if backend not in ("onnxruntime", "tensorrt"):
            raise BundleError(f"--backend {backend}: choose onnxruntime or tensorrt")
        if backend == "tensorrt" and not engines:
            raise BundleError(
                "this bundle has no TensorRT engines (make it with `compress-deploy bundle --engine`)"
            )
        self.backend, self.fallback_reason = backend, ""
        if backend == "tensorrt":
            # lazy: TensorRT and cuda-python, optional (a bundle runs on ONNX Runtime without them)
            from .engines import Engines

            try:
                self.graphs = {m: Engines(self.root, f) for m, f in engines.items()}
                self.provider = self.graphs["model"].label
                return
            except BundleError as exc:
                if not fallback:
                    raise
                self.fallback_reason = str(exc)
                self.backend = "onnxruntime"
        self._onnxruntime(threads, fallback)

    def _onnxruntime(self, threads: int | None, fallback: bool) -> None:
        import onnxruntime as ort

        provider = self.manifest["provider"]
        available = ort.get_available_providers()
        if provider not in available:
            if not fallback:
                raise BundleError(
                    f"this ONNX Runtime has no {provider} (it has {', '.join(available)}), the provider the "
                    "bundle was checked with; install the matching onnxruntime package or pass --fallback"
                )
            self.fallback_reason = self.fallback_reason or f"no {provider} in this ONNX Runtime"
            provider = "CPUExecutionProvider"
        self.provider = provider
        # a conditional bundle's UNets take turns with its text encoder and VAE decoder: none spins
        spin = not self.manifest.get("pipeline")
        self.graphs = {
            m: Graphs(self.root, f, provider, threads, spin) for m, f in self.manifest["graphs"].items()
        }
        if self.manifest.get("pipeline"):  # a conditional or latent model's tokenizer, encoder, decoder
            self.pipeline = Pipeline(self.root, self.manifest, provider, threads)

    @property
    def step_choices(self) -> list[int]:
        """The step counts ``generate --steps`` takes (the bundle's own, and the tables carried for more)."""
        return list(self.settings.get("step_choices") or [int(self.settings["steps"])])

    def solver(self, model: str = "model", steps: int | None = None):
        """A fresh solver of ``model``'s scheduler: the bundle's, or (a few-step student's bundle)
        the dense model's own DDIM, kept under ``dense`` in scheduler.json and ``dense.*`` tables.
        ``steps``: another of :attr:`step_choices` (its ``steps<N>.*`` tables)."""
        settings, tables = self.settings, self.tables
        if model == "dense" and "dense" in self.settings:
            settings = self.settings["dense"]
            tables = {k[len("dense.") :]: v for k, v in self.tables.items() if k.startswith("dense.")}
        elif steps is not None and steps != int(settings["steps"]):
            if steps not in self.step_choices:
                raise BundleError(
                    f"--steps {steps}: this bundle carries the tables of "
                    f"{_ranges(self.step_choices)} steps; choose one or bundle with --steps {steps}"
                )
            prefix = f"steps{steps}."
            tables = {**tables, **{k[len(prefix) :]: v for k, v in tables.items() if k.startswith(prefix)}}
        return SOLVERS[settings["scheduler"]](settings, tables)

    def denoise(
        self,
        noise: np.ndarray,
        model: str = "model",
        condition: tuple[np.ndarray, np.ndarray] | None = None,
        guidance: float = 1.0,
        steps: int | None = None,
    ) -> np.ndarray:
        """The sampler from ``noise``; images in [0, 1] (float32). ``condition``: (cond, uncond), one row
        per image, of a conditional model, guided by ``guidance`` (both halves in one call above 1);
        a latent model's final latents are decoded by the bundle's VAE decoder."""
        graphs, solver = self.graphs[model], self.solver(model, steps)
        if model == "model" and self.settings.get("distilled_guidance_scale") is not None:
            guidance = 1.0  # a student distilled at a fixed scale: the conditional half alone (not twice)
        x = noise * np.float32(self.settings["init_noise_sigma"])
        feature = None
        interval = int(self.settings.get("cache_interval", 1))
        name = self.pipeline.input if self.pipeline is not None and condition is not None else None
        for i, t in enumerate(solver.timesteps):
            timestep = np.full((x.shape[0],), int(t), dtype=np.int64)
            if interval <= 1:
                eps = guided_eps(graphs.unet, x, timestep, name, condition, guidance)
            elif i in self.full_steps:
                eps, feature = graphs.full(x, timestep)
            else:
                eps = graphs.shallow(x, timestep, feature)
            x = solver.step(i, eps.astype(np.float32), x)
        if self.pipeline is not None and self.pipeline.decoder is not None:
            x = self.pipeline.decode(x)
        return np.clip((x + 1) / 2, 0, 1).astype(np.float32)

    def generate(
        self,
        seed: int,
        num_images: int,
        batch: int | None = None,
        model: str = "model",
        prompts: list[str] | None = None,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        steps: int | None = None,
    ) -> np.ndarray:
        """Images of seeds ``seed .. seed + num_images - 1`` (each from its own noise). A conditional
        bundle's image ``i`` takes ``prompts[i % len(prompts)]`` (class indices for a class-conditioned
        model), guided by ``guidance_scale`` (default the run's) away from ``negative_prompt`` (default
        the run's); an unconditional one takes none."""
        batch = batch or int(self.manifest["batch"])
        conditional = self.pipeline is not None and self.pipeline.kind != "none"
        if prompts and not conditional:
            raise BundleError("--prompt given, but the bundle's model is unconditional; generate without it")
        condition, guidance = None, 1.0
        if conditional:
            if not prompts:
                raise BundleError("the bundle's model is conditional: pass --prompt TEXT (repeatable)")
            guidance = self.pipeline.guidance_scale if guidance_scale is None else float(guidance_scale)
            if not np.isfinite(guidance) or guidance < 0:
                raise BundleError(f"--guidance-scale {guidance}: use a finite number >= 0 (1 = no guidance)")
            condition = self.pipeline.conditioning(
                [prompts[i % len(prompts)] for i in range(num_images)], negative_prompt
            )
        out = []
        for start in range(0, num_images, batch):
            seeds = range(seed + start, seed + min(num_images, start + batch))
            rows = None if condition is None else tuple(c[start : start + len(seeds)] for c in condition)
            noise = np.stack([seed_noise(self.shape, s) for s in seeds])
            out.append(self.denoise(noise, model, rows, guidance, steps))
        return np.concatenate(out)


def _ranges(values: list[int]) -> str:
    """``1..50`` for consecutive counts, else the counts."""
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


# -- images ---------------------------------------------------------------------------------


def write_png(images: np.ndarray, path: Path, nrow: int = 8, pad: int = 2) -> None:
    """A grid of ``images`` (N, C, H, W in [0, 1]) as an 8-bit PNG (zlib from the standard library)."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    pixels = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = pixels[i]
    color = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + row.tobytes() for row in canvas)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", canvas.shape[1], canvas.shape[0], 8, color, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(data)


def median_ms(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1e3)
    return float(np.median(times))
