"""Shared fixtures: the reference cases of the original code (tests/data)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
CASES = ("scalr_pretrained", "scalr_finetuned", "scalrplus_pretrained", "waffleiron_kitti")


@dataclass
class ReferenceCase:
    """One reference case: checkpoint, config and the original code's numbers."""

    name: str
    checkpoint: Path
    config: dict
    arrays: dict

    @property
    def points(self) -> np.ndarray:
        return self.arrays["points"]


def load_case(name: str) -> ReferenceCase:
    with np.load(DATA / f"{name}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    config = json.loads(str(arrays.pop("config")))
    return ReferenceCase(name, DATA / f"{name}.pth", config, arrays)


@pytest.fixture(params=CASES)
def case(request) -> ReferenceCase:
    return load_case(request.param)


@pytest.fixture(scope="session")
def pretrained_case() -> ReferenceCase:
    return load_case("scalr_pretrained")


@pytest.fixture(scope="session")
def pretrained_model(pretrained_case):
    import scalr_zoo

    return scalr_zoo.load(pretrained_case.checkpoint, config=pretrained_case.config, device="cpu")


def assert_matches_reference(actual, expected: np.ndarray) -> None:
    """The spec's tolerance: max |error| <= 1e-4 x RMS(expected) and per-point cosine >= 0.99999."""
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    rms = float(np.sqrt(np.mean(expected.astype(np.float64) ** 2)))
    max_err = float(np.abs(actual.astype(np.float64) - expected).max())
    assert max_err <= 1e-4 * rms, f"max |error| {max_err:.3g} > 1e-4 x RMS {rms:.3g}"
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    cosine = (a * e).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1))
    assert cosine.min() >= 0.99999, f"min per-point cosine {cosine.min():.7f}"


def random_scan(n: int, seed: int = 0, extent: float = 30.0) -> np.ndarray:
    """A synthetic (n, 4) float32 scan: a ground plane and some boxes, intensity in [0, 1]."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-extent, extent, size=(n, 2))
    z = -1.7 + 0.05 * rng.standard_normal(n)
    boxes = rng.random(n) < 0.3
    z[boxes] += rng.uniform(0, 2.5, size=boxes.sum())
    intensity = rng.random(n)
    return np.column_stack([xy, z, intensity]).astype(np.float32)
