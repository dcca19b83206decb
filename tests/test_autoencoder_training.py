"""The digits' AutoencoderKL trained by the project's own code (compressor/autoencoder_training.py):
16 x 16 x 1 images to 8 x 8 x 4 latents, the loss falls, the run is a function of its seed, the latents'
std sets scaling_factor, and the saved folder loads in diffusers."""

from __future__ import annotations

import pytest
import torch

from compressor.autoencoder_training import (
    DIGITS_VAE,
    build_autoencoder,
    encode_latents,
    reconstruction_error,
    train_autoencoder,
)
from compressor.data import digits_images

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return digits_images(16, 1)[:256]


def test_the_digits_vae_is_small_and_halves_the_side(digits):
    vae = build_autoencoder(DIGITS_VAE, seed=0)
    assert sum(p.numel() for p in vae.parameters()) < 300_000
    with torch.no_grad():
        latents = vae.encode(digits[:2]).latent_dist.mode()
        assert latents.shape == (2, 4, 8, 8)
        assert vae.decode(latents).sample.shape == (2, 1, 16, 16)


def test_a_few_dozen_steps_lower_the_loss_and_the_folder_reloads(digits, tmp_path):
    torch.set_num_threads(1)
    seen = []
    result = train_autoencoder(
        digits, steps=40, batch_size=16, lr=2e-3, seed=0, progress=lambda s, v: seen.append((s, v))
    )
    assert [s for s, _ in seen] == list(range(1, 41)) and set(seen[0][1]) == {"loss", "reconstruction", "kl"}
    rec = [row[2] for row in result.losses]
    assert sum(rec[-5:]) / 5 < 0.6 * sum(rec[:5]) / 5
    untrained = reconstruction_error(build_autoencoder(DIGITS_VAE, seed=0), digits)
    trained = reconstruction_error(result.vae, digits)
    assert trained["mae"] < untrained["mae"] and trained["psnr"] > untrained["psnr"]
    scaled = encode_latents(result.vae, digits) * result.scaling_factor
    assert abs(float(scaled.std()) - 1.0) < 1e-4  # scaling_factor = 1 / std of the latents
    result.vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    again = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    assert again.config.scaling_factor == pytest.approx(result.scaling_factor)
    with torch.no_grad():
        assert torch.equal(again.decode(scaled[:2]).sample, result.vae.decode(scaled[:2]).sample)


def test_the_run_is_a_function_of_its_seed(digits):
    torch.set_num_threads(1)
    a = train_autoencoder(digits, steps=3, batch_size=8, seed=5)
    b = train_autoencoder(digits, steps=3, batch_size=8, seed=5)
    c = train_autoencoder(digits, steps=3, batch_size=8, seed=6)
    assert a.losses == b.losses and a.losses != c.losses
    assert all(torch.equal(p, q) for p, q in zip(a.vae.parameters(), b.vae.parameters(), strict=True))
    with pytest.raises(ValueError, match="expected"):
        train_autoencoder(digits.expand(-1, 3, -1, -1), steps=1)
