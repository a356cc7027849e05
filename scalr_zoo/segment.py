"""Semantic segmentation with a model that has a class head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .extract import PointsLike, extract
from .model import WaffleIron

__all__ = ["Segmentation", "segment", "UNLABELLED"]

#: Label of points that got no prediction (NaN/Inf input with ``drop_nonfinite=True``).
UNLABELLED = -1


@dataclass
class Segmentation:
    """Per-point predictions of a class head.

    Attributes:
        labels: ``(N,)`` int64 class ids into ``class_names`` (``-1`` for points
            dropped as non-finite).
        probabilities: ``(N,)`` float32 softmax probability of the predicted
            class (0 for dropped points).
        class_names: names of the head's classes, in output order.
        fov_mask: ``(N,)`` bool, True for points inside the model's field of
            view; the others took the prediction of their nearest kept point.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    class_names: tuple[str, ...]
    fov_mask: np.ndarray

    @property
    def names(self) -> np.ndarray:
        """``(N,)`` class name of every point (``"unlabelled"`` for dropped points)."""
        table = np.asarray(list(self.class_names) + ["unlabelled"])
        return table[np.where(self.labels >= 0, self.labels, len(self.class_names))]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def require_class_head(model: WaffleIron) -> tuple[str, ...]:
    """The class names of ``model``'s head, or a ValueError saying why it cannot segment."""
    if not model.has_head:
        raise ValueError(
            "this model has no head, so it cannot label points; use a model with a class head "
            "(a finetuned or linear-probing checkpoint) or extract features with model.extract()"
        )
    classes = model.config.classes
    if not classes:
        raise ValueError(
            f"this model's {model.config.arch.head!r} head outputs {model.config.arch.out} feature channels, "
            "not classes (a distillation head, or a config without class names); use a model with a "
            "class head, or pass classes= in its config if the head does predict classes"
        )
    return classes


def segment(
    model: WaffleIron,
    points: PointsLike | Sequence[PointsLike],
    **extract_kwargs: Any,
) -> Segmentation | list[Segmentation]:
    """Class id, class name and probability of every input point.

    Args:
        model: a model with a class head (``config.classes`` set).
        points: ``(N, >=4)`` cloud (x, y, z, intensity), or a list of them.
        **extract_kwargs: options of :func:`scalr_zoo.extract.extract`
            (``sensor``, ``fov``, ``dtype``, ``drop_nonfinite``,
            ``batch_size``...); ``head`` and ``return_fov_mask`` are set here.

    Returns:
        A :class:`Segmentation` (numpy arrays on the CPU), or a list of them
        for a list input.

    Raises:
        ValueError: a model without a class head, or bad input (as extract).
    """
    class_names = require_class_head(model)
    for key in ("head", "return_fov_mask"):
        if key in extract_kwargs:
            raise ValueError(f"segment() sets {key}= itself; leave it out")
    logits, masks = extract(model, points, head=True, return_fov_mask=True, **extract_kwargs)
    single = isinstance(logits, torch.Tensor)
    results = [_from_logits(lg, mk, class_names) for lg, mk in zip([logits] if single else logits, [masks] if single else masks)]
    return results[0] if single else results


def _from_logits(logits: torch.Tensor, fov_mask: torch.Tensor, class_names: tuple[str, ...]) -> Segmentation:
    valid = torch.isfinite(logits).all(dim=1)
    probs = torch.softmax(torch.nan_to_num(logits), dim=1)
    best, labels = probs.max(dim=1)
    labels = torch.where(valid, labels, torch.full_like(labels, UNLABELLED))
    best = torch.where(valid, best, torch.zeros_like(best))
    return Segmentation(
        labels.cpu().numpy().astype(np.int64),
        best.cpu().numpy().astype(np.float32),
        tuple(class_names),
        fov_mask.cpu().numpy().astype(bool),
    )
