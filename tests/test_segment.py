"""segment(): class id, name and probability per point, for models with a class head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scalr_zoo
from scalr_zoo.segment import Segmentation

from conftest import load_case, random_scan

NUSCENES_CLASSES = (
    "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian", "traffic_cone",
    "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade", "vegetation",
)


@pytest.fixture(scope="module")
def class_model():
    torch.manual_seed(0)
    return scalr_zoo.create_model(
        {"width": 32, "depth": 2, "head": "bn_linear", "out": 5, "classes": ["a", "b", "c", "d", "e"]}
    )


def test_reference_finetuned_checkpoint_labels_follow_the_original_logits():
    """The finetuned reference case (original code's head outputs), given the nuScenes class names."""
    case = load_case("scalr_finetuned")
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu", classes=NUSCENES_CLASSES)
    result = model.segment(case.points)
    assert isinstance(result, Segmentation) and len(result) == len(case.points)
    logits = case.arrays["head"].astype(np.float64)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # where the original's argmax is not a near tie
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(result.labels[clear], logits.argmax(axis=1)[clear])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.probabilities, probs.max(axis=1), rtol=1e-4, atol=1e-5)
    assert result.labels.dtype == np.int64 and result.probabilities.dtype == np.float32
    assert result.class_names == NUSCENES_CLASSES
    np.testing.assert_array_equal(result.names, np.asarray(NUSCENES_CLASSES)[result.labels])
    inside = ((case.points[:, :3] > -64 + 1e-4) & (case.points[:, :3] < [64 - 1e-4, 64 - 1e-4, 8 - 1e-4])).all(axis=1)
    np.testing.assert_array_equal(result.fov_mask, inside)


def test_segment_equals_softmax_of_head_outputs(class_model):
    points = random_scan(3000, seed=2)
    points[:50, 0] += 200.0  # outside the FOV: labelled like their nearest kept point
    result = scalr_zoo.segment(class_model, points)
    logits, mask = class_model.extract(points, head=True, return_fov_mask=True)
    probs = torch.softmax(logits, dim=1)
    np.testing.assert_array_equal(result.labels, probs.argmax(dim=1).numpy())
    np.testing.assert_allclose(result.probabilities, probs.max(dim=1).values.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(result.fov_mask, mask.numpy())
    assert not result.fov_mask[:50].any()
    assert set(result.names) <= set("abcde")
    assert (result.probabilities > 1 / 5).all() and (result.probabilities <= 1).all()


def test_list_input_and_options_pass_through(class_model):
    clouds = [random_scan(1500, seed=s) for s in range(2)]
    results = class_model.segment(clouds, sensor="nuscenes", batch_size=1)
    assert isinstance(results, list) and len(results) == 2
    for cloud, result in zip(clouds, results):
        alone = class_model.segment(cloud, sensor="nuscenes")
        np.testing.assert_array_equal(result.labels, alone.labels)
        np.testing.assert_allclose(result.probabilities, alone.probabilities, rtol=1e-5)
    # the sensor option reaches extract: other intensity statistics, other probabilities
    assert not np.allclose(class_model.segment(clouds[0]).probabilities, results[0].probabilities)


def test_nonfinite_points_are_unlabelled(class_model):
    points = random_scan(2000, seed=4)
    points[[3, 10], 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        class_model.segment(points)
    result = class_model.segment(points, drop_nonfinite=True)
    assert result.labels[3] == result.labels[10] == -1
    assert result.probabilities[3] == 0 and list(result.names[[3, 10]]) == ["unlabelled", "unlabelled"]
    assert (np.delete(result.labels, [3, 10]) >= 0).all()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"width": 32, "depth": 2, "head": "none"}, "has no head"),
        ({"width": 32, "depth": 2, "head": "linear", "out": 16}, "outputs 16 feature channels, not classes"),
        ({"width": 32, "depth": 2, "head": "mlp", "out": 16, "hidden": 8}, "distillation head"),
    ],
)
def test_model_without_class_head_says_so(config, message):
    model = scalr_zoo.create_model(config)
    with pytest.raises(ValueError, match=message):
        model.segment(random_scan(500))


def test_head_and_mask_options_are_refused(class_model):
    with pytest.raises(ValueError, match="sets head= itself"):
        class_model.segment(random_scan(500), head=False)
