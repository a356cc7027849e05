"""Label every point of a lidar file with a finetuned model.

    python examples/segment_file.py scan.bin --model waffleiron-dinov2-L-ft-kitti-100p -o labels.npz

Writes the class id, class name and probability of every input point (.npz)
and a bird's-eye picture of the labels next to it (.png, needs matplotlib).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

import scalr_zoo
from scalr_zoo import viz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scan", type=Path, help="point-cloud file (.bin, .pcd.bin, .pcd, .ply, .las, .npy)")
    parser.add_argument("--model", required=True, help="a model with a class head (registry name or folder)")
    parser.add_argument("--sensor", help="intensity preset of the scan (default: the model's)")
    parser.add_argument("-o", "--output", type=Path, default=Path("labels.npz"))
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    model = scalr_zoo.load(args.model, device=args.device)
    points = scalr_zoo.read_points(args.scan)
    result = model.segment(points, sensor=args.sensor)
    np.savez(args.output, labels=result.labels, names=result.names, probabilities=result.probabilities)
    print(f"wrote {args.output}: {len(result)} points")
    for name, count in Counter(result.names.tolist()).most_common():
        print(f"  {name:24s} {count:7d}")

    num_classes = len(result.class_names)
    legend = {name: viz.label_colors(np.array([i]), num_classes)[0] for i, name in enumerate(result.class_names)}
    try:
        picture = viz.save_bev_png(
            args.output.with_suffix(".png"), points, viz.label_colors(result.labels, num_classes),
            title=f"{args.scan.name}: predicted classes", legend=legend,
        )
        print("wrote", picture)
    except ImportError as exc:
        print(f"no PNG: {exc}")


if __name__ == "__main__":
    main()
