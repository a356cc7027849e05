"""A sample lidar scan made by the package itself: a ray-cast street scene.

:func:`sample_scan` builds a street (road with lane markings, raised
sidewalks, grass, buildings, parked cars, poles with signs, trees) from a
seed and scans it with a simulated 32-beam rotating lidar (elevations
-30.67 to +10.67 degrees, 1800 azimuth steps, 80 m range) mounted 1.73 m above
the road, in the sensor frame (x forward along the street, z up). Ranges get
2 cm Gaussian noise and a few returns are lost. Intensity is KITTI-like, in
[0, 1]: the surface's reflectivity at 905 nm (asphalt dark, paint, grass and
leaves bright, signs retro-reflective) scaled by the incidence angle, so
extract features with ``sensor="semantickitti"`` (the preset whose statistics
fit it).

Every point carries the ground-truth class of the object it hit, named after
the SemanticKITTI classes (:data:`LABEL_NAMES`). Nothing is stored on disk:
a scan is generated on demand (well under a second) and cached in memory.
Different seeds give different layouts, for experiments that need several scans.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SampleScan", "sample_scan", "LABEL_NAMES", "SAMPLE_SENSOR"]

#: Class names of :attr:`SampleScan.labels`, indexed by label id.
LABEL_NAMES = ("road", "sidewalk", "terrain", "building", "car", "pole", "traffic-sign", "trunk", "vegetation")
ROAD, SIDEWALK, TERRAIN, BUILDING, CAR, POLE, SIGN, TRUNK, VEGETATION = range(len(LABEL_NAMES))

#: The intensity normalisation preset that fits the sample scans.
SAMPLE_SENSOR = "semantickitti"

SENSOR_HEIGHT = 1.73
ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
AZIMUTH_STEPS = 1800
MAX_RANGE = 80.0
RANGE_NOISE = 0.02
DROPOUT = 0.02
CURB = 0.15


@dataclass(frozen=True)
class SampleScan:
    """One simulated scan.

    Attributes:
        points: ``(N, 4)`` float32 x, y, z, intensity (intensity in [0, 1]).
        labels: ``(N,)`` int64 class ids into ``label_names``.
        label_names: class names.
        seed: the seed of the scene layout and noise.
        sensor: the intensity normalisation preset to extract it with.
    """

    points: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...] = LABEL_NAMES
    seed: int = 0
    sensor: str = field(default=SAMPLE_SENSOR)

    def __len__(self) -> int:
        return int(self.points.shape[0])


def sample_scan(seed: int = 0) -> SampleScan:
    """A deterministic simulated street scan (about 45,000 points).

    Args:
        seed: picks the scene layout and the noise; the same seed gives the
            same scan, bit for bit.

    Returns:
        A :class:`SampleScan` whose arrays are fresh copies (safe to modify).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    points, labels = _generate(int(seed))
    return SampleScan(points.copy(), labels.copy(), LABEL_NAMES, int(seed), SAMPLE_SENSOR)


# ----------------------------------------------------------------------------- the scene


@dataclass
class _Scene:
    """Primitives of a street scene. Each row of a table is one object.

    boxes: (B, 8) centre x, y, z, half sizes x, y, z, yaw, reflectivity; box_labels (B,).
    cylinders: (C, 6) axis x, y, radius, z bottom, z top, reflectivity; cylinder_labels (C,).
    spheres: (S, 5) centre x, y, z, radius, reflectivity (foliage, porous).
    road_half: half width of the road; sidewalk_outer: |y| where the sidewalks end.
    ground_rho: reflectivity of road and terrain.
    """

    boxes: np.ndarray
    box_labels: np.ndarray
    cylinders: np.ndarray
    cylinder_labels: np.ndarray
    spheres: np.ndarray
    road_half: float
    sidewalk_outer: float
    ground_rho: tuple[float, float]


def _layout(rng: np.random.Generator) -> _Scene:
    ground = -SENSOR_HEIGHT
    road_half = rng.uniform(3.5, 5.0)
    sidewalk_outer = road_half + rng.uniform(2.0, 3.5)
    boxes: list[list[float]] = []
    box_labels: list[int] = []
    cylinders: list[list[float]] = []
    cylinder_labels: list[int] = []
    spheres: list[list[float]] = []

    def add_box(cx, cy, z0, z1, hx, hy, yaw, rho, label):
        boxes.append([cx, cy, (z0 + z1) / 2, hx, hy, (z1 - z0) / 2, yaw, rho])
        box_labels.append(label)

    for side in (-1.0, 1.0):
        # Sidewalk: a slab CURB high between the road and sidewalk_outer.
        width = sidewalk_outer - road_half
        add_box(0.0, side * (road_half + width / 2), ground, ground + CURB, 120.0, width / 2, 0.0,
                rng.uniform(0.26, 0.34), SIDEWALK)
        # Buildings: a row of blocks with gaps, set back from the sidewalk.
        x = -100.0 + rng.uniform(0, 10)
        while x < 100.0:
            length = rng.uniform(8, 25)
            if rng.random() > 0.15:
                setback = rng.uniform(0.5, 4.0)
                depth = rng.uniform(8, 15)
                height = rng.uniform(4, 18)
                add_box(x + length / 2, side * (sidewalk_outer + setback + depth / 2), ground, ground + height,
                        length / 2, depth / 2, rng.uniform(-0.04, 0.04), rng.uniform(0.18, 0.45), BUILDING)
            x += length + rng.uniform(0.0, 6.0)
        # Parked cars along the curb.
        x = -60.0 + rng.uniform(0, 8)
        while x < 60.0:
            length = rng.uniform(3.8, 4.9)
            if rng.random() < 0.6 and abs(x + length / 2) > 4.0:
                _add_car(add_box, rng, x + length / 2, side * (road_half - 1.15), length, ground)
            x += length + rng.uniform(1.0, 8.0)
        # Poles on the sidewalk, some with a sign plate.
        x = -70.0 + rng.uniform(0, 15)
        while x < 70.0:
            py = side * (road_half + 0.45)
            height = rng.uniform(4.0, 8.0)
            cylinders.append([x, py, rng.uniform(0.06, 0.14), ground + CURB, ground + height, rng.uniform(0.25, 0.4)])
            cylinder_labels.append(POLE)
            if rng.random() < 0.5:
                z0 = ground + rng.uniform(2.0, min(3.5, height - 0.7))
                add_box(x, py - side * 0.45, z0, z0 + 0.6, 0.02, 0.35, 0.0, rng.uniform(0.8, 0.95), SIGN)
            x += rng.uniform(15.0, 30.0)
        # Trees between the sidewalk and the buildings.
        x = -70.0 + rng.uniform(0, 10)
        while x < 70.0:
            tx, ty = x, side * (sidewalk_outer - rng.uniform(0.5, 1.0))
            trunk_top = ground + rng.uniform(2.0, 3.5)
            cylinders.append([tx, ty, rng.uniform(0.12, 0.28), ground + CURB, trunk_top, rng.uniform(0.2, 0.3)])
            cylinder_labels.append(TRUNK)
            radius = rng.uniform(1.5, 3.0)
            spheres.append([tx, ty, trunk_top + 0.7 * radius, radius, rng.uniform(0.4, 0.55)])
            x += rng.uniform(8.0, 25.0)
    # A few cars driving in the lanes, ahead and behind.
    for _ in range(rng.integers(1, 4)):
        cx = rng.choice([-1.0, 1.0]) * rng.uniform(8.0, 45.0)
        _add_car(add_box, rng, cx, rng.choice([-1.0, 1.0]) * road_half / 2.2, rng.uniform(3.9, 4.9), ground)
    return _Scene(
        np.array(boxes, dtype=np.float64),
        np.array(box_labels, dtype=np.int64),
        np.array(cylinders, dtype=np.float64),
        np.array(cylinder_labels, dtype=np.int64),
        np.array(spheres, dtype=np.float64).reshape(-1, 5),
        road_half,
        sidewalk_outer,
        (rng.uniform(0.14, 0.2), rng.uniform(0.35, 0.45)),
    )


def _add_car(add_box, rng: np.random.Generator, cx: float, cy: float, length: float, ground: float) -> None:
    """A car as a body box and a cabin box (glass is dark), slightly turned."""
    yaw = rng.uniform(-0.08, 0.08)
    paint = rng.uniform(0.08, 0.45)
    half_width = rng.uniform(0.85, 0.95)
    body_top = ground + rng.uniform(0.95, 1.1)
    add_box(cx, cy, ground + 0.25, body_top, length / 2, half_width, yaw, paint, CAR)
    cabin = length * rng.uniform(0.45, 0.6)
    shift = -0.1 * length
    add_box(cx + shift * np.cos(yaw), cy + shift * np.sin(yaw), body_top, body_top + rng.uniform(0.4, 0.55),
            cabin / 2, half_width - 0.08, yaw, rng.uniform(0.05, 0.12), CAR)


# ----------------------------------------------------------------------------- ray casting


def _ray_directions() -> np.ndarray:
    """(R, 3) unit directions, beam-major (all azimuths of the lowest beam first)."""
    elevation = np.deg2rad(ELEVATIONS_DEG)[:, None]
    azimuth = np.linspace(-np.pi, np.pi, AZIMUTH_STEPS, endpoint=False)[None, :]
    directions = np.stack(
        np.broadcast_arrays(np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)),
        axis=-1,
    )
    return directions.reshape(-1, 3)


class _Hits:
    """The nearest hit so far of every ray: distance, label, reflectivity, surface normal."""

    def __init__(self, n: int) -> None:
        self.t = np.full(n, np.inf)
        self.label = np.full(n, -1, dtype=np.int64)
        self.rho = np.zeros(n)
        self.normal = np.zeros((n, 3))

    def update(self, t: np.ndarray, label: int, rho: float | np.ndarray, normal_fn) -> None:
        closer = t < self.t
        if not closer.any():
            return
        idx = np.flatnonzero(closer)
        self.t[idx] = t[idx]
        self.label[idx] = label
        self.rho[idx] = rho[idx] if isinstance(rho, np.ndarray) else rho
        self.normal[idx] = normal_fn(idx)


def _cast_boxes(directions: np.ndarray, scene: _Scene, hits: _Hits) -> None:
    for box, label in zip(scene.boxes, scene.box_labels):
        cx, cy, cz, hx, hy, hz, yaw, rho = box
        c, s = np.cos(yaw), np.sin(yaw)
        # Ray origin (0, 0, 0) and directions in the box frame.
        origin = np.array([-(c * cx + s * cy), -(-s * cx + c * cy), -cz])
        local = np.column_stack([c * directions[:, 0] + s * directions[:, 1],
                                 -s * directions[:, 0] + c * directions[:, 1], directions[:, 2]])
        half = np.array([hx, hy, hz])
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-half - origin) / local
            t2 = (half - origin) / local
        near = np.minimum(t1, t2)
        near = np.where(np.isnan(near), -np.inf, near)
        far = np.where(np.isnan(np.maximum(t1, t2)), np.inf, np.maximum(t1, t2))
        t_near, t_far = near.max(axis=1), far.min(axis=1)
        hit = (t_near <= t_far) & (t_near > 0)
        t = np.where(hit, t_near, np.inf)
        face = near.argmax(axis=1)

        def normals(idx, face=face, local=local, c=c, s=s):
            n_local = np.zeros((idx.size, 3))
            n_local[np.arange(idx.size), face[idx]] = -np.sign(local[idx, face[idx]])
            return np.column_stack([c * n_local[:, 0] - s * n_local[:, 1], s * n_local[:, 0] + c * n_local[:, 1], n_local[:, 2]])

        hits.update(t, int(label), float(rho), normals)


def _cast_cylinders(directions: np.ndarray, scene: _Scene, hits: _Hits) -> None:
    dxy = directions[:, :2]
    a = (dxy**2).sum(axis=1)
    for (cx, cy, radius, z0, z1, rho), label in zip(scene.cylinders, scene.cylinder_labels):
        half_b = -(dxy[:, 0] * cx + dxy[:, 1] * cy)
        disc = half_b**2 - a * (cx * cx + cy * cy - radius * radius)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = (-half_b - np.sqrt(disc)) / a
        z = t * directions[:, 2]
        t = np.where((disc > 0) & (t > 0) & (z >= z0) & (z <= z1), t, np.inf)

        def normals(idx, t=t, cx=cx, cy=cy, radius=radius):
            p = directions[idx, :2] * t[idx, None]
            return np.column_stack([(p[:, 0] - cx) / radius, (p[:, 1] - cy) / radius, np.zeros(idx.size)])

        hits.update(t, int(label), float(rho), normals)


def _cast_foliage(directions: np.ndarray, scene: _Scene, hits: _Hits, rng: np.random.Generator) -> None:
    """Tree crowns: spheres that let some rays through and return from inside the crown."""
    for cx, cy, cz, radius, rho in scene.spheres:
        centre = np.array([cx, cy, cz])
        proj = directions @ centre
        disc = proj**2 - centre @ centre + radius * radius
        chord = 2 * np.sqrt(np.maximum(disc, 0.0))
        entry = proj - chord / 2
        depth = np.minimum(rng.exponential(0.35, size=len(directions)), chord)
        through = rng.random(len(directions)) < 0.25
        t = np.where((disc > 0) & (entry > 0) & ~through, entry + depth, np.inf)

        def normals(idx):  # leaves face every way: a random unit vector per return
            v = rng.standard_normal((idx.size, 3))
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        hits.update(t, VEGETATION, float(rho), normals)


def _cast_ground(directions: np.ndarray, scene: _Scene, hits: _Hits, rng: np.random.Generator) -> None:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(directions[:, 2] < 0, -SENSOR_HEIGHT / directions[:, 2], np.inf)
        y = np.abs(directions[:, 1] * t)
        x = np.nan_to_num(directions[:, 0] * t)
    on_road = y < scene.road_half
    label = np.where(on_road, ROAD, TERRAIN)
    road_rho, terrain_rho = scene.ground_rho
    rho = np.where(on_road, road_rho, terrain_rho)
    # Dashed centre line and edge lines: bright paint.
    centre_line = (y < 0.08) & (np.mod(x, 6.0) < 3.0)
    edge_line = np.abs(y - (scene.road_half - 0.3)) < 0.08
    rho = np.where(on_road & (centre_line | edge_line), rng.uniform(0.6, 0.75), rho)
    up = np.array([0.0, 0.0, 1.0])
    # Ground under the sidewalks is hidden by the sidewalk slabs (nearer hits).
    for value in (ROAD, TERRAIN):
        t_label = np.where(label == value, t, np.inf)
        hits.update(t_label, value, rho, lambda idx: np.broadcast_to(up, (idx.size, 3)))


@functools.lru_cache(maxsize=8)
def _generate(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scene = _layout(rng)
    directions = _ray_directions()
    hits = _Hits(len(directions))
    _cast_ground(directions, scene, hits, rng)
    _cast_boxes(directions, scene, hits)
    _cast_cylinders(directions, scene, hits)
    _cast_foliage(directions, scene, hits, rng)

    keep = np.isfinite(hits.t) & (hits.t < MAX_RANGE) & (rng.random(len(directions)) >= DROPOUT)
    idx = np.flatnonzero(keep)
    t = hits.t[idx]
    cos_incidence = np.abs((hits.normal[idx] * directions[idx]).sum(axis=1))
    texture = 1.0 + 0.12 * rng.standard_normal(idx.size)
    intensity = 1.4 * hits.rho[idx] * texture * (0.4 + 0.6 * cos_incidence) * np.exp(-t / 200.0)
    intensity = np.clip(intensity + 0.01 * rng.standard_normal(idx.size), 0.0, 1.0)
    ranged = t + RANGE_NOISE * rng.standard_normal(idx.size)
    xyz = directions[idx] * ranged[:, None]
    points = np.column_stack([xyz, intensity]).astype(np.float32)
    labels = hits.label[idx]
    points.setflags(write=False)
    labels.setflags(write=False)
    return points, labels
