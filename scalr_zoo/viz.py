"""Pictures of per-point features: PCA colours, similarity maps, label maps.

Colours are ``(N, 3)`` uint8 RGB arrays, one row per point, so any of them
can be written as a coloured PLY (:func:`save_ply`, opens in CloudCompare,
MeshLab, Open3D), drawn from above as a PNG (:func:`save_bev_png`, needs
matplotlib: ``pip install scalr-zoo[viz]``) or shown in an interactive,
self-contained HTML page (:func:`save_html`, no network needed to open it)
where clicking a point recolours the cloud by similarity to it.

>>> features = model.extract(points)                        # doctest: +SKIP
>>> save_bev_png("pca.png", points, pca_colors(features))   # doctest: +SKIP
>>> save_html("view.html", points, features=features)       # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from .io import _as_uint8_colors, atomic_write, write_ply

__all__ = [
    "pca_project",
    "pca_colors",
    "similarity",
    "similarity_colors",
    "label_colors",
    "apply_colormap",
    "save_ply",
    "save_bev_png",
    "save_html",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Colour of points with no value (NaN features, unlabelled points).
MISSING_COLOR = (128, 128, 128)

#: Anchors of the similarity colour ramp, evenly spaced from low to high:
#: near-black blue, purple, red, orange, pale yellow (perceptually increasing lightness).
COLORMAP_ANCHORS = np.array(
    [[12, 8, 38], [84, 22, 122], [168, 40, 110], [226, 82, 60], [250, 160, 40], [252, 240, 160]],
    dtype=np.float64,
)

#: Distinct colours, bright enough for a dark background, for class labels (label i gets
#: colour i; more classes cycle through hues).
LABEL_PALETTE = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [67, 99, 216], [245, 130, 49], [66, 212, 244],
        [240, 50, 230], [191, 239, 69], [250, 190, 212], [70, 153, 144], [220, 190, 255], [154, 99, 36],
        [255, 250, 200], [145, 30, 180], [170, 255, 195], [128, 128, 0], [255, 215, 180], [128, 0, 0],
        [255, 255, 255], [0, 130, 200],
    ],
    dtype=np.uint8,
)

#: Points fitted by a PCA; more rows are projected, not fitted.
PCA_FIT_POINTS = 20_000


def _as_features(features, name: str = "features") -> np.ndarray:
    if hasattr(features, "detach"):  # torch tensor
        features = features.detach().float().cpu().numpy()
    array = np.asarray(features)
    if array.ndim != 2 or array.shape[0] == 0 or array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be an (N, C) array of numbers with N > 0, got shape {array.shape} dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _fit_rows(finite: np.ndarray, seed: int) -> np.ndarray:
    rows = np.flatnonzero(finite)
    if rows.size > PCA_FIT_POINTS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, PCA_FIT_POINTS, replace=False))
    return rows


def pca_project(features, num_components: int = 3, *, center: bool = True, seed: int = 0) -> np.ndarray:
    """Projections of the features on their principal directions.

    Args:
        features: ``(N, C)`` array or tensor.
        num_components: k, directions kept (at most C).
        center: subtract the mean first (a PCA); False keeps the best rank-k
            approximation of the raw vectors, which preserves their dot
            products and cosines (used for similarity).
        seed: picks the points the directions are fitted on when there are
            more than :data:`PCA_FIT_POINTS`.

    Returns:
        ``(N, k)`` float32; each direction's sign makes its largest loading
        positive (stable output). Rows with NaN features are NaN.
    """
    array = _as_features(features)
    finite = np.isfinite(array).all(axis=1)
    if not finite.any():
        raise ValueError("features has no finite row")
    k = min(int(num_components), array.shape[1])
    fit = array[_fit_rows(finite, seed)]
    mean = fit.mean(axis=0, dtype=np.float64) if center else np.zeros(array.shape[1])
    centred = fit - mean.astype(np.float32)
    # Principal directions: eigenvectors of the (C, C) scatter matrix, largest first.
    _, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64))
    basis = vectors[:, ::-1][:, :k].T
    signs = np.sign(basis[np.arange(k), np.abs(basis).argmax(axis=1)])
    basis = basis * np.where(signs == 0, 1.0, signs)[:, None]
    out = np.full((array.shape[0], k), np.nan, dtype=np.float32)
    out[finite] = ((array[finite] - mean) @ basis.T).astype(np.float32)
    return out


def _robust_unit(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Scale each column to [0, 1] between the given percentiles of its finite values (clipped)."""
    finite = np.isfinite(values).all(axis=1)
    lo, hi = np.percentile(values[finite], percentiles, axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return np.clip((values - lo) / span, 0.0, 1.0)


def pca_colors(features, *, percentiles: tuple[float, float] = (2.0, 98.0), seed: int = 0) -> np.ndarray:
    """RGB colours from the first three principal components of the features.

    Each component is scaled to [0, 1] between its 2nd and 98th percentile
    (robust to outliers), so points with similar features get similar colours.

    Args:
        features: ``(N, C)`` array or tensor.
        percentiles: the low and high percentile mapped to 0 and 255.
        seed: see :func:`pca_project`.

    Returns:
        ``(N, 3)`` uint8; rows with NaN features are grey.
    """
    projected = pca_project(features, 3, seed=seed)
    if projected.shape[1] < 3:  # fewer than 3 channels: pad with mid grey
        projected = np.column_stack([projected, np.zeros((len(projected), 3 - projected.shape[1]), np.float32)])
    unit = _robust_unit(projected, percentiles)
    colors = (np.nan_to_num(unit, nan=0.0) * 255.0 + 0.5).astype(np.uint8)
    colors[~np.isfinite(projected).all(axis=1)] = MISSING_COLOR
    return colors


def similarity(features, query_index: int) -> np.ndarray:
    """``(N,)`` float32 cosine similarity of every point's features to those of point ``query_index``."""
    array = _as_features(features)
    n = array.shape[0]
    if not -n <= int(query_index) < n:
        raise ValueError(f"query_index {query_index} is out of range for {n} points")
    query = array[int(query_index)].astype(np.float64)
    if not np.isfinite(query).all():
        raise ValueError(f"the features of point {query_index} are not finite; pick another query point")
    norms = np.linalg.norm(array, axis=1) * np.linalg.norm(query)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((array @ query) / np.where(norms > 0, norms, np.nan)).astype(np.float32)


def apply_colormap(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """``(N, 3)`` uint8 colours of scalar values on the :data:`COLORMAP_ANCHORS` ramp.

    ``low`` / ``high`` (default: the 2nd percentile and the maximum of the
    finite values) map to the two ends; NaN values are grey.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values)
    if low is None:
        low = float(np.percentile(values[finite], 2.0)) if finite.any() else 0.0
    if high is None:
        high = float(values[finite].max()) if finite.any() else 1.0
    unit = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    position = np.nan_to_num(unit) * (len(COLORMAP_ANCHORS) - 1)
    left = np.minimum(position.astype(np.int64), len(COLORMAP_ANCHORS) - 2)
    frac = (position - left)[:, None]
    colors = COLORMAP_ANCHORS[left] * (1 - frac) + COLORMAP_ANCHORS[left + 1] * frac
    colors = (colors + 0.5).astype(np.uint8)
    colors[~finite] = MISSING_COLOR
    return colors


def similarity_colors(features, query_index: int) -> np.ndarray:
    """Similarity map: ``(N, 3)`` uint8 colours of the cosine similarity to point ``query_index``.

    Bright yellow is most similar (the query itself), dark blue least; the
    ramp spans the 2nd percentile to the maximum of the similarities.
    """
    return apply_colormap(similarity(features, query_index))


def label_colors(labels, num_classes: int | None = None) -> np.ndarray:
    """``(N, 3)`` uint8 colours of integer class labels (negative labels are grey).

    The first 20 classes use :data:`LABEL_PALETTE`; more cycle through evenly
    spread hues. ``num_classes`` (default: the largest label + 1) only
    checks the labels' range.
    """
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1D integer array, got shape {labels.shape} dtype {labels.dtype}")
    top = int(labels.max(initial=-1)) + 1
    if num_classes is not None and top > num_classes:
        raise ValueError(f"labels go up to {top - 1}, more than num_classes={num_classes} allows")
    palette = _palette(max(top, num_classes or 0, 1))
    colors = palette[np.clip(labels, 0, None)]
    colors[labels < 0] = MISSING_COLOR
    return colors


def _palette(n: int) -> np.ndarray:
    if n <= len(LABEL_PALETTE):
        return LABEL_PALETTE[:n].copy()
    extra = n - len(LABEL_PALETTE)
    hue = (np.arange(extra) * 0.618033988749895) % 1.0
    # HSV to RGB with saturation 0.75, value 0.95
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6.0) % 6.0
    rgb = 0.95 - 0.95 * 0.75 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return np.vstack([LABEL_PALETTE, (rgb * 255 + 0.5).astype(np.uint8)])


def _as_xyz(points, name: str = "points") -> np.ndarray:
    if hasattr(points, "detach"):
        points = points.detach().cpu().numpy()
    array = np.asarray(points)
    if array.ndim != 2 or array.shape[1] < 3 or array.shape[0] == 0 or array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be an (N, 3+) array of numbers with N > 0, got shape {array.shape} dtype {array.dtype}")
    return array


def save_ply(path: PathLike, points, colors) -> Path:
    """Write points (x, y, z[, intensity]) with ``(N, 3)`` colours as a binary PLY; returns ``path``."""
    return write_ply(path, _as_xyz(points), colors)


def _matplotlib_figure():
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError("saving PNG pictures needs matplotlib: pip install scalr-zoo[viz]") from None
    return Figure, Patch


def save_bev_png(
    path: PathLike,
    points,
    colors,
    *,
    extent: float | Sequence[float] | None = None,
    size: tuple[int, int] = (1000, 1000),
    point_size: float = 4.0,
    title: str | None = None,
    legend: Mapping[str, Sequence[int]] | None = None,
    background: str = "black",
) -> Path:
    """Bird's-eye view (looking down z) of coloured points as a PNG.

    Higher points are drawn over lower ones.

    Args:
        path: the PNG to write (replaced atomically).
        points: ``(N, 3+)`` x, y, z[, ...] in metres.
        colors: ``(N, 3)`` uint8 or floats in [0, 1].
        extent: half width in metres of the square shown around the origin,
            or ``(xmin, xmax, ymin, ymax)``; default: the 99th percentile of
            ``|x|`` and ``|y|``.
        size: picture size in pixels (width, height).
        point_size: marker area in points squared.
        title: text above the picture.
        legend: ``{name: (r, g, b)}`` entries (0-255) shown in a legend,
            e.g. the classes of a label map.
        background: matplotlib colour of the plot background.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is missing (``pip install scalr-zoo[viz]``).
    """
    Figure, Patch = _matplotlib_figure()
    xyz = _as_xyz(points)[:, :3].astype(np.float64)
    rgb = _as_uint8_colors(colors, xyz.shape[0])
    finite = np.isfinite(xyz).all(axis=1)
    xyz, rgb = xyz[finite], rgb[finite]
    if extent is None:
        half = float(np.percentile(np.abs(xyz[:, :2]), 99.0)) if len(xyz) else 1.0
        bounds = (-half, half, -half, half)
    elif np.ndim(extent) == 0:
        bounds = (-float(extent), float(extent), -float(extent), float(extent))
    else:
        bounds = tuple(float(v) for v in extent)
        if len(bounds) != 4:
            raise ValueError(f"extent must be a half width or (xmin, xmax, ymin, ymax), got {extent!r}")
    order = np.argsort(xyz[:, 2], kind="stable")
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, facecolor=background)
    ax = fig.add_axes((0.07, 0.06, 0.9, 0.88 if title else 0.92))
    ax.set_facecolor(background)
    ax.scatter(xyz[order, 0], xyz[order, 1], c=rgb[order] / 255.0, s=point_size, marker=".", linewidths=0)
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x (m)", color="0.7")
    ax.set_ylabel("y (m)", color="0.7")
    ax.tick_params(colors="0.7")
    for spine in ax.spines.values():
        spine.set_color("0.4")
    if title:
        fig.suptitle(title, color="0.9")
    if legend:
        handles = [Patch(color=np.asarray(c, dtype=np.float64) / 255.0, label=name) for name, c in legend.items()]
        ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=background)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def save_html(
    path: PathLike,
    points,
    *,
    features=None,
    colors: np.ndarray | Mapping[str, np.ndarray] | None = None,
    legend: Mapping[str, Sequence[int]] | None = None,
    title: str = "scalr-zoo",
    max_points: int = 150_000,
    feature_dims: int = 32,
    point_size: float = 2.0,
    seed: int = 0,
) -> Path:
    """One self-contained HTML page showing the points in 3D.

    The page needs no network: the viewer is a small canvas renderer written
    into the page, and the data is embedded (positions as uint16 within the
    bounding box, colours as uint8, features reduced to ``feature_dims``
    dimensions by a rank-k approximation that keeps their cosines, as int8).
    Drag to orbit, right-drag or shift-drag to pan, scroll to zoom; with
    features, the cloud starts coloured by PCA and clicking a point recolours
    it by cosine similarity to that point (Esc or the PCA button goes back).

    Args:
        path: the HTML file to write (replaced atomically).
        points: ``(N, 3+)`` x, y, z[, ...].
        features: ``(N, C)`` per-point features (optional).
        colors: ``(N, 3)`` colours, or ``{name: (N, 3)}`` several colourings
            to switch between (e.g. ``{"labels": label_colors(...)}``).
        legend: ``{name: (r, g, b)}`` shown as a legend (e.g. classes).
        title: page title.
        max_points: at most this many points are embedded (a seeded random
            subset when there are more).
        feature_dims: dimensions kept for the in-page similarity.
        point_size: point size in CSS pixels.
        seed: picks the subset and the PCA fit points.

    Returns:
        ``path``.
    """
    xyz = _as_xyz(points)[:, :3].astype(np.float64)
    n = xyz.shape[0]
    colorings: dict[str, np.ndarray] = {}
    if isinstance(colors, Mapping):
        colorings.update({str(k): _as_uint8_colors(v, n) for k, v in colors.items()})
    elif colors is not None:
        colorings["colours"] = _as_uint8_colors(colors, n)
    reduced = None
    if features is not None:
        array = _as_features(features)
        if array.shape[0] != n:
            raise ValueError(f"features has {array.shape[0]} rows for {n} points")
        colorings = {"PCA": pca_colors(array, seed=seed), **colorings}
        reduced = pca_project(array, feature_dims, center=False, seed=seed)
    if not colorings:
        colorings["height"] = apply_colormap(xyz[:, 2], *np.nanpercentile(xyz[:, 2], [1, 99]))

    keep = np.isfinite(xyz).all(axis=1)
    if reduced is not None:
        keep &= np.isfinite(reduced).all(axis=1)
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise ValueError("no point has finite coordinates (and features)")
    if rows.size > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
        logger.info("save_html: embedding %d of %d points", rows.size, n)
    lo, hi = xyz[rows].min(axis=0), xyz[rows].max(axis=0)
    scale = np.where(hi - lo > 0, (hi - lo) / 65535.0, 1.0)
    quantised = np.round((xyz[rows] - lo) / scale).astype("<u2")
    data = {
        "count": int(rows.size),
        "total": int(n),
        "origin": lo.tolist(),
        "scale": scale.tolist(),
        "positions": _b64(quantised),
        "colorings": {name: _b64(c[rows]) for name, c in colorings.items()},
        "colormap": COLORMAP_ANCHORS.round().astype(int).tolist(),
        "legend": {str(k): [int(v) for v in c] for k, c in (legend or {}).items()},
        "pointSize": float(point_size),
        "indices": _b64(rows.astype("<u4")),
    }
    if reduced is not None:
        vectors = reduced[rows].astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors / np.where(norms > 0, norms, 1.0)
        data["features"] = _b64(np.round(unit * 127.0).astype(np.int8))
        data["featureDims"] = int(reduced.shape[1])
    from ._viewer import VIEWER_TEMPLATE

    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = VIEWER_TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    with atomic_write(path, "w") as handle:
        handle.write(page)
    return Path(path)
