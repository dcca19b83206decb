"""Reload a saved (pruned) UNet in this fresh process and prove it is the model that was saved.

Usage: python scripts/reload_check.py RUN_OR_MODEL_FOLDER
Prints the max abs difference against the outputs saved beside the weights (0.0 = exact)
and runs a forward pass at batch 1 and 8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from compressor.models import example_inputs, predict_noise
from compressor.persist import load_unet, probe_difference


def main(path: Path) -> int:
    folder = path / "prune" / "model" if (path / "prune" / "model").is_dir() else path
    unet, meta = load_unet(folder)
    print(f"reloaded {folder}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params")
    print(f"max abs difference vs saved outputs: {probe_difference(folder, unet)}")
    for batch in (1, 8):
        x = example_inputs(unet, batch)
        with torch.no_grad():
            y = predict_noise(unet, x["sample"], x["timestep"])
        print(f"forward batch {batch}: output {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
