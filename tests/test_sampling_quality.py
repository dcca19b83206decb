"""The sampling loop (any noise predictor, seeds per image) and the quality measures."""

from __future__ import annotations

import pytest
import torch

from compressor.image_quality import FeatureAdapter, frechet_distance, inception_unavailable, psnr, ssim
from compressor.models import as_noise_predictor
from compressor.sampling import generate, make_scheduler
from tests.conftest import DDPM_SCHEDULER


@pytest.mark.parametrize(
    "kind, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmsolver++", 0.0), ("unipc", 0.0)]
)
def test_images_do_not_depend_on_batching(tiny_unet, kind, eta):
    predict = as_noise_predictor(tiny_unet)
    sched = make_scheduler(kind, DDPM_SCHEDULER)
    seven = generate(predict, sched, (3, 16, 16), 7, 3, eta, seed=7, batch_size=7)
    single = generate(predict, sched, (3, 16, 16), 7, 3, eta, seed=7, batch_size=1)
    # multistep solvers extrapolate from earlier steps, which amplifies the rounding differences
    # of batch-size-dependent conv kernels; no image ever sees another's noise or values
    tol = 1e-4 if kind in ("dpmsolver++", "unipc") else 1e-5
    assert (seven - single).abs().max() <= tol  # stochastic samplers too: per-image step noise
    # image 9 alone equals image 9 inside the batch of seeds 7..13, whatever its neighbours
    alone = generate(predict, sched, (3, 16, 16), 1, 3, eta, seed=9, batch_size=1)
    assert (alone[0] - seven[2]).abs().max() <= tol
    again = generate(predict, sched, (3, 16, 16), 7, 3, eta, seed=7, batch_size=7)
    assert torch.equal(seven, again)
    assert seven.shape == (7, 3, 16, 16) and 0 <= seven.min() and seven.max() <= 1
    if eta > 0 or kind == "ddpm":  # the step noise really is there: another seed's images differ
        other = generate(predict, sched, (3, 16, 16), 1, 3, eta, seed=10, batch_size=1)
        assert (other[0] - seven[2]).abs().max() > 1e-2


def test_any_callable_plugs_into_the_loop():
    calls = []

    def predict(sample, timestep):
        calls.append(int(timestep[0]))
        return torch.zeros_like(sample)

    out = generate(predict, make_scheduler("ddim", DDPM_SCHEDULER), (1, 4, 4), 2, 5)
    assert len(calls) == 5 and calls == sorted(calls, reverse=True)
    assert out.shape == (2, 1, 4, 4)


def test_ssim_and_psnr():
    a = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(a, noisy) < 0.95
    assert psnr(a, noisy) < psnr(a, (a + 0.01).clamp(0, 1))


def test_frechet_distance_with_digits_features_separates_distributions():
    from compressor.data import digits_images
    from compressor.features import NUM_FEATURES, load_digits_features

    feature = FeatureAdapter(load_digits_features(), 1, NUM_FEATURES)
    real = (digits_images(16, 1) + 1) / 2
    same = frechet_distance(real[:800], real[800:1600], feature)
    noise = frechet_distance(real[:800], torch.rand(800, 1, 16, 16), feature)
    assert same < noise / 10


def test_inception_fid_reports_why_it_cannot_run(tmp_path):
    assert "not found" in inception_unavailable(str(tmp_path / "missing.pth"))
    reason = inception_unavailable(None)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        assert reason and "torch-fidelity" in reason.lower().replace("_", "-")
