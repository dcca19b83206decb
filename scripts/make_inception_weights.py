"""Write a randomly initialised Inception-v3 FID weights file in the format torchmetrics loads.

    python scripts/make_inception_weights.py OUT.pth

For exercising the standard FID code path on a host without the real weights file (and no
network to fetch it): torchmetrics' ``FrechetInceptionDistance(feature_extractor_weights_path=...)``
loads this file exactly as it loads the real one. FID figures computed with it are meaningless.
Needs the ``fid`` extra (torch-fidelity).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out: Path) -> int:
    """Build torch-fidelity's Inception with its loading step disabled and save its random weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    real_load = cls.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}  # no download: keep the random initialisation
    cls.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        model = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict = real_load
    torch.save(model.state_dict(), out)
    print(f"wrote {out} (random Inception-v3 weights: FID figures from it are meaningless)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1])))
