"""Semantic-segmentation scores: confusion matrix, per-class IoU, mIoU.

Conventions (those of the original ScaLR evaluation): the confusion matrix
has true classes in rows and predicted classes in columns; points whose label
is the ignore index are left out; the IoU of class c is
``TP / (TP + FP + FN)``, NaN when the class is neither present nor predicted,
and the mIoU is the mean over the classes whose IoU is not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["confusion_matrix", "per_class_iou", "SegmentationScores"]


def confusion_matrix(
    predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs.

    Args:
        predicted: ``(N,)`` integer predicted classes in ``[0, K)``.
        target: ``(N,)`` integer true classes in ``[0, K)`` or ``ignore_index``.
        num_classes: K.
        ignore_index: label of points to leave out.
    Returns:
        ``(K, K)`` int64 on the inputs' device, rows = true class, columns = predicted.
    Raises:
        ValueError: shapes differ or a class lies outside ``[0, K)``.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    if ignore_index is not None:
        keep = target != ignore_index
        predicted, target = predicted[keep], target[keep]
    for name, values in (("predicted", predicted), ("target", target)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(
                f"{name} classes must lie in [0, {num_classes}), got {int(values.min())}..{int(values.max())}"
            )
    flat = target.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_iou(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(K,)`` float64 IoU of each class from a ``(K, K)`` confusion matrix (NaN: class absent and never predicted)."""
    conf = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    conf = conf.astype(np.float64)
    true_positive = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


@dataclass
class SegmentationScores:
    """Scores of a segmentation over a set of points.

    Attributes:
        classes: K class names (or ``"class_i"``).
        confusion: ``(K, K)`` int64, rows = true class, columns = predicted.
    """

    classes: tuple[str, ...]
    confusion: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        """``(K,)`` per-class IoU in [0, 1], NaN for a class neither present nor predicted."""
        return per_class_iou(self.confusion)

    @property
    def miou(self) -> float:
        """Mean IoU over the classes with a defined IoU (NaN when none)."""
        iou = self.iou
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan

    @property
    def accuracy(self) -> float:
        """Fraction of the scored points whose class is right."""
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else math.nan

    @property
    def num_points(self) -> int:
        """Points scored (ignored ones excluded)."""
        return int(self.confusion.sum())

    def table(self) -> str:
        """Per-class IoU, mIoU and accuracy as an aligned text table (percent)."""
        width = max([len(c) for c in self.classes] + [8])
        lines = [f"{'class':<{width}}  IoU (%)"]
        for name, value in zip(self.classes, self.iou):
            lines.append(f"{name:<{width}}  {'n/a' if math.isnan(value) else f'{100 * value:6.2f}'}")
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou:6.2f}")
        lines.append(f"{'accuracy':<{width}}  {100 * self.accuracy:6.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping: per-class IoU (None for n/a), mIoU, accuracy, points, confusion."""
        return {
            "iou": {name: (None if math.isnan(v) else float(v)) for name, v in zip(self.classes, self.iou)},
            "miou": self.miou,
            "accuracy": self.accuracy,
            "num_points": self.num_points,
            "confusion": self.confusion.tolist(),
        }

    @classmethod
    def empty(cls, classes: Sequence[str]) -> "SegmentationScores":
        """Scores over no point yet, to accumulate into with :meth:`add`."""
        k = len(classes)
        return cls(tuple(classes), np.zeros((k, k), dtype=np.int64))

    def add(self, confusion: torch.Tensor | np.ndarray) -> None:
        """Accumulate a ``(K, K)`` confusion matrix."""
        conf = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
        self.confusion = self.confusion + conf.astype(np.int64)
