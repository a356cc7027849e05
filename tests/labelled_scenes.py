"""A small labelled synthetic street scene for the training tests.

``street_scene(seed)`` returns ``(points (N, 4) float32, labels (N,) int64)``
with the classes of :data:`STREET_CLASSES`. Intensities are uniform noise, so
only geometry tells the classes apart. Any generator with the same signature
(e.g. ``scalr_zoo.data.sample_scan`` once it exists) can replace it in the
tests through :data:`SCENE_GENERATORS`.
"""

from __future__ import annotations

import numpy as np

STREET_CLASSES = ("ground", "building", "car", "pole", "vegetation")
GROUND_Z = -1.7


def _ground(rng: np.random.Generator, n: int) -> np.ndarray:
    radius = 30.0 * np.sqrt(rng.random(n))
    angle = rng.uniform(0, 2 * np.pi, n)
    z = GROUND_Z + 0.03 * rng.standard_normal(n)
    return np.column_stack([radius * np.cos(angle), radius * np.sin(angle), z])


def _buildings(rng: np.random.Generator, n: int) -> np.ndarray:
    """Facades on both sides of a street along x, with varying setback and height."""
    side = rng.choice([-1.0, 1.0], n)
    x = rng.uniform(-28, 28, n)
    block = np.floor((x + 28) / 8)
    setback = 11.0 + 2.0 * np.sin(block * 1.7 + side)
    height = 6.0 + 4.0 * (1 + np.cos(block * 2.3 + 3 * side))
    z = GROUND_Z + height * rng.random(n)
    y = side * (setback + 0.03 * rng.standard_normal(n))
    return np.column_stack([x, y, z])


def _cars(rng: np.random.Generator, n: int) -> np.ndarray:
    """Boxes (4.2 x 1.8 x 1.5 m) parked in two lanes, sampled on their top and sides."""
    centers = np.column_stack([rng.uniform(-25, 25, 8), rng.choice([-4.0, 4.0], 8)])
    which = rng.integers(0, len(centers), n)
    size = np.array([4.2, 1.8, 1.5])
    local = rng.uniform(-0.5, 0.5, (n, 3)) * size
    face = rng.integers(0, 3, n)  # 0: top, 1: side along x, 2: side along y
    local[face == 0, 2] = size[2] / 2
    local[face == 1, 1] = np.sign(local[face == 1, 1]) * size[1] / 2
    local[face == 2, 0] = np.sign(local[face == 2, 0]) * size[0] / 2
    xyz = local + np.column_stack([centers[which], np.full(n, GROUND_Z + size[2] / 2)])
    return xyz


def _poles(rng: np.random.Generator, n: int) -> np.ndarray:
    """Thin vertical cylinders (radius 0.12 m, 6 m) along the sidewalks."""
    bases = np.column_stack([np.arange(-24, 25, 8.0), np.full(7, 7.5)])
    bases = np.concatenate([bases, bases * [1, -1]])
    which = rng.integers(0, len(bases), n)
    angle = rng.uniform(0, 2 * np.pi, n)
    xy = bases[which] + 0.12 * np.column_stack([np.cos(angle), np.sin(angle)])
    return np.column_stack([xy, GROUND_Z + 6.0 * rng.random(n)])


def _vegetation(rng: np.random.Generator, n: int) -> np.ndarray:
    """Noisy crowns (radius 1.5-2.5 m, 3-6 m up) of trees between the poles."""
    centers = np.column_stack([rng.uniform(-26, 26, 10), rng.choice([-9.0, 9.0], 10), rng.uniform(3, 6, 10) + GROUND_Z])
    radii = rng.uniform(1.5, 2.5, 10)
    which = rng.integers(0, len(centers), n)
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = radii[which] * rng.uniform(0.6, 1.0, n)
    return centers[which] + direction * radius[:, None]


def street_scene(seed: int, num_points: int = 12000) -> tuple[np.ndarray, np.ndarray]:
    """A labelled street: ground, building facades, cars, poles, tree crowns.

    Returns:
        ``(N, 4)`` float32 points (x, y, z, intensity in [0, 1]) and ``(N,)``
        int64 labels indexing :data:`STREET_CLASSES`, shuffled.
    """
    rng = np.random.default_rng(seed)
    shares = np.array([0.40, 0.25, 0.15, 0.05, 0.15])
    counts = np.floor(shares * num_points).astype(int)
    parts = [_ground, _buildings, _cars, _poles, _vegetation]
    xyz = np.concatenate([make(rng, n) for make, n in zip(parts, counts)])
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    order = rng.permutation(len(labels))
    points = np.column_stack([xyz, rng.random(len(xyz))]).astype(np.float32)
    return points[order], labels[order]


#: Labelled scene generators the training tests run on: ``generator(seed) -> (points, labels)``.
SCENE_GENERATORS = {"street_scene": (street_scene, STREET_CLASSES)}


def sample_street(seed: int, num_points: int = 8000) -> tuple[np.ndarray, np.ndarray]:
    """The package's own ray-cast sample scan (32-beam lidar), ``num_points`` of it within 30 m."""
    import scalr_zoo

    scan = scalr_zoo.sample_scan(seed)
    near = np.flatnonzero(np.linalg.norm(scan.points[:, :2], axis=1) < 30)
    keep = np.sort(np.random.default_rng(seed).choice(near, size=min(num_points, len(near)), replace=False))
    return scan.points[keep], scan.labels[keep]


def _sample_scan_classes() -> tuple[str, ...]:
    import scalr_zoo

    return scalr_zoo.sample_scan(0).label_names


SCENE_GENERATORS["sample_scan"] = (sample_street, _sample_scan_classes())
