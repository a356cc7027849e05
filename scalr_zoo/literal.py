"""The forward pass exactly as the spec states it: the slow ground truth.

Spec section 3, step by step, with nothing folded, fused or skipped: tokens
are channel-major ``(1, C, N)`` per cloud, every pointwise map is a kernel-1
convolution, the embedding materialises its ``(1, C, N, K)`` neighbour
tensors, and every spatial mix allocates a fresh dense ``(1, C, rows, cols)``
grid, scatters cell means into it, runs the two depthwise 3x3 convolutions
over the whole grid and gathers each point's cell back.

It reads the weights of a :class:`~scalr_zoo.model.WaffleIron` and serves
two purposes: the tests check the module's forward and the fast engine
against it, and the benchmark measures their speed-ups over it. Use
``extract(..., impl="literal")``; it is far too slow and memory-hungry for
real work (a nuScenes-sized scan with WI-48-768: about a minute and 3 GB
on a 2-core CPU, most of the memory in the embedding's ``(1, C, N, K)``
neighbour tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import PackedInput, WaffleIron

__all__ = ["literal_forward"]


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm or LayerNorm of channel-major ``x`` (1, C, ...)."""
    if isinstance(module, nn.LayerNorm):
        moved = x.movedim(1, -1)
        return F.layer_norm(moved, module.normalized_shape, module.weight, module.bias, module.eps).movedim(-1, 1)
    return F.batch_norm(
        x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
    )


def _embedding(model: WaffleIron, features: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """Spec step 1: ``(1, 5, N)`` features, ``(1, K+1, N)`` neighbours -> ``(1, C, N)``."""
    embed = model.embed
    x = _norm(embed.norm, features)
    point_term = embed.conv1(x)
    differences = torch.stack(
        [x[:, :, neighbors[0, j]] - x for j in range(1, neighbors.shape[1])], dim=-1
    )  # (1, 5, N, K)
    bn_in, conv_a, bn_mid, act, conv_b = embed.conv2
    hidden = _norm(bn_in, differences)
    hidden = conv_a(hidden)
    hidden = act(_norm(bn_mid, hidden))
    neighbor_term = conv_b(hidden).amax(dim=-1)
    return embed.final(torch.cat([point_term, neighbor_term], dim=1))


def _spatial_mix(layer: nn.Module, tokens: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Spec step 2, spatial mix of ``(1, C, N)`` tokens on a dense ``(1, C, rows, cols)`` grid."""
    y = _norm(layer.norm, tokens)
    rows, cols = grid
    channels = y.shape[1]
    sums = torch.zeros(1, channels, rows * cols, dtype=y.dtype, device=y.device)
    sums.index_add_(2, cells, y)
    counts = torch.zeros(rows * cols, dtype=y.dtype, device=y.device)
    counts.index_add_(0, cells, torch.ones_like(cells, dtype=y.dtype))
    image = (sums / counts.clamp(min=1)).view(1, channels, rows, cols)
    conv_a, act, conv_b = layer.ffn
    image = conv_b(act(conv_a(image)))
    image = F.conv1d(image.view(1, channels, rows * cols), layer.scale.weight, groups=channels)
    return tokens + image[:, :, cells]


def _channel_mix(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Spec step 2, channel mix of ``(1, C, N)`` tokens."""
    linear_a, act, linear_b = layer.mlp
    branch = linear_b(act(linear_a(_norm(layer.norm, tokens))))
    return tokens + F.conv1d(branch, layer.scale.weight, groups=branch.shape[1])


def _head(head: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Spec step 3 on ``(1, C, N)`` tokens -> ``(1, out, N)``."""
    if isinstance(head, nn.Conv1d):
        return head(tokens)
    x = tokens
    for part in head:
        x = _norm(part, x) if isinstance(part, nn.BatchNorm1d) else part(x)
    return x


def _cloud_forward(
    model: WaffleIron,
    features: torch.Tensor,
    neighbors: torch.Tensor,
    cells: torch.Tensor,
    grids: tuple[tuple[int, int], ...],
    head: bool,
) -> torch.Tensor:
    """One cloud: ``(N, 5)`` features, ``(N, K+1)`` local neighbours, ``(P, N)`` local cells -> ``(N, C|out)``."""
    backbone = model.waffleiron
    tokens = _embedding(model, features.t().unsqueeze(0), neighbors.t().unsqueeze(0))
    for d in range(len(backbone.spatial_mix)):
        plane = d % len(backbone.dim_proj)
        tokens = _spatial_mix(backbone.spatial_mix[d], tokens, cells[plane], grids[plane])
        tokens = _channel_mix(backbone.channel_mix[d], tokens)
    if head:
        tokens = _head(model.classif, tokens)
    return tokens[0].t()


@torch.no_grad()
def literal_forward(model: WaffleIron, packed: PackedInput, head: bool = False) -> torch.Tensor:
    """Eval-mode outputs of packed kept points, computed as the spec states it.

    Each cloud of the batch runs on its own as a ``(1, C, N)`` token tensor
    (the spec's padded batch gives the same numbers: padding is excluded from
    the cell means and never read).

    Args:
        model: the network; its weights are read, its mode is ignored (eval
            semantics: BatchNorm running statistics, no drop-path).
        packed: kept points of B clouds, as :func:`scalr_zoo.preprocess.pack_clouds` makes them.
        head: head outputs instead of backbone features.

    Returns:
        ``(M, C)`` backbone features or ``(M, out)`` head outputs, in the
        model's dtype, rows in packed order.
    """
    if head and not model.has_head:
        raise ValueError("this model has no head; use head=False for backbone features")
    plane_cells = packed.grids[0][0] * packed.grids[0][1]
    cloud_of_row = packed.cell_index[0] // plane_cells
    starts = torch.searchsorted(cloud_of_row, torch.arange(packed.num_clouds + 1, device=cloud_of_row.device))
    outputs = []
    for cloud, (start, stop) in enumerate(zip(starts[:-1].tolist(), starts[1:].tolist())):
        cells = torch.stack(
            [packed.cell_index[p, start:stop] - cloud * rows * cols for p, (rows, cols) in enumerate(packed.grids)]
        )
        outputs.append(
            _cloud_forward(
                model,
                packed.features[start:stop],
                packed.neighbors[start:stop] - start,
                cells,
                packed.grids,
                head,
            )
        )
    return torch.cat(outputs)
