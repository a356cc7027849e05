"""Segmentation losses: cross-entropy and the Lovász-softmax surrogate of the IoU.

Lovász-softmax (Berman, Rannen Triki and Blaschko, CVPR 2018) minimises the
convex Lovász extension of the Jaccard loss ``1 - IoU`` of each class: sort the
per-point errors ``|[y == c] - p_c|`` in decreasing order and weight them by
the increments of the Jaccard loss along that order. On hard (0/1)
probabilities it equals ``1 - IoU_c`` exactly; it is averaged over the classes
present in the labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lovasz_softmax", "segmentation_loss"]


def _jaccard_increments(sorted_foreground: torch.Tensor) -> torch.Tensor:
    """Increments of ``1 - IoU`` as the points, taken in order, are mispredicted one by one.

    Args:
        sorted_foreground: ``(N,)`` float, 1 where the point belongs to the
            class, in decreasing order of error.
    Returns:
        ``(N,)`` float: entry i is ``J(first i+1 points wrong) - J(first i wrong)``.
    """
    total = sorted_foreground.sum()
    intersection = total - sorted_foreground.cumsum(0)
    union = total + (1.0 - sorted_foreground).cumsum(0)
    jaccard_loss = 1.0 - intersection / union
    return torch.cat([jaccard_loss[:1], jaccard_loss[1:] - jaccard_loss[:-1]])


def lovasz_softmax(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax loss averaged over the classes present in ``labels``.

    Args:
        probabilities: ``(N, K)`` class probabilities (softmax outputs).
        labels: ``(N,)`` int64 classes in ``[0, K)`` (ignored points removed).
    Returns:
        Scalar tensor; 0 when there is no point.
    """
    if labels.numel() == 0:
        return probabilities.sum() * 0.0
    losses = []
    for c in torch.unique(labels).tolist():
        foreground = (labels == c).to(probabilities.dtype)
        errors = (foreground - probabilities[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _jaccard_increments(foreground[order])))
    return torch.stack(losses).mean()


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, lovasz_weight: float = 0.0
) -> torch.Tensor:
    """Cross-entropy plus ``lovasz_weight`` times Lovász-softmax, as the original recipe combines them.

    Args:
        logits: ``(N, K)`` float.
        labels: ``(N,)`` int64 in ``[0, K)`` or ``ignore_index``.
        ignore_index: label of points that carry no loss.
        lovasz_weight: weight of the Lovász term (0: cross-entropy only).
    Returns:
        Scalar tensor (float32); 0 when every label is ignored.
    """
    logits = logits.float()
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits[valid], labels[valid])
    if lovasz_weight > 0:
        loss = loss + lovasz_weight * lovasz_softmax(logits[valid].softmax(dim=1), labels[valid])
    return loss
