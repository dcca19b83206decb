"""Model loading (local folder, shipped architectures, hub offline) and datasets."""

from __future__ import annotations

import pytest
import torch

from compressor.config import DataConfig, ModelConfig
from compressor.data import digits_images, load_dataset
from compressor.errors import DataError, ModelError
from compressor.models import (
    example_inputs,
    load_model,
    predict_noise,
    shipped_architectures,
)
from tests.conftest import write_images


def test_shipped_architectures_include_the_papers():
    names = shipped_architectures()
    for name in ("ddpm-cifar10-32", "ddpm-ema-celebahq-256", "ddpm-church-256", "sd-v1-unet", "digits-ddpm"):
        assert name in names


def test_local_folder_loads_with_from_pretrained(model_folder):
    loaded = load_model(ModelConfig(name=str(model_folder)))
    assert type(loaded.unet).__name__ == "UNet2DModel"
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    assert loaded.source["kind"] == "folder"
    x = example_inputs(loaded.unet, 2)
    with torch.no_grad():
        assert predict_noise(loaded.unet, x["sample"], x["timestep"]).shape == x["sample"].shape


def test_pipeline_layout_with_unet_subfolder(tmp_path):
    from tests.conftest import write_model_folder

    root = tmp_path / "pipe"
    write_model_folder(root / "unet")
    (root / "scheduler").mkdir()
    (root / "unet" / "scheduler_config.json").rename(root / "scheduler" / "scheduler_config.json")
    loaded = load_model(ModelConfig(name=str(root)))
    assert list(loaded.unet.config.block_out_channels) == [16, 32]


def test_shipped_demo_model_loads_offline():
    loaded = load_model(ModelConfig(name="digits-ddpm", init="pretrained"))
    assert loaded.source == {"kind": "shipped", "name": "digits-ddpm"}
    assert loaded.unet.config.sample_size == 16


def test_random_init_of_a_shipped_architecture_is_seeded():
    a = load_model(ModelConfig(name="digits-ddpm", init="random"), seed=1).unet
    b = load_model(ModelConfig(name="digits-ddpm", init="random"), seed=1).unet
    assert torch.equal(a.conv_in.weight, b.conv_in.weight)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "nope")))


def test_hub_id_without_network_is_a_clear_error():
    with pytest.raises(ModelError, match="cannot fetch 'someone/some-model'.*local folder"):
        load_model(ModelConfig(name="someone/some-model"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))


def test_truncated_weights_are_a_clear_error(model_folder):
    weights = model_folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="cannot load UNet weights"):
        load_model(ModelConfig(name=str(model_folder)))


def test_digits_are_scaled_and_shaped():
    x = digits_images(16, 3)
    assert x.shape == (1797, 3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1


def test_image_folder_resizes_crops_and_converts(tmp_path):
    write_images(tmp_path / "rgb", 3, size=20)
    ds = load_dataset(DataConfig(source=str(tmp_path / "rgb")), channels=1, size=8)
    assert len(ds) == 3 and ds[0].shape == (1, 8, 8)
    assert -1 <= float(ds[0].min()) and float(ds[0].max()) <= 1
    write_images(tmp_path / "gray", 2, size=12, mode="L")
    ds = load_dataset(DataConfig(source=str(tmp_path / "gray")), channels=3, size=12)
    assert ds[1].shape == (3, 12, 12)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG/JPEG images found"):
        load_dataset(DataConfig(source=str(tmp_path / "empty")), 3, 8)


def test_folder_of_non_images_is_a_clear_error(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="no PNG/JPEG images found"):
        load_dataset(DataConfig(source=str(folder)), 3, 8)


def test_corrupted_image_is_named(tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    paths[1].write_bytes(paths[1].read_bytes()[:40])
    with pytest.raises(DataError, match="img001.png: cannot decode image"):
        load_dataset(DataConfig(source=str(tmp_path / "imgs")), 3, 8)


def test_source_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "x.png"
    f.write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(DataConfig(source=str(f)), 3, 8)
