"""The four reference cases of the original code, reproduced end to end."""

from __future__ import annotations

import numpy as np
import torch

import scalr_zoo
from scalr_zoo.preprocess import cell_indices, inside_fov, knn, voxel_first_points

from conftest import assert_matches_reference


def _kept(case):
    points = torch.from_numpy(case.points)
    cfg = case.config
    first = voxel_first_points(points[:, :3], cfg["voxel_size"])
    mask = inside_fov(points[:, :3], *cfg["fov"])
    return points, first[mask[first]]


def test_kept_points_identical(case):
    _, kept = _kept(case)
    np.testing.assert_array_equal(kept.numpy(), case.arrays["kept_index"])


def test_cell_indices_identical(case):
    points, kept = _kept(case)
    cfg = case.config
    cells = cell_indices(points[kept, :3], *cfg["fov"], cfg["grids"], cfg["dim_proj"])
    np.testing.assert_array_equal(cells.numpy(), case.arrays["cell_ind"])


def test_neighbour_sets_identical_both_backends(case):
    points, kept = _kept(case)
    xyz = points[kept, :3]
    expected = case.arrays["neighbors"]
    for backend in ("scipy", "torch"):
        nbr = knn(xyz, xyz, case.config["num_neighbors"] + 1, backend).numpy()
        np.testing.assert_array_equal(nbr[:, 0], np.arange(len(xyz)), err_msg=f"{backend}: self not first")
        np.testing.assert_array_equal(np.sort(nbr, 1), np.sort(expected, 1), err_msg=backend)


def test_upsampling_identical(case):
    points, kept = _kept(case)
    for backend in ("scipy", "torch"):
        up = knn(points[kept, :3], points[:, :3], 1, backend)[:, 0].numpy()
        np.testing.assert_array_equal(up, case.arrays["upsample"], err_msg=backend)


def test_backbone_and_head_match_original(case):
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu")
    assert_matches_reference(model.extract(case.points), case.arrays["backbone"])
    assert_matches_reference(model.extract(case.points, head=True), case.arrays["head"])


def test_torch_knn_backend_gives_same_features(pretrained_case, pretrained_model):
    """The GPU preprocessing path (brute-force torch kNN), run on the CPU."""
    feats = pretrained_model.extract(pretrained_case.points, knn_backend="torch")
    assert_matches_reference(feats, pretrained_case.arrays["backbone"])
