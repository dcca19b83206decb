"""A small digits classifier whose penultimate features give the demo's Frechet distance.

The standard Inception network needs a weights file that cannot be fetched
offline, so the demo measures distribution distance with features of a CNN the
project trains on scikit-learn's digits itself (about 30 s on 2 CPU cores). Its
weights ship in ``compressor/assets/digits-features.safetensors``; the figure is
reported as ``fd_digits``, never as FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compressor.data import digits_images
from compressor.errors import ModelError

WEIGHTS = Path(__file__).parent / "assets" / "digits-features.safetensors"
INPUT_SIZE = 16
NUM_FEATURES = 64


class DigitsFeatures(nn.Module):
    """CNN on 1x16x16 images in [0, 1]; ``forward`` returns 64 penultimate features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, NUM_FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(NUM_FEATURES, 10)
        self.num_features = NUM_FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.body(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))


def train_digits_features(epochs: int = 30, seed: int = 0) -> tuple[DigitsFeatures, float]:
    """Train the classifier on 80% of the digits; returns it and its test accuracy."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    x = (digits_images(INPUT_SIZE, 1) + 1) / 2
    y = torch.tensor(load_digits().target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    tr, te = perm[:split], perm[split:]
    net = DigitsFeatures()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in tr[torch.randperm(len(tr))].split(64):
            xb = x[idx]
            xb = xb + 0.05 * torch.randn_like(xb)  # robustness to generated images' noise
            loss = F.cross_entropy(net.logits(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net.logits(x[te]).argmax(1) == y[te]).float().mean())
    return net, acc


def save_digits_features(net: DigitsFeatures, path: Path = WEIGHTS) -> None:
    """Save the classifier's weights as safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def load_digits_features(path: Path = WEIGHTS) -> DigitsFeatures:
    """Load the shipped classifier; raises ModelError if the weights are missing or damaged."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(
            f"{path}: digits feature weights missing; run `python -m compressor.features` to train them"
        )
    net = DigitsFeatures()
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise ModelError(
            f"{path}: unreadable ({type(exc).__name__}); run `python -m compressor.features`"
        ) from None
    return net.eval()


if __name__ == "__main__":
    model, accuracy = train_digits_features()
    save_digits_features(model)
    print(f"digits feature network: test accuracy {accuracy:.4f}, saved to {WEIGHTS}")
