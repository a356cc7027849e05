"""extract(): batching, determinism, options and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scalr_zoo
from scalr_zoo.config import SENSOR_PRESETS

from conftest import assert_matches_reference, random_scan


def test_list_of_clouds_equals_each_alone(pretrained_case, pretrained_model):
    clouds = [pretrained_case.points, random_scan(3000, seed=1), pretrained_case.points[:4000]]
    batched = pretrained_model.extract(clouds)
    assert isinstance(batched, list) and len(batched) == 3
    for cloud, feats in zip(clouds, batched):
        alone = pretrained_model.extract(cloud)
        assert feats.shape == (len(cloud), pretrained_model.num_features)
        torch.testing.assert_close(feats, alone, rtol=1e-5, atol=1e-5)
    assert_matches_reference(batched[0], pretrained_case.arrays["backbone"])


def test_batch_size_splits_the_list(pretrained_case, pretrained_model):
    clouds = [random_scan(2000, seed=s) for s in range(3)]
    whole = pretrained_model.extract(clouds)
    split = pretrained_model.extract(clouds, batch_size=2)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_runs_are_bit_identical(pretrained_case, pretrained_model):
    a = pretrained_model.extract(pretrained_case.points, head=True)
    b = pretrained_model.extract(pretrained_case.points, head=True)
    assert torch.equal(a, b)


def test_output_rows_follow_input_order(pretrained_model):
    # Points 0.3 m apart (jitter 0.05 m) each have a voxel of their own, so a
    # permutation keeps the same points and the output rows must permute along.
    rng = np.random.default_rng(0)
    ij = np.stack(np.meshgrid(np.arange(60), np.arange(60)), -1).reshape(-1, 2)
    xy = ij * 0.3 - 9.0 + rng.uniform(-0.05, 0.05, size=ij.shape)
    z = 0.2 * np.sin(xy[:, :1]) - 1.5
    cloud = np.column_stack([xy, z, rng.random(len(xy))]).astype(np.float32)
    perm = rng.permutation(len(cloud))
    base = pretrained_model.extract(cloud)
    shuffled = pretrained_model.extract(cloud[perm])
    torch.testing.assert_close(shuffled, base[perm], rtol=1e-5, atol=1e-5)


def test_torch_input_float64_and_extra_columns(pretrained_case, pretrained_model):
    pts = pretrained_case.points
    extra = np.column_stack([pts, np.full(len(pts), 7.0, np.float32)])
    expected = pretrained_case.arrays["backbone"]
    assert_matches_reference(pretrained_model.extract(torch.from_numpy(extra)), expected)
    assert_matches_reference(pretrained_model.extract(pts.astype(np.float64)), expected)


def test_sensor_override_equals_preset_statistics(pretrained_case, pretrained_model):
    pts = pretrained_case.points
    by_name = pretrained_model.extract(pts, sensor="nuscenes")
    by_pair = pretrained_model.extract(pts, sensor=SENSOR_PRESETS["nuscenes"])
    torch.testing.assert_close(by_name, by_pair, rtol=0, atol=0)
    default = pretrained_model.extract(pts)
    assert not torch.allclose(by_name, default)
    # the model's own statistics (KITTI) given explicitly change nothing
    torch.testing.assert_close(pretrained_model.extract(pts, sensor="semantickitti"), default, rtol=0, atol=0)


def test_fov_mask_and_fov_override(pretrained_case):
    case = pretrained_case
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu")
    pts = case.points
    feats, mask = model.extract(pts, return_fov_mask=True)
    assert mask.dtype == torch.bool and mask.shape == (len(pts),)
    def expected_mask(lo, hi):
        return ((pts[:, :3] > np.add(lo, 1e-4)) & (pts[:, :3] < np.subtract(hi, 1e-4))).all(1)

    np.testing.assert_array_equal(mask.numpy(), expected_mask(*case.config["fov"]))
    assert not mask.all()  # the scan reaches 77 m ahead, beyond the 64 m FOV
    # Narrow the FOV to +-32 m: the grids follow (0.5 m cells kept).
    narrow = ((-32, -32, -8), (32, 32, 8))
    feats_n, mask_n = model.extract(pts, fov=narrow, return_fov_mask=True)
    np.testing.assert_array_equal(mask_n.numpy(), expected_mask(*narrow))
    assert mask_n.sum() < mask.sum()
    assert not torch.allclose(feats_n, feats)
    # the override is an extraction option: the model's config is unchanged
    assert model.config.preprocess.grids == ((256, 256), (256, 32), (256, 32))
    # Grids follow the FOV: an explicit grid of the same cell size is identical.
    explicit = model.extract(pts, fov=narrow, grids=[[128, 128], [128, 32], [128, 32]])
    torch.testing.assert_close(explicit, feats_n, rtol=0, atol=0)
    with pytest.raises(ValueError, match="whole number"):
        model.extract(pts, fov=((-32.2, -32, -8), (32, 32, 8)))


def test_points_outside_fov_take_nearest_kept_features(pretrained_case, pretrained_model):
    pts = pretrained_case.points
    far = pts[:5].copy()
    far[:, 0] += 200.0  # far outside the +-64 m FOV; the scan's minimum is unchanged
    cloud = np.concatenate([pts, far])
    feats, mask = pretrained_model.extract(cloud, return_fov_mask=True)
    assert not mask[-5:].any()
    kept = pretrained_case.arrays["kept_index"]
    dist = np.linalg.norm(far[:, None, :3] - pts[kept][None, :, :3], axis=2)
    nearest_kept = kept[dist.argmin(1)]
    torch.testing.assert_close(feats[-5:], feats[torch.from_numpy(nearest_kept)], rtol=0, atol=0)
    assert_matches_reference(feats[:-5], pretrained_case.arrays["backbone"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16"])
def test_autocast_bf16_close_to_float32(pretrained_case, pretrained_model, dtype):
    ref = pretrained_model.extract(pretrained_case.points)
    low = pretrained_model.extract(pretrained_case.points, dtype=dtype)
    assert low.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=1)
    assert cos.min() > 0.99
    assert not torch.equal(low, ref)


def test_extract_restores_training_mode(pretrained_case):
    case = pretrained_case
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu").train()
    assert_matches_reference(model.extract(case.points), case.arrays["backbone"])
    assert all(m.training for m in model.modules())


def test_head_false_model_without_head():
    model = scalr_zoo.create_model({"width": 32, "depth": 2, "head": "none"})
    feats = model.extract(random_scan(500))
    assert feats.shape == (500, 32)
    with pytest.raises(ValueError, match="no head"):
        model.extract(random_scan(500), head=True)


# --- bad input --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return scalr_zoo.create_model({"width": 32, "depth": 2, "head": "linear", "out": 4})


@pytest.mark.parametrize(
    "points, message",
    [
        (np.zeros((10, 3), np.float32), r"shape \(N, 4\+\)"),
        (np.zeros((10,), np.float32), r"shape \(N, 4\+\)"),
        (np.zeros((2, 10, 4), np.float32), r"shape \(N, 4\+\)"),
        (np.zeros((0, 4), np.float32), "empty"),
        (np.array([["a", "b", "c", "d"]]), "real numbers"),
        (np.zeros((10, 4), np.complex64), "real numbers"),
        (torch.zeros(10, 4, dtype=torch.bool), "real numbers"),
        ([[0.0, 0.0, 0.0, 0.0]], "numpy array or a torch tensor"),
        ([], "empty list"),
    ],
)
def test_bad_input_is_a_clear_value_error(small_model, points, message):
    with pytest.raises(ValueError, match=message):
        small_model.extract(points)


def test_nan_and_inf_are_counted_and_can_be_dropped(small_model):
    pts = random_scan(2000, seed=3)
    pts[[5, 17, 99], 0] = np.nan
    pts[200, 3] = np.inf
    with pytest.raises(ValueError, match="4 of 2000 points with NaN or Inf"):
        small_model.extract(pts)
    feats, mask = small_model.extract(pts, drop_nonfinite=True, return_fov_mask=True)
    bad = np.zeros(2000, bool)
    bad[[5, 17, 99, 200]] = True
    assert feats.shape == (2000, 32)
    assert torch.isnan(feats[torch.from_numpy(bad)]).all()
    assert torch.isfinite(feats[torch.from_numpy(~bad)]).all()
    assert not mask[torch.from_numpy(bad)].any()
    clean = small_model.extract(pts[~bad])
    torch.testing.assert_close(feats[torch.from_numpy(~bad)], clean, rtol=0, atol=0)


def test_no_point_inside_fov(small_model):
    pts = random_scan(1000)
    pts[:, 0] += 500.0
    with pytest.raises(ValueError, match="no point lies inside the field of view"):
        small_model.extract(pts)


def test_too_few_points(small_model):
    pts = random_scan(10)
    with pytest.raises(ValueError, match="fewer than the 17"):
        small_model.extract(pts)
    # duplicates collapse into one voxel: 100 copies of 5 points are 5 kept points
    dup = np.repeat(random_scan(5), 100, axis=0)
    with pytest.raises(ValueError, match="only 5 points"):
        small_model.extract(dup)


def test_error_names_the_cloud_in_a_list(small_model):
    with pytest.raises(ValueError, match=r"points\[1\]"):
        small_model.extract([random_scan(500), random_scan(5)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sensor": "velodyne"}, "unknown sensor preset"),
        ({"sensor": (1.0, 0.0)}, "std > 0"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"dtype": torch.float64}, "dtype must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"knn_backend": "faiss"}, "knn_backend"),
        ({"fov": ((0, 0, 0), (-1, 1, 1))}, "below fov_max"),
        ({"grids": [[10, 10]]}, "one \\(rows, cols\\) per projection plane"),
    ],
)
def test_bad_options(small_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_model.extract(random_scan(500), **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference_and_stays_on_device(case):
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cuda")
    pts = torch.from_numpy(case.points).cuda()
    feats = model.extract(pts)
    assert feats.device.type == "cuda"
    assert_matches_reference(feats, case.arrays["backbone"])
    assert_matches_reference(model.extract(pts, head=True), case.arrays["head"])
    low = model.extract(pts, dtype=torch.bfloat16)
    assert torch.nn.functional.cosine_similarity(low, feats, dim=1).min() > 0.99
