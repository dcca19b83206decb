"""Quality measures: denoising loss, SSIM/PSNR consistency, and Frechet distances.

SSIM and PSNR (data range [0, 1]) compare dense and compressed samples generated
from the same noise: the paper's consistency measure. Frechet distances go
through torchmetrics' ``FrechetInceptionDistance``: with the standard Inception
network (reported as ``fid``; needs its weights file, offline via a local path)
or with the project's own digits feature network (reported as ``fd_digits``,
never called FID).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.errors import UserError
from compressor.intervals import Resampling, Scorer, library_frechet
from compressor.taylor import denoising_loss

EVAL_TIMESTEPS = (10, 50, 100, 200, 300, 400, 500, 600, 800, 950)


def denoising_eval_loss(
    unet: nn.Module,
    noise_scheduler,
    images: torch.Tensor,
    seed: int,
    timesteps=EVAL_TIMESTEPS,
    conditioning: dict[str, torch.Tensor] | None = None,
) -> float:
    """Mean epsilon-MSE over fixed timesteps and fixed noise (comparable across models); a conditional
    UNet's ``conditioning`` for ``images`` (item for item) passes to every call."""
    g = torch.Generator().manual_seed(seed + 12345)
    noise = torch.randn(images.shape, generator=g).to(images.device)
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        losses = [
            float(denoising_loss(unet, noise_scheduler, images, noise, t, conditioning)) for t in timesteps
        ]
    unet.train(was_training)
    return sum(losses) / len(losses)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM between two batches in [0, 1] (data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(a.shape[-1], a.shape[-2])
    kernel = min(11, size - (1 - size % 2))
    return float(
        structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, kernel_size=kernel)
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two batches in [0, 1] (data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a.float(), b.float(), data_range=1.0))


class FeatureAdapter(nn.Module):
    """Feed images in [0, 1] of any channel count to a feature network that wants ``channels``."""

    def __init__(self, net: nn.Module, channels: int, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.channels = channels
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchmetrics (normalize=True) hands over uint8 images in 0..255
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        return self.net(x)


def inception_unavailable(weights: str | None) -> str | None:
    """None when the standard Inception FID can run here, else why not (one line)."""
    if weights is not None and not Path(weights).is_file():
        return f"Inception weights file {weights!r} not found"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    except Exception as exc:  # noqa: BLE001 - missing package, failed download, bad file
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    return None


def feature_extractor(feature: nn.Module | int, weights: str | None = None, device=None):
    """A function from images in [0, 1] (n, c, h, w) to (n, d) features, in batches of 256.

    ``feature``: a module (the digits network; called on the float images, as torchmetrics
    calls a custom extractor) or ``2048`` for torchmetrics' Inception (uint8 RGB, its own
    resizing; weights from the local file ``weights``).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, int):
        if weights is not None and not Path(weights).is_file():
            raise UserError(f"quality.inception_weights={weights!r}: file not found; copy the weights there")
        net = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights).inception

        def prepare(x: torch.Tensor) -> torch.Tensor:
            return (_rgb(x) * 255).byte()
    else:
        net = feature

        def prepare(x: torch.Tensor) -> torch.Tensor:
            return x

    if device is not None:
        net = net.to(device)

    def extract(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            parts = [net(prepare(b.to(device) if device is not None else b)) for b in images.split(256)]
        return torch.cat([p.reshape(p.shape[0], -1).double().cpu() for p in parts])

    return extract


def frechet_distance(
    real: torch.Tensor, fake: torch.Tensor, feature: nn.Module | int, weights: str | None = None
) -> float:
    """Frechet distance between feature statistics of ``real`` and ``fake`` (both in [0, 1])."""

    extract = feature_extractor(feature, weights)
    return library_frechet(extract(real), extract(fake))


def resampling(quality, seed: int, method: str | None = None, level: float | None = None):
    """The paired resampling behind a run's quality intervals (``quality.interval_level``,
    ``quality.resamples``, ``quality.interval_method`` unless ``method`` or ``level`` is given),
    seeded by ``seed``."""

    q = quality
    return Resampling(level or q.interval_level, q.resamples, seed, method or q.interval_method)


def make_scorer(reference: torch.Tensor, feature: nn.Module | int, metric: str, boot, weights=None):
    """A :class:`compressor.intervals.Scorer` against the reference images: KID on the digits
    features scaled by the reference features' spread, on Inception's as they are (standard KID)."""

    extract = feature_extractor(feature, weights)
    return Scorer(extract(reference), extract, boot, kid_scale="auto" if metric == "fd_digits" else 1.0)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
