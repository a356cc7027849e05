"""Folders of labelled scans for fine-tuning and linear probing.

Two file layouts are read (the folder is searched recursively, files sorted
by path):

- ``STEM.npz`` holding ``points``, a ``(N, >=4)`` float array (x, y, z,
  intensity, extra columns ignored), and ``labels``, a ``(N,)`` integer
  array of class indices in ``[0, K)``, the ignore index marking unlabelled
  points.
- SemanticKITTI: ``STEM.bin`` (float32 x, y, z, intensity rows) with its
  ``STEM.label`` (uint32 per point, the lower 16 bits are the semantic
  class, the upper 16 the instance) either next to it or in a sibling
  ``labels/`` folder (``sequences/00/velodyne/000000.bin`` pairs with
  ``sequences/00/labels/000000.label``). Raw SemanticKITTI ids need a
  ``label_map`` (raw id -> class index; ids missing from it are ignored).

A ``label_map`` may be given for npz files too. Labels are checked when a
scan is read: a value outside ``[0, K)`` that is not the ignore index is an
error naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .io import read_points

__all__ = ["LabelledScan", "find_labelled_scans", "read_labelled_scan", "DEFAULT_IGNORE_INDEX"]

#: Label of unlabelled / ignored points (the original ScaLR recipe's value).
DEFAULT_IGNORE_INDEX = 255


@dataclass(frozen=True)
class LabelledScan:
    """Where one labelled scan lives.

    Attributes:
        points: the ``.npz`` or ``.bin`` file.
        labels: the ``.label`` file of a ``.bin`` scan (None for ``.npz``).
    """

    points: Path
    labels: Path | None = None

    @property
    def name(self) -> str:
        return self.points.stem


def _label_file_of(bin_path: Path) -> Path | None:
    for candidate in (bin_path.with_suffix(".label"), bin_path.parent.parent / "labels" / (bin_path.stem + ".label")):
        if candidate.is_file():
            return candidate
    return None


def find_labelled_scans(folder: str | os.PathLike) -> list[LabelledScan]:
    """Every labelled scan under ``folder``, sorted by path.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: a ``.bin`` scan has no ``.label`` file, or no scan is found.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{folder!s} is not a directory of labelled scans")
    scans = [LabelledScan(p) for p in sorted(root.rglob("*.npz"))]
    for bin_path in sorted(root.rglob("*.bin")):
        label_path = _label_file_of(bin_path)
        if label_path is None:
            raise ValueError(
                f"{bin_path} has no labels: expected {bin_path.with_suffix('.label').name} next to it "
                "or in a sibling 'labels/' folder"
            )
        scans.append(LabelledScan(bin_path, label_path))
    if not scans:
        raise ValueError(
            f"no labelled scan found under {folder!s}: expected STEM.npz files (arrays 'points' (N, 4) and "
            "'labels' (N,)) or STEM.bin + STEM.label pairs"
        )
    return sorted(scans, key=lambda s: s.points)


def _apply_label_map(labels: np.ndarray, label_map: Mapping[int, int], ignore_index: int) -> np.ndarray:
    keys = np.array(list(label_map.keys()), dtype=np.int64)
    values = np.array(list(label_map.values()), dtype=np.int64)
    lookup = np.full(max(int(keys.max()), int(labels.max())) + 1, ignore_index, dtype=np.int64)
    lookup[keys] = values
    return lookup[labels]


def read_labelled_scan(
    scan: LabelledScan,
    *,
    num_classes: int | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_map: Mapping[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Points and labels of one scan.

    Args:
        scan: from :func:`find_labelled_scans`.
        num_classes: K; labels must then lie in ``[0, K)`` or equal ``ignore_index``.
        ignore_index: label of ignored points.
        label_map: raw label -> class index; raw labels missing from it become ``ignore_index``.
    Returns:
        ``(N, >=4)`` real points (dtype as stored) and ``(N,)`` int64 labels.
    Raises:
        ValueError: a missing array, wrong shapes or dtypes, or a label out of range.
    """
    path = scan.points
    if scan.labels is None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = {"points", "labels"} - set(npz.files)
                if missing:
                    raise ValueError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(npz.files)}")
                points, labels = npz["points"], npz["labels"]
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    else:
        points = read_points(path, format="kitti")
        labels = (np.fromfile(scan.labels, dtype=np.uint32) & 0xFFFF).astype(np.int64)
    if points.ndim != 2 or points.shape[1] < 4 or points.dtype.kind not in "fiu":
        raise ValueError(f"{path}: points must be a real (N, 4+) array, got {points.dtype} {points.shape}")
    if labels.dtype.kind not in "iu" or labels.shape != (points.shape[0],):
        raise ValueError(
            f"{path}: labels must be an integer array of shape ({points.shape[0]},) (one per point), "
            f"got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if label_map is not None and labels.size:
        if labels.min() < 0:
            raise ValueError(f"{path}: negative raw label {labels.min()} cannot be looked up in label_map")
        labels = _apply_label_map(labels, label_map, ignore_index)
    if num_classes is not None:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bad.any():
            values = np.unique(labels[bad])[:5].tolist()
            raise ValueError(
                f"{path}: {int(bad.sum())} labels outside [0, {num_classes}) that are not the ignore index "
                f"{ignore_index} (e.g. {values}); map raw ids with label_map or set num_classes / ignore_index"
            )
    return np.ascontiguousarray(points), labels
