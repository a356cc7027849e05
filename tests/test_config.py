"""Config dataclasses: parsing, round trip, validation."""

from __future__ import annotations

import json

import pytest

from scalr_zoo.config import ModelConfig, apply_overrides, resolve_intensity_stats

from conftest import CASES, load_case


@pytest.mark.parametrize("name", CASES)
def test_flat_reference_config_round_trips_through_json(name):
    flat = load_case(name).config
    config = ModelConfig.from_dict(flat)
    assert config.arch.width == flat["width"] and config.arch.depth == flat["depth"]
    assert config.arch.head == flat["head"] and config.arch.out == flat["out"]
    assert [list(g) for g in config.preprocess.grids] == flat["grids"]
    assert config.preprocess.intensity_mean == pytest.approx(flat["mean"])
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_preset_name_is_recognised():
    config = ModelConfig.from_dict(load_case("scalr_pretrained").config)
    assert config.preprocess.sensor == "semantickitti"
    assert ModelConfig.from_dict(load_case("waffleiron_kitti").config).preprocess.sensor == "raw"


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"norm": "groupnorm"}, "norm must be"),
        ({"act": "silu"}, "act must be"),
        ({"head": "linear"}, "needs 'out'"),
        ({"head": "mlp", "out": 4}, "needs 'hidden'"),
        ({"width": 0}, "positive"),
        ({"grids": [[4, 4]]}, "1 grids given for 3"),
        ({"fov": [[0, 0, 0], [0, 1, 1]]}, "below fov_max"),
        ({"colour": "red"}, "unknown config keys"),
        ({"std": 0.0}, "std > 0"),
    ],
)
def test_bad_configs(flat, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(flat)


def test_overrides():
    config = ModelConfig.from_dict(load_case("scalr_pretrained").config)
    wide = apply_overrides(config, {"fov": [[-128, -128, -8], [128, 128, 8]]})
    assert wide.preprocess.grids == ((512, 512), (512, 32), (512, 32))
    assert apply_overrides(config, {"sensor": "pandargt"}).preprocess.intensity_std == pytest.approx(16.76273235)
    with pytest.raises(ValueError, match="unknown override"):
        apply_overrides(config, {"bogus": 1})


def test_sensor_aliases():
    assert resolve_intensity_stats("KITTI") == resolve_intensity_stats("semantickitti")
    assert resolve_intensity_stats((1, 2)) == (1.0, 2.0)
    with pytest.raises(ValueError, match="preset name or a"):
        resolve_intensity_stats((1, 2, 3))
