"""Preprocessing of raw scans, as the original evaluation does it (spec, section 4).

Every step runs in torch on the device of its input, so CUDA clouds never
round-trip through numpy. The only exception is the CPU k-nearest-neighbour
search, which uses scipy's KD-tree (exact, and much faster than brute force);
``knn_backend="torch"`` forces the brute-force torch search on any device.

Steps for one cloud of N points:
1. features (intensity normalised, x, y, z, radius),
2. voxelisation keeping the first point of each voxel (keys in float64),
3. crop to the field of view,
4. flat cell index on each projection plane (float64),
5. K+1 nearest kept points of every kept point (itself first),
6. nearest kept point of every input point (for upsampling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import PreprocessConfig
from .model import PackedInput

__all__ = [
    "PreparedCloud",
    "point_features",
    "voxel_first_points",
    "inside_fov",
    "cell_indices",
    "knn",
    "prepare_cloud",
    "pack_clouds",
]

#: Margin (m) inside the FOV bounds, as in the original code.
FOV_MARGIN = 1e-4
#: Query rows per chunk of the brute-force torch kNN.
KNN_CHUNK = 1024


@dataclass
class PreparedCloud:
    """One preprocessed cloud.

    Attributes:
        features: ``(M, 5)`` float32 network input of the kept points.
        neighbors: ``(M, K+1)`` int64 indices into the kept points, self first.
        cell_index: ``(P, M)`` int64 flat cell per projection plane.
        kept_index: ``(M,)`` int64 indices of the kept points into the input.
        upsample: ``(N,)`` int64 index of the nearest kept point of every input point.
        fov_mask: ``(N,)`` bool, whether each input point lies inside the FOV.
    """

    features: torch.Tensor
    neighbors: torch.Tensor
    cell_index: torch.Tensor
    kept_index: torch.Tensor
    upsample: torch.Tensor
    fov_mask: torch.Tensor

    @property
    def num_kept(self) -> int:
        return int(self.kept_index.shape[0])

    def to(self, device: torch.device | str) -> "PreparedCloud":
        """A copy with every tensor on ``device``."""
        return PreparedCloud(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def point_features(points: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(N, >=4)`` points -> ``(N, 5)`` float32: (i - mean)/std, x, y, z, radius."""
    xyz = points[:, :3].float()
    intensity = (points[:, 3:4].float() - mean) / std
    radius = torch.linalg.vector_norm(xyz, dim=1, keepdim=True)
    return torch.cat([intensity, xyz, radius], dim=1)


def voxel_first_points(xyz: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Indices of the first point (input order) of each occupied voxel.

    Voxel key = integer part of ``(xyz - min(xyz)) / voxel_size`` in float64.
    The result is ordered by key (x, then y, then z), as the original lists it.

    Args:
        xyz: ``(N, 3)`` coordinates.
    Returns:
        ``(V,)`` int64 indices into ``xyz``.
    """
    coords = xyz.double()
    keys = torch.floor((coords - coords.min(dim=0).values) / voxel_size).long()
    extent = keys.max(dim=0).values + 1
    n = xyz.shape[0]
    arange = torch.arange(n, device=xyz.device)
    if float(extent[0]) * float(extent[1]) * float(extent[2]) < 2**62:
        flat = (keys[:, 0] * extent[1] + keys[:, 1]) * extent[2] + keys[:, 2]
        _, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    else:  # a scan too large to fold the key into one int64
        _, inverse = torch.unique(keys, dim=0, sorted=True, return_inverse=True)
    num_voxels = int(inverse.max()) + 1
    first = torch.full((num_voxels,), n, dtype=torch.long, device=xyz.device)
    return first.scatter_reduce_(0, inverse, arange, reduce="amin")


def inside_fov(xyz: torch.Tensor, fov_min: Sequence[float], fov_max: Sequence[float]) -> torch.Tensor:
    """``(N,)`` bool: strictly inside the FOV with the 1e-4 m margin on every axis."""
    lo = torch.tensor(fov_min, dtype=torch.float64, device=xyz.device) + FOV_MARGIN
    hi = torch.tensor(fov_max, dtype=torch.float64, device=xyz.device) - FOV_MARGIN
    coords = xyz.double()
    return ((coords > lo) & (coords < hi)).all(dim=1)


def cell_indices(
    xyz: torch.Tensor,
    fov_min: Sequence[float],
    fov_max: Sequence[float],
    grids: Sequence[Sequence[int]],
    dim_proj: Sequence[int],
) -> torch.Tensor:
    """Flat 2D cell of every point on each projection plane.

    For projection axis ``a`` the plane axes are the other two, (u, v) in
    increasing order; ``q = int((p - fov_min) / ((fov_max - fov_min) / grid))``
    and the cell is ``q_u * grid_v + q_v``, computed in float64.

    Args:
        xyz: ``(M, 3)`` coordinates, all inside the FOV.
    Returns:
        ``(P, M)`` int64.
    """
    coords = xyz.double()
    rows = []
    for axis, (gu, gv) in zip(dim_proj, grids):
        u, v = (d for d in range(3) if d != axis)
        cu = (fov_max[u] - fov_min[u]) / gu
        cv = (fov_max[v] - fov_min[v]) / gv
        qu = ((coords[:, u] - fov_min[u]) / cu).long().clamp_(0, gu - 1)
        qv = ((coords[:, v] - fov_min[v]) / cv).long().clamp_(0, gv - 1)
        rows.append(qu * gv + qv)
    return torch.stack(rows)


def _knn_torch(reference: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Brute-force exact kNN on any device, in chunks of queries (sorted by distance)."""
    out = []
    for start in range(0, queries.shape[0], KNN_CHUNK):
        q = queries[start : start + KNN_CHUNK]
        dist = (q.unsqueeze(1) - reference.unsqueeze(0)).square_().sum(dim=2)
        out.append(dist.topk(k, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out)


def _knn_scipy(reference: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    from scipy.spatial import cKDTree

    tree = cKDTree(reference.double().numpy())
    _, idx = tree.query(queries.double().numpy(), k=k, workers=-1)
    idx = np.asarray(idx, dtype=np.int64).reshape(queries.shape[0], k)
    return torch.from_numpy(idx)


def knn(reference: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Indices of the ``k`` nearest ``reference`` points of every query, nearest first.

    Args:
        reference: ``(M, 3)``.
        queries: ``(Q, 3)``, same device.
        k: neighbours per query (``k <= M``).
        backend: ``"scipy"`` (KD-tree, CPU tensors only), ``"torch"`` (brute
            force, any device) or ``"auto"`` (scipy on CPU, torch elsewhere).
    Returns:
        ``(Q, k)`` int64 on the device of ``queries``.
    """
    if backend == "auto":
        backend = "scipy" if queries.device.type == "cpu" else "torch"
    if backend == "scipy":
        if queries.device.type != "cpu":
            raise ValueError("knn_backend='scipy' needs CPU tensors; use 'torch' or 'auto' on GPU")
        return _knn_scipy(reference, queries, k)
    if backend == "torch":
        return _knn_torch(reference.float(), queries.float(), k)
    raise ValueError(f"knn_backend must be 'auto', 'scipy' or 'torch', got {backend!r}")


def prepare_cloud(
    points: torch.Tensor,
    config: PreprocessConfig,
    dim_proj: Sequence[int],
    knn_backend: str = "auto",
) -> PreparedCloud:
    """Run every preprocessing step on one cloud.

    Args:
        points: ``(N, >=4)`` finite float points (x, y, z, intensity, ...) on
            the target device.
        config: FOV, grids, voxel size, K and intensity statistics.
        dim_proj: projection axis of each plane.
    Raises:
        ValueError: no point inside the FOV, or fewer kept points than K+1.
    """
    xyz = points[:, :3]
    first = voxel_first_points(xyz, config.voxel_size)
    fov_mask = inside_fov(xyz, config.fov_min, config.fov_max)
    kept = first[fov_mask[first]]
    k = config.num_neighbors + 1
    if kept.numel() == 0:
        raise ValueError(
            f"no point lies inside the field of view {config.fov_min} .. {config.fov_max} "
            f"(the cloud spans {tuple(xyz.min(0).values.tolist())} .. {tuple(xyz.max(0).values.tolist())}); "
            "check the coordinate frame and units (metres, sensor frame) or pass fov="
        )
    if kept.numel() < k:
        raise ValueError(
            f"only {kept.numel()} points are left after voxelisation ({config.voxel_size} m) and the FOV crop, "
            f"fewer than the {k} (K+1) the network's neighbourhoods need; give a denser cloud"
        )
    kept_xyz = xyz[kept].float()
    features = point_features(points[kept], config.intensity_mean, config.intensity_std)
    cells = cell_indices(xyz[kept], config.fov_min, config.fov_max, config.grids, dim_proj)
    neighbors = knn(kept_xyz, kept_xyz, k, knn_backend).to(points.device)
    upsample = knn(kept_xyz, xyz.float(), 1, knn_backend).to(points.device)[:, 0]
    return PreparedCloud(features, neighbors, cells, kept, upsample, fov_mask)


def pack_clouds(
    clouds: Sequence[PreparedCloud], grids: Sequence[Sequence[int]]
) -> tuple[PackedInput, list[int]]:
    """Concatenate prepared clouds into one :class:`PackedInput`.

    Neighbour indices are shifted to global rows and cells offset per cloud.

    Returns:
        The packed input and the row offset of each cloud (length B+1).
    """
    offsets = [0]
    for cloud in clouds:
        offsets.append(offsets[-1] + cloud.num_kept)
    plane_sizes = torch.tensor([gu * gv for gu, gv in grids], device=clouds[0].features.device).view(-1, 1)
    features = torch.cat([c.features for c in clouds])
    neighbors = torch.cat([c.neighbors + off for c, off in zip(clouds, offsets)])
    cell_index = torch.cat([c.cell_index + b * plane_sizes for b, c in enumerate(clouds)], dim=1)
    grids = tuple(tuple(int(v) for v in g) for g in grids)
    return PackedInput(features, neighbors, cell_index, grids, len(clouds)), offsets
