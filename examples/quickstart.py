"""Quickstart: load a pretrained backbone, extract per-point features, picture them.

    python examples/quickstart.py                       # waffleiron-dinov2-L on the sample scan
    python examples/quickstart.py --model NAME_OR_DIR --scan scan.bin --out pictures/

The scan defaults to the package's own sample street scene (a simulated
32-beam lidar). Pictures: a bird's-eye PNG coloured by a PCA of the features
(needs matplotlib) and a coloured PLY. Without network access the registry
model cannot be downloaded; the quickstart then says so and runs on the small
reference network shipped with the tests (random weights) so that the
pipeline can still be seen working.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

import scalr_zoo
from scalr_zoo import viz

DEFAULT_MODEL = "waffleiron-dinov2-L"
OFFLINE_REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "scalr_pretrained"


def load_model(name: str, device: str | None) -> scalr_zoo.WaffleIron:
    try:
        return scalr_zoo.load(name, device=device)
    except (ConnectionError, scalr_zoo.NotCachedError) as exc:
        if name != DEFAULT_MODEL or not OFFLINE_REFERENCE.with_suffix(".pth").exists():
            raise
        print(f"Could not get {name}: {exc}")
        print("Falling back to the small reference network of the tests (random weights, a smoke test only).")
        with np.load(OFFLINE_REFERENCE.with_suffix(".npz")) as npz:
            config = json.loads(str(npz["config"]))
        return scalr_zoo.load(OFFLINE_REFERENCE.with_suffix(".pth"), config=config, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, hf-hub:owner/repo or model folder")
    parser.add_argument("--scan", type=Path, help="a point-cloud file (default: the package's sample scan)")
    parser.add_argument("--sensor", help="intensity preset of the scan (default: the model's)")
    parser.add_argument("--out", type=Path, default=Path("scalr_zoo_quickstart"), help="folder for the pictures")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = load_model(args.model, args.device)
    if args.scan is not None:
        points, sensor = scalr_zoo.read_points(args.scan), args.sensor
    else:
        scan = scalr_zoo.sample_scan()
        points, sensor = scan.points, args.sensor or scan.sensor

    features, inside = model.extract(points, sensor=sensor, return_fov_mask=True)
    print(f"model: width {model.num_features}, depth {model.config.arch.depth}, on {model.device}")
    print(f"points: {len(points)}, inside the field of view: {int(inside.sum())}")
    print(f"features: {tuple(features.shape)} {features.dtype}")

    colors = viz.pca_colors(features.cpu().numpy())
    args.out.mkdir(parents=True, exist_ok=True)
    print("wrote", viz.save_ply(args.out / "features_pca.ply", points, colors))
    try:
        print("wrote", viz.save_bev_png(args.out / "features_pca.png", points, colors, title="features, PCA to RGB"))
    except ImportError as exc:
        print(f"no PNG: {exc}")


if __name__ == "__main__":
    main()
