"""scalr_zoo.viz: colours that follow the features, and files whose content is checked."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

import scalr_zoo
from scalr_zoo import viz


def latent_features(n: int = 3000, dims: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features that are a linear image of a 3D latent (plus a little noise): (latent, features)."""
    rng = np.random.default_rng(seed)
    latent = rng.uniform(-1, 1, size=(n, 3))
    mixing = rng.normal(size=(3, dims))
    return latent, (latent @ mixing + 0.01 * rng.normal(size=(n, dims)) + 5.0).astype(np.float32)


def pair_distances(a: np.ndarray, b: np.ndarray, pairs: int = 4000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(a), pairs), rng.integers(0, len(a), pairs)
    return np.linalg.norm(a[i] - a[j], axis=1), np.linalg.norm(b[i].astype(float) - b[j].astype(float), axis=1)


def test_pca_colors_follow_the_features():
    latent, features = latent_features()
    colors = viz.pca_colors(features)
    assert colors.shape == (3000, 3) and colors.dtype == np.uint8
    feature_distance, color_distance = pair_distances(features, colors)
    assert np.corrcoef(feature_distance, color_distance)[0, 1] > 0.9
    # all three channels are used across the range
    assert (colors.max(axis=0) == 255).all() and (colors.min(axis=0) == 0).all()
    # deterministic, and the same for a torch tensor
    np.testing.assert_array_equal(colors, viz.pca_colors(torch.from_numpy(features)))


def test_pca_colors_separate_two_clusters_and_grey_out_nan():
    rng = np.random.default_rng(0)
    centre_a, centre_b = rng.normal(size=32), rng.normal(size=32)
    features = np.vstack([centre_a + 0.05 * rng.normal(size=(500, 32)), centre_b + 0.05 * rng.normal(size=(500, 32))])
    features[7] = np.nan
    colors = viz.pca_colors(features).astype(float)
    assert tuple(colors[7]) == viz.MISSING_COLOR
    a, b = np.delete(colors[:500], 7, axis=0), colors[500:]
    assert np.linalg.norm(a.mean(0) - b.mean(0)) > 150
    # the first component (red) alone tells the clusters apart; green and blue show the spread inside them
    assert a[:, 0].max() < b[:, 0].min() or b[:, 0].max() < a[:, 0].min()


def test_pca_colors_separate_classes_of_the_sample_scan():
    """Even a random-weight network tells the road from the building walls."""
    scan = scalr_zoo.sample_scan()
    torch.manual_seed(0)
    model = scalr_zoo.create_model({"width": 48, "depth": 3, "head": "none", "sensor": scan.sensor})
    colors = viz.pca_colors(model.extract(scan.points)).astype(float)
    road, building = (colors[scan.labels == scan.label_names.index(n)] for n in ("road", "building"))
    assert np.linalg.norm(road.mean(0) - building.mean(0)) > 40


def test_similarity_map():
    latent, features = latent_features()
    query = 123
    sim = viz.similarity(features, query)
    expected = torch.nn.functional.cosine_similarity(torch.from_numpy(features), torch.from_numpy(features[query : query + 1]))
    np.testing.assert_allclose(sim, expected.numpy(), atol=1e-5)
    colors = viz.similarity_colors(features, query)
    np.testing.assert_array_equal(colors[query], viz.COLORMAP_ANCHORS[-1].astype(np.uint8))
    # the ramp gets lighter with similarity: brightness ranks follow similarity ranks
    brightness = colors.astype(float) @ [0.3, 0.59, 0.11]
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(ranks(sim), ranks(brightness))[0, 1] > 0.97
    with pytest.raises(ValueError, match="out of range"):
        viz.similarity(features, 3000)


def test_label_colors():
    labels = np.array([0, 1, 2, -1, 25, 1])
    colors = viz.label_colors(labels)
    assert tuple(colors[3]) == viz.MISSING_COLOR
    np.testing.assert_array_equal(colors[1], colors[5])
    many = viz.label_colors(np.arange(40))
    assert len({tuple(c) for c in many}) == 40
    with pytest.raises(ValueError, match="num_classes=3"):
        viz.label_colors(labels, num_classes=3)
    with pytest.raises(ValueError, match="1D integer"):
        viz.label_colors(np.zeros(3))


def test_save_ply_content(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    scan = scalr_zoo.sample_scan()
    colors = viz.label_colors(scan.labels)
    path = viz.save_ply(tmp_path / "labels.ply", scan.points, colors)
    vertex = plyfile.PlyData.read(str(path))["vertex"].data
    np.testing.assert_array_equal(np.column_stack([vertex["x"], vertex["y"], vertex["z"]]), scan.points[:, :3])
    np.testing.assert_array_equal(np.column_stack([vertex["red"], vertex["green"], vertex["blue"]]), colors)


def _read_png(path) -> np.ndarray:
    image = pytest.importorskip("matplotlib.image")
    return (image.imread(str(path))[..., :3] * 255).round().astype(np.uint8)


def test_bev_png_shows_each_cluster_in_its_colour(tmp_path):
    """Two blobs left and right of the origin with different features: each half of the
    picture is painted in its blob's PCA colour."""
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    n = 4000
    xy = np.vstack([rng.normal([-15, 0], 4, size=(n, 2)), rng.normal([15, 0], 4, size=(n, 2))])
    points = np.column_stack([xy, rng.normal(size=2 * n), rng.random(2 * n)]).astype(np.float32)
    features = np.vstack([rng.normal(size=(1, 16)) + 0.05 * rng.normal(size=(n, 16)),
                          rng.normal(size=(1, 16)) + 0.05 * rng.normal(size=(n, 16))])
    colors = viz.pca_colors(features)
    path = viz.save_bev_png(tmp_path / "bev.png", points, colors, extent=30, size=(640, 480), title="two blobs")
    picture = _read_png(path)
    assert picture.shape == (480, 640, 3)
    spread = picture.max(axis=2).astype(int) - picture.min(axis=2)
    painted = (picture.sum(axis=2) >= 40) & (spread > 30)  # not the black background nor grey axes and text
    colour_a, colour_b = colors[:n].mean(0), colors[n:].mean(0)
    for columns, own, other in ((slice(0, 320), colour_a, colour_b), (slice(320, 640), colour_b, colour_a)):
        pixels = picture[:, columns][painted[:, columns]].astype(float)
        # compare hues (cosines in RGB): edge pixels of a dot are its colour blended with black
        nearer_own = pixels @ (own / np.linalg.norm(own)) > pixels @ (other / np.linalg.norm(other))
        assert nearer_own.sum() > 5000 and nearer_own.sum() > 10 * (~nearer_own).sum()  # its blob's colours
    assert np.linalg.norm(colors[:n].mean(0) - colors[n:].mean(0)) > 100
    assert [p.name for p in tmp_path.iterdir()] == ["bev.png"]


def test_bev_png_of_labels_with_legend(tmp_path):
    pytest.importorskip("matplotlib")
    scan = scalr_zoo.sample_scan()
    legend = {name: viz.LABEL_PALETTE[i] for i, name in enumerate(scan.label_names)}
    path = viz.save_bev_png(tmp_path / "labels.png", scan.points, viz.label_colors(scan.labels), legend=legend)
    picture = _read_png(path)
    assert picture.shape == (1000, 1000, 3)
    colours_present = {tuple(c) for c in picture.reshape(-1, 3)}
    for i, name in enumerate(scan.label_names):  # every class colour is painted (points or legend)
        assert tuple(viz.LABEL_PALETTE[i]) in colours_present, name


def test_png_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install scalr-zoo\[viz\]"):
        viz.save_bev_png(tmp_path / "x.png", np.zeros((3, 4)), np.zeros((3, 3), np.uint8))
    assert not (tmp_path / "x.png").exists()


def _embedded_data(path) -> dict:
    text = path.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="scalr-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


def test_html_is_self_contained_and_embeds_the_data(tmp_path):
    import base64

    latent, features = latent_features(n=2000)
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(-30, 30, (2000, 2)), rng.uniform(-2, 3, 2000), rng.random(2000)])
    path = viz.save_html(tmp_path / "view.html", points, features=features, title="<test & view>",
                         colors={"labels": viz.label_colors(np.arange(2000) % 3)})
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)  # nothing fetched from the network
    assert "&lt;test &amp; view&gt;" in text and "<test & view>" not in text
    data = _embedded_data(path)
    assert data["count"] == 2000 and list(data["colorings"]) == ["PCA", "labels"]
    quantised = np.frombuffer(base64.b64decode(data["positions"]), "<u2").reshape(-1, 3)
    decoded = np.asarray(data["origin"]) + quantised * np.asarray(data["scale"])
    assert np.abs(decoded - points[:, :3]).max() <= np.asarray(data["scale"]).max() / 2 + 1e-9
    pca = np.frombuffer(base64.b64decode(data["colorings"]["PCA"]), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(pca, viz.pca_colors(features))
    vectors = np.frombuffer(base64.b64decode(data["features"]), np.int8).reshape(-1, data["featureDims"]).astype(float)
    cosine = vectors @ vectors[5] / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(vectors[5]))
    assert np.abs(cosine - viz.similarity(features, 5)).max() < 0.03  # int8, 32 dims: close to the true cosine


def test_html_subsamples_large_clouds(tmp_path):
    points = np.random.default_rng(0).normal(size=(5000, 4)) * 10
    path = viz.save_html(tmp_path / "big.html", points, max_points=1000)
    data = _embedded_data(path)
    assert data["count"] == 1000 and data["total"] == 5000 and list(data["colorings"]) == ["height"]
    assert "features" not in data
