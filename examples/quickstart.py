"""Quickstart: load a WaffleIron/ScaLR checkpoint and extract per-point features.

Runs offline on the small reference checkpoint shipped with the tests:

    python examples/quickstart.py

or on your own checkpoint and scan:

    python examples/quickstart.py --checkpoint ckpt.pth --config config.json --scan scan.bin
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import scalr_zoo

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent / "tests" / "data" / "scalr_pretrained"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE.with_suffix(".pth"))
    parser.add_argument("--config", type=Path, help="JSON config (default: the reference case's)")
    parser.add_argument("--scan", type=Path, help="KITTI-style float32 x,y,z,intensity .bin (default: reference points)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    if args.config is not None:
        config = json.loads(args.config.read_text())
    else:
        with np.load(REFERENCE.with_suffix(".npz")) as npz:
            config = json.loads(str(npz["config"]))
    if args.scan is not None:
        points = np.fromfile(args.scan, dtype=np.float32).reshape(-1, 4)
    else:
        with np.load(REFERENCE.with_suffix(".npz")) as npz:
            points = npz["points"]

    model = scalr_zoo.load(args.checkpoint, config=config, device=args.device)
    features, inside = model.extract(points, return_fov_mask=True)
    print(f"model: width {model.num_features}, depth {model.config.arch.depth}, on {model.device}")
    print(f"points: {len(points)}, inside the FOV: {int(inside.sum())}")
    print(f"features: {tuple(features.shape)} {features.dtype}, mean norm {features.norm(dim=1).mean():.3f}")


if __name__ == "__main__":
    main()
