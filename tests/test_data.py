"""The built-in sample scan: deterministic, shaped like a 32-beam street scan, labelled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scalr_zoo
from scalr_zoo.data import AZIMUTH_STEPS, ELEVATIONS_DEG, LABEL_NAMES, MAX_RANGE, SENSOR_HEIGHT, sample_scan


def test_deterministic_and_copies():
    a, b = sample_scan(), sample_scan(0)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    a.points[:] = 0  # the caller's copy; the next call is unchanged
    assert np.abs(sample_scan().points).sum() > 0
    other = sample_scan(1)
    assert len(other) != len(b) or not np.array_equal(other.points, b.points)


def test_shape_types_and_labels():
    scan = sample_scan()
    assert 25_000 <= len(scan) <= 60_000
    assert scan.points.dtype == np.float32 and scan.points.shape == (len(scan), 4)
    assert scan.labels.dtype == np.int64 and scan.labels.shape == (len(scan),)
    assert scan.label_names == LABEL_NAMES and scan.sensor == "semantickitti"
    assert np.isfinite(scan.points).all()
    intensity = scan.points[:, 3]
    assert intensity.min() >= 0 and intensity.max() <= 1
    # KITTI-like statistics, which the semantickitti preset normalises (mean 0.286, std 0.141)
    assert 0.2 < intensity.mean() < 0.35 and 0.08 < intensity.std() < 0.2
    counts = np.bincount(scan.labels, minlength=len(LABEL_NAMES))
    assert (counts > 0).all(), dict(zip(LABEL_NAMES, counts))


def test_points_lie_on_the_sensor_beams():
    """Every return sits on one of the 32 beams and 1800 azimuth steps (noise is along the ray)."""
    xyz = sample_scan().points[:, :3].astype(np.float64)
    rng_xy = np.hypot(xyz[:, 0], xyz[:, 1])
    elevation = np.rad2deg(np.arctan2(xyz[:, 2], rng_xy))
    nearest = np.abs(elevation[:, None] - ELEVATIONS_DEG[None, :]).min(axis=1)
    assert nearest.max() < 0.01
    steps = np.rad2deg(np.arctan2(xyz[:, 1], xyz[:, 0])) / (360.0 / AZIMUTH_STEPS)
    assert np.abs(steps - np.round(steps)).max() < 0.01
    assert np.linalg.norm(xyz, axis=1).max() < MAX_RANGE + 0.2


def test_scene_geometry_and_intensity_by_material():
    scan = sample_scan()
    xyz, intensity, labels = scan.points[:, :3], scan.points[:, 3], scan.labels
    name = {n: i for i, n in enumerate(LABEL_NAMES)}
    road = labels == name["road"]
    # the road is the ground plane 1.73 m under the sensor, with a few cm of range noise
    assert abs(np.median(xyz[road, 2]) + SENSOR_HEIGHT) < 0.01
    assert np.percentile(np.abs(xyz[road, 2] + SENSOR_HEIGHT), 95) < 0.05
    # sidewalks are a curb higher; buildings and poles stand tall
    assert np.median(xyz[labels == name["sidewalk"], 2]) > -SENSOR_HEIGHT + 0.1
    assert xyz[labels == name["building"], 2].max() > 3.0
    assert xyz[labels == name["pole"], 2].max() > 1.0
    # bright paint and signs, dark asphalt, grazing returns darker than near ones
    mean = {n: intensity[labels == i].mean() for n, i in name.items()}
    assert mean["traffic-sign"] > 0.7 > mean["vegetation"] > mean["road"]
    near = road & (np.linalg.norm(xyz, axis=1) < 8)
    far = road & (np.linalg.norm(xyz, axis=1) > 20)
    assert np.median(intensity[near]) > np.median(intensity[far])


def test_seeds_change_the_layout():
    scans = [sample_scan(seed) for seed in range(3)]
    counts = [np.bincount(s.labels, minlength=len(LABEL_NAMES)) for s in scans]
    assert not np.array_equal(counts[0], counts[1]) and not np.array_equal(counts[1], counts[2])
    with pytest.raises(ValueError, match="non-negative integer"):
        sample_scan(-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        sample_scan("0")


def test_sample_scan_runs_through_a_model():
    scan = scalr_zoo.sample_scan()
    model = scalr_zoo.create_model({"width": 32, "depth": 2, "head": "none", "sensor": scan.sensor})
    features, inside = model.extract(scan.points, return_fov_mask=True)
    assert features.shape == (len(scan), 32) and torch.isfinite(features).all()
    assert inside.float().mean() > 0.9  # the street beyond 64 m lies outside the ScaLR FOV
