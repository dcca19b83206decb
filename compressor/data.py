"""Training images: scikit-learn's digits (ships with the package) or an image folder.

Every dataset yields float tensors in [-1, 1] of shape (C, H, W) matching the
model's channels and sample size. Image folders are checked up front, so that a
corrupted file is named before hours of work start.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from compressor.config import DataConfig
from compressor.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class TensorImages(Dataset):
    """Images held in memory as one tensor (N, C, H, W) in [-1, 1]."""

    def __init__(self, images: torch.Tensor, name: str) -> None:
        self.images = images
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ImageFolder(Dataset):
    """PNG/JPEG files under a folder, resized (shorter side) and centre-cropped."""

    def __init__(
        self, files: list[Path], channels: int, size: int, name: str, max_pixels: int = 50_000_000
    ) -> None:
        self.files = files
        self.channels = channels
        self.size = size
        self.name = name
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.files[i], self.channels, self.size, self.max_pixels)


EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB"}


def load_image(path: Path, channels: int, size: int, max_pixels: int = 50_000_000) -> torch.Tensor:
    """Decode one image into (C, size, size) in [-1, 1]; raises DataError naming the file.

    The declared size is checked before any pixel is decoded (an absurd one is a
    decompression bomb), then the whole file is decoded (a truncated file fails here),
    then converted to 8-bit grayscale or RGB (16-bit and float modes are refused).
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise DataError(f"models with {channels} input channels cannot be trained on images")
    target = "L" if channels == 1 else "RGB"
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit (below) names the file and the size
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise DataError(
                    f"{path}: declares {w}x{h} = {w * h:,} pixels, over data.max_image_pixels="
                    f"{max_pixels:,} (a decompression bomb?); remove the file or raise the limit"
                )
            img.load()
            if img.mode not in EIGHT_BIT_MODES:  # Pillow clips 16-bit and float pixels to 8 bits
                raise DataError(
                    f"{path}: image mode {img.mode!r} (16-bit or float pixels) is not supported; save it "
                    "as 8-bit RGB or grayscale"
                )
            img = img.convert(target)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        detail = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot decode image ({detail}); remove or replace the file") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, channels).permute(2, 0, 1).float() / 127.5 - 1.0


def digits_images(size: int, channels: int) -> torch.Tensor:
    """scikit-learn's 1,797 8x8 digits, upsampled to ``size`` and scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    x = F.interpolate(raw[:, None], size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    return x.expand(-1, channels, -1, -1).contiguous()


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted for reproducibility)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def source_folder(cfg: DataConfig) -> Path:
    """The image folder ``cfg.source`` names; DataError when it is missing or not a directory."""
    folder = Path(cfg.source).expanduser()
    if not folder.exists():
        raise DataError(f"data.source={cfg.source!r}: folder not found; use 'digits' or an image folder")
    if not folder.is_dir():
        raise DataError(f"data.source={cfg.source!r} is not a directory; point it at a folder of images")
    return folder


def load_dataset(cfg: DataConfig, channels: int, size: int, check: bool = True) -> Dataset:
    """The dataset named by ``cfg.source``; raises DataError for unusable input."""
    if cfg.source == "digits":
        images = digits_images(size, channels)
        if cfg.max_images:
            images = images[: cfg.max_images]
        return TensorImages(images, "digits")
    folder = source_folder(cfg)
    files = list_images(folder)
    if not files:
        raise DataError(
            f"data.source={cfg.source!r}: no PNG/JPEG images found; put training images in the folder"
        )
    if cfg.max_images:
        files = files[: cfg.max_images]
    if check:
        for path in files:
            load_image(path, channels, size, cfg.max_image_pixels)
    return ImageFolder(files, channels, size, str(folder), cfg.max_image_pixels)


def stack(dataset: Dataset, count: int | None = None) -> torch.Tensor:
    """The first ``count`` images of a dataset as one tensor."""
    if isinstance(dataset, TensorImages):
        return dataset.images[:count]
    n = len(dataset) if count is None else min(count, len(dataset))
    return torch.stack([dataset[i] for i in range(n)])


HOLDOUT_SEED = 20231105  # fixed: the held-out images are the same for every run seed


def taylor_and_holdout(
    dataset: Dataset, taylor_count: int, holdout_count: int, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A shuffled Taylor batch (drawn with ``seed``) and held-out images it never contains.

    The held-out images are fixed across seeds (a permutation with its own seed),
    so before/after-pruning losses of different seeds compare on the same images;
    the Taylor batch is drawn from the rest. When the data cannot spare
    ``holdout_count`` images beside the Taylor batch, fewer are held out (None: none).
    Raises DataError when the data is smaller than the Taylor batch.
    """
    pick, holdout = taylor_and_holdout_indices(dataset, taylor_count, holdout_count, seed)
    taylor = gather(dataset, pick) if taylor_count else None
    return taylor, (gather(dataset, holdout) if holdout else None)


def taylor_and_holdout_indices(
    dataset: Dataset, taylor_count: int, holdout_count: int, seed: int
) -> tuple[list[int], list[int]]:
    """The indices :func:`taylor_and_holdout` takes (Taylor batch, held out), for data read by index
    (a conditioned model's encoded samples and their conditions)."""
    n = len(dataset)
    require_images(dataset, taylor_count, f"the Taylor batch (prune.batch_size={taylor_count})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    holdout = order[: min(holdout_count, n - taylor_count)]
    pool = order[len(holdout) :]
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:taylor_count]]
    return pick.tolist(), holdout.tolist()


def gather(dataset: Dataset, indices: list[int]) -> torch.Tensor:
    """The images at ``indices`` as one tensor."""
    if isinstance(dataset, TensorImages):
        return dataset.images[torch.tensor(indices, dtype=torch.long)]
    return torch.stack([dataset[i] for i in indices])


def require_images(dataset: Dataset, needed: int, purpose: str) -> None:
    """Raise DataError when ``dataset`` holds fewer than ``needed`` images."""
    if len(dataset) < needed:
        raise DataError(
            f"dataset has {len(dataset)} images but {purpose} needs {needed}; add images or lower "
            "the batch size"
        )
