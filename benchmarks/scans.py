"""Deterministic synthetic lidar scans for the benchmarks.

A spinning multi-beam sensor is ray-cast against a simple street scene: a
ground plane, building blocks along both sides, cars, poles and end walls
that close the street, so that every ray returns a point. Two sensor models
give scans of realistic size and density:

* ``"nuscenes"``: 32 beams from -30.67 to +10.67 degrees, 1084 azimuth steps,
  mounted 1.84 m high: 34,688 points, about 17.5k left after 0.1 m
  voxelisation;
* ``"kitti"``: 64 beams from -24.8 to +2.0 degrees, 1875 azimuth steps,
  mounted 1.73 m high: 120,000 points.

Intensities follow the sensor's convention (0..255 for nuScenes, 0..1 for
KITTI). The same ``seed`` always gives the same scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SensorModel", "SENSORS", "synthetic_scan"]


@dataclass(frozen=True)
class SensorModel:
    """A spinning lidar: beam elevations (degrees), azimuth steps and mounting height (m)."""

    beams: int
    elevation_min: float
    elevation_max: float
    azimuth_steps: int
    height: float
    intensity_scale: float


SENSORS = {
    "nuscenes": SensorModel(32, -30.67, 10.67, 1084, 1.84, 255.0),
    "kitti": SensorModel(64, -24.8, 2.0, 1875, 1.73, 1.0),
}


def _scene(rng: np.random.Generator, height: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes ``(B, 2, 3)`` (min, max corners), their reflectivity ``(B,)`` and poles ``(P, 4)`` (x, y, radius, top)."""
    ground = -height
    boxes, reflect = [], []
    # building blocks on both sides of the street, with gaps
    for side in (-1.0, 1.0):
        x = -58.0
        while x < 58.0:
            length = rng.uniform(8.0, 20.0)
            setback = rng.uniform(8.0, 24.0)
            depth = rng.uniform(6.0, 10.0)
            y0, y1 = sorted((side * setback, side * (setback + depth)))
            boxes.append(((x, y0, ground), (min(x + length, 58.0), y1, ground + rng.uniform(4.0, 15.0))))
            reflect.append(rng.uniform(0.2, 0.6))
            x += length + rng.uniform(1.0, 6.0)
        # back walls behind the buildings, so that rays through the gaps return
        y0, y1 = sorted((side * 50.0, side * 51.0))
        boxes.append(((-60.0, y0, ground), (60.0, y1, ground + 20.0)))
        reflect.append(0.3)
    # end walls closing the street
    for x0 in (-60.0, 59.0):
        boxes.append(((x0, -51.0, ground), (x0 + 1.0, 51.0, ground + 20.0)))
        reflect.append(0.35)
    # parked and moving cars
    for _ in range(40):
        cx = rng.uniform(-50.0, 50.0)
        cy = rng.choice([-7.0, -3.5, 3.5, 7.0]) + rng.uniform(-0.3, 0.3)
        if abs(cx) < 4.0 and abs(cy) < 4.0:
            continue
        size = np.array([rng.uniform(3.8, 5.0), rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.9)])
        lo = np.array([cx - size[0] / 2, cy - size[1] / 2, ground + 0.2])
        boxes.append((tuple(lo), tuple(lo + size)))
        reflect.append(rng.uniform(0.4, 0.9))
    poles = np.column_stack(
        [
            np.concatenate([np.linspace(-55, 55, 12), np.linspace(-52, 52, 12)]),
            np.concatenate([np.full(12, -8.6), np.full(12, 8.6)]),
            rng.uniform(0.12, 0.3, 24),
            ground + rng.uniform(4.0, 8.0, 24),
        ]
    )
    return np.asarray(boxes, dtype=np.float64), np.asarray(reflect), poles


def _hit_boxes(dirs: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest entry distance of rays from the origin into axis-aligned boxes (slab method)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs[:, None, :]  # (R, 1, 3)
        t0 = boxes[None, :, 0, :] * inv
        t1 = boxes[None, :, 1, :] * inv
    near = np.nan_to_num(np.minimum(t0, t1), nan=-np.inf).max(axis=2)
    far = np.nan_to_num(np.maximum(t0, t1), nan=np.inf).min(axis=2)
    hit = (near <= far) & (near > 0)
    t = np.where(hit, near, np.inf)
    return t.min(axis=1), t.argmin(axis=1)


def _hit_poles(dirs: np.ndarray, poles: np.ndarray, ground: float) -> np.ndarray:
    """Nearest distance of rays from the origin to vertical cylinders."""
    dx, dy = dirs[:, None, 0], dirs[:, None, 1]
    px, py, radius, top = (poles[None, :, i] for i in range(4))
    a = dx * dx + dy * dy
    b = -2.0 * (dx * px + dy * py)
    c = px * px + py * py - radius * radius
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    z = t * dirs[:, None, 2]
    ok = (disc >= 0) & (t > 0) & (z < top) & (z > ground)
    return np.where(ok, t, np.inf).min(axis=1)


def synthetic_scan(sensor: str = "nuscenes", seed: int = 0, chunk: int = 16384) -> np.ndarray:
    """A ``(N, 4)`` float32 scan (x, y, z, intensity) of the street scene seen by ``sensor``.

    Args:
        sensor: ``"nuscenes"`` (34,688 points) or ``"kitti"`` (120,000 points).
        seed: scene layout and noise.
        chunk: rays cast at a time (bounds memory).
    """
    model = SENSORS[sensor]
    rng = np.random.default_rng(seed)
    boxes, reflect, poles = _scene(rng, model.height)
    elevation = np.deg2rad(np.linspace(model.elevation_min, model.elevation_max, model.beams))
    azimuth = np.linspace(-np.pi, np.pi, model.azimuth_steps, endpoint=False)
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    az = az + rng.uniform(-0.3, 0.3, az.shape) * (2 * np.pi / model.azimuth_steps)
    dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
    ground = -model.height
    points = []
    for start in range(0, len(dirs), chunk):
        d = dirs[start : start + chunk]
        with np.errstate(divide="ignore"):
            t_ground = np.where(d[:, 2] < 0, ground / d[:, 2], np.inf)
        t_box, box = _hit_boxes(d, boxes)
        t_pole = _hit_poles(d, poles, ground)
        t = np.minimum(np.minimum(t_ground, t_box), t_pole)
        albedo = np.where(t == t_box, reflect[box], np.where(t == t_pole, 0.7, 0.15))
        on_ground = t == t_ground
        t = t + 0.01 * rng.standard_normal(len(t))
        xyz = d * t[:, None]
        xyz[on_ground, 2] += 0.02 * np.sin(0.3 * xyz[on_ground, 0]) * np.cos(0.2 * xyz[on_ground, 1])
        intensity = np.clip(albedo * np.exp(-t / 80.0) + 0.05 * rng.random(len(t)), 0.0, 1.0)
        points.append(np.column_stack([xyz, intensity * model.intensity_scale]))
    scan = np.concatenate(points).astype(np.float32)
    return scan[np.isfinite(scan).all(axis=1)]
