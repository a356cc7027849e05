"""Reading original checkpoints: weights_only, numpy scalars, key layout, clear errors."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import scalr_zoo
from scalr_zoo.convert import read_original_checkpoint

from conftest import CASES, load_case


@pytest.mark.parametrize("name", CASES)
def test_state_dict_loads_strictly_with_original_keys(name):
    case = load_case(name)
    state = read_original_checkpoint(case.checkpoint)
    assert not any(k.startswith("module.") for k in state)
    model = scalr_zoo.create_model(case.config)
    own = model.state_dict()
    assert set(own) == set(state)
    assert all(own[k].shape == state[k].shape for k in own)


def test_plain_weights_only_load_refuses_the_reference_files():
    """The trap of the spec: numpy scalars in the optimiser state."""
    with pytest.raises(Exception, match="numpy"):
        torch.load(load_case("scalr_pretrained").checkpoint, weights_only=True, map_location="cpu")


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_arbitrary_pickled_objects_are_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"net": {"w": torch.zeros(1)}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_original_checkpoint(path)
    assert not marker.exists()


def test_numpy1_scalar_path_is_accepted(tmp_path: Path):
    """Checkpoints pickled under numpy 1.x name numpy.core.multiarray.scalar."""
    path = tmp_path / "np2.pth"
    torch.save({"net": {"module.w": torch.ones(2)}, "scheduler": {"lr": np.float64(0.5)}}, path)
    old = tmp_path / "np1.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)
    state = read_original_checkpoint(old)
    assert torch.equal(state["w"], torch.ones(2))


def test_state_dict_key_variants(tmp_path: Path):
    for key in ("model_point", "model_points", "net"):
        path = tmp_path / f"{key}.pth"
        torch.save({key: {"module.a": torch.zeros(3)}, "epoch": 3}, path)
        assert list(read_original_checkpoint(path)) == ["a"]
    path = tmp_path / "none.pth"
    torch.save({"optim": {}, "epoch": 1}, path)
    with pytest.raises(ValueError, match="no state dict"):
        read_original_checkpoint(path)


def test_corrupt_and_missing_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_original_checkpoint(tmp_path / "nope.pth")
    data = load_case("scalr_pretrained").checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        read_original_checkpoint(truncated)


def test_load_with_wrong_config_names_the_mismatch():
    case = load_case("scalr_pretrained")
    wrong_width = dict(case.config, width=64)
    with pytest.raises(ValueError, match="another shape"):
        scalr_zoo.load(case.checkpoint, config=wrong_width, device="cpu")
    wrong_depth = dict(case.config, depth=4)
    with pytest.raises(ValueError, match="unexpected"):
        scalr_zoo.load(case.checkpoint, config=wrong_depth, device="cpu")
    wrong_norm = dict(case.config, norm="batchnorm")
    with pytest.raises(ValueError, match="missing"):
        scalr_zoo.load(case.checkpoint, config=wrong_norm, device="cpu")
    with pytest.raises(ValueError, match="pass config="):
        scalr_zoo.load(case.checkpoint, device="cpu")


def test_load_overrides_and_default_device():
    case = load_case("scalr_pretrained")
    model = scalr_zoo.load(case.checkpoint, config=case.config, sensor="nuscenes")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.config.preprocess.sensor == "nuscenes"
    assert model.config.preprocess.intensity_mean == pytest.approx(18.742355)
    assert not model.training
