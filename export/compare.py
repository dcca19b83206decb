"""The one parity helper: run backends on the same feeds through Polygraphy's comparator.

Used by the ``parity`` stage and by the tests. Any Polygraphy runner takes part: the
:class:`TorchRunner` reference (CPU or CUDA, unlike Polygraphy's CUDA-only PytRunner),
``OnnxrtRunner`` and, on GPU hosts, ``TrtRunner``. Polygraphy's
simple compare function decides pass/fail with the stated tolerances; the error
statistics reported beside it (max/median absolute error, cosine similarity) are
computed from the same outputs.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.components import ModelSpec
from compressor.models import predict_noise, sample_shape


def quiet_polygraphy() -> None:
    """Keep Polygraphy's and ONNX Runtime's info logs out of the user's terminal."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass


def make_torch_runner(unet: nn.Module, name: str, device: str = "cpu", spec: ModelSpec | None = None):
    """A Polygraphy runner calling a torch UNet as ``(sample, timestep) -> noise`` (on a private copy).

    ``spec``: the description of the model ``unet`` belongs to (``DiffusionModel.spec``); a conditioned
    model's runner also takes its ``encoder_hidden_states`` / ``class_labels`` (passed by keyword).
    """
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    conditions = ModelSpec.of(unet, spec).denoiser_inputs(1).conditions if spec is not None else ()

    class TorchRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="torch-runner")
            self.unet = copy.deepcopy(unet).to(device).eval()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            meta.add("sample", np.float32, (-1, *sample_shape(unet, 1)[1:]))
            meta.add("timestep", np.int64, (-1,))
            for spec_in in conditions:
                dtype = np.int64 if spec_in.dtype == torch.long else np.float32
                meta.add(spec_in.name, dtype, (-1, *spec_in.per_item))
            return meta

        def infer_impl(self, feed_dict):
            def tensor(key: str) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(feed_dict[key])).to(device)

            sample, timestep = tensor("sample"), tensor("timestep")
            given = {i.name: tensor(i.name) for i in conditions}
            start = time.perf_counter()
            with torch.no_grad():
                out = predict_noise(self.unet, sample, timestep, **given).float().cpu().numpy()
            self.inference_time = time.perf_counter() - start
            return OrderedDict(noise=out)

    return TorchRunner()


def make_pass_runner(split: nn.Module, part: str, name: str, feature_shape: tuple):
    """A Polygraphy runner over one feature-reuse pass in torch fp32 (``full`` or ``shallow``).

    ``split`` is a :class:`compressor.feature_reuse.FeatureReuseUNet`; its outputs are named
    as in the exported graphs (full: noise, feature; shallow: noise).
    """
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class PassRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="torch-pass-runner")

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            meta.add("sample", np.float32, (-1, *sample_shape(split.unet, 1)[1:]))
            meta.add("timestep", np.int64, (-1,))
            if part == "shallow":
                meta.add("feature", np.float32, (-1, *feature_shape[1:]))
            return meta

        def infer_impl(self, feed_dict):
            args = [torch.from_numpy(np.ascontiguousarray(feed_dict[k])) for k in ("sample", "timestep")]
            start = time.perf_counter()
            with torch.no_grad():
                if part == "full":
                    noise, feature = split.full(*args)
                    out = OrderedDict(
                        noise=noise.float().numpy(), feature=feature.float().contiguous().numpy()
                    )
                else:
                    feature = torch.from_numpy(np.ascontiguousarray(feed_dict["feature"]))
                    out = OrderedDict(noise=split.shallow(*args, feature).float().contiguous().numpy())
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, np.ascontiguousarray(v)) for k, v in out.items())

    return PassRunner()


def make_function_runner(
    fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    name: str,
    inputs: dict[str, tuple[type, tuple[int, ...]]],
):
    """A Polygraphy runner over any torch function of named tensors (a text encoder, a VAE decoder,
    a conditioned UNet): ``fn({name: tensor}) -> {output: tensor}``, run under ``torch.no_grad``.

    ``inputs``: each input's numpy dtype and shape (-1 for the dynamic batch axis), in feed order.
    """
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class FunctionRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="torch-function-runner")

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for key, (dtype, shape) in inputs.items():
                meta.add(key, dtype, shape)
            return meta

        def infer_impl(self, feed_dict):
            feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()}
            start = time.perf_counter()
            with torch.no_grad():
                out = fn(feeds)
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, np.ascontiguousarray(v.float().cpu().numpy())) for k, v in out.items())

    return FunctionRunner()


def make_onnxrt_runner(path: Path, name: str, providers: list[str] | None = None):
    """Polygraphy's ONNX Runtime runner over an ONNX file."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(
        SessionFromOnnx(str(path), providers=providers or ["CPUExecutionProvider"]), name=name
    )


def parity_feeds(
    unet: nn.Module,
    batches: list[int],
    timesteps: list[int],
    seed: int = 0,
    conditions: Callable[[int], dict[str, np.ndarray]] | None = None,
) -> list[dict]:
    """Real inputs: for each batch size and timestep, noised samples at that timestep's scale.

    ``conditions``: a conditioned model's other inputs for a batch of ``b``
    (``{"encoder_hidden_states": ...}`` or ``{"class_labels": ...}``), added to each feed.
    """
    g = torch.Generator().manual_seed(seed)
    feeds = []
    for b in batches:
        for t in timesteps:
            sample = torch.randn(sample_shape(unet, b), generator=g)
            feed = {"sample": sample.numpy(), "timestep": np.full((b,), t, dtype=np.int64)}
            feeds.append(feed if conditions is None else {**feed, **conditions(b)})
    return feeds


@dataclass
class ParityReport:
    """Errors of one candidate runner against the reference, over all feeds."""

    reference: str
    candidate: str
    max_abs_error: float
    median_abs_error: float
    min_cosine: float
    passed: bool
    atol: float
    rtol: float
    cases: list[dict]

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def compare(
    runners: list, feeds: list[dict], atol: float, rtol: float, output: str = "noise"
) -> list[ParityReport]:
    """Run all ``runners`` on ``feeds``; compare each against ``runners[0]``.

    ``output``: the output the error statistics are computed on (the UNet's ``noise`` by default;
    pass/fail covers every output). Each case names its batch (and its timestep where the feed has one).

    Pass/fail comes from Polygraphy's ``CompareFunc.simple`` (element-wise
    ``|a - b| <= atol + rtol * |b|`` on every element).
    """
    from polygraphy.comparator import Comparator

    try:  # Polygraphy >= 0.50
        from polygraphy.comparator.compare import SimpleCompareFunc as simple
    except ImportError:
        from polygraphy.comparator import CompareFunc

        simple = CompareFunc.simple
    quiet_polygraphy()
    results = Comparator.run(runners, data_loader=feeds)
    verdict = Comparator.compare_accuracy(
        results,
        comparisons=[(0, i) for i in range(1, len(runners))],
        compare_func=simple(atol=atol, rtol=rtol, check_error_stat="elemwise"),
    )
    reports = []
    # Polygraphy >= 0.50 returns one AccuracyResult per comparison function.
    accuracy = verdict[0] if hasattr(verdict, "lst") else verdict
    pairs = list(results.items())
    ref_name, ref_iters = pairs[0]
    for cand_name, cand_iters in pairs[1:]:
        passed = all(bool(out) for it in accuracy[(ref_name, cand_name)] for out in it.values())
        cases = []
        for feed, ref, cand in zip(feeds, ref_iters, cand_iters, strict=True):
            a, b = ref[output].astype(np.float64), cand[output].astype(np.float64)
            err = np.abs(a - b)
            fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-30)
            cases.append(
                {
                    "batch": int(next(iter(feed.values())).shape[0]),
                    **({"timestep": int(feed["timestep"][0])} if "timestep" in feed else {}),
                    "max_abs_error": float(err.max()),
                    "median_abs_error": float(np.median(err)),
                    "cosine": float(cos.min()),
                }
            )
        reports.append(
            ParityReport(
                ref_name,
                cand_name,
                max(c["max_abs_error"] for c in cases),
                float(np.median([c["median_abs_error"] for c in cases])),
                min(c["cosine"] for c in cases),
                passed,
                atol,
                rtol,
                cases,
            )
        )
    return reports
