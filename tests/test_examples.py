"""Every example runs, against a small model served from loopback servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import scalr_zoo
from scalr_zoo.io import write_bin

from conftest import assert_matches_reference, load_case
from zoo_helpers import REPO_ROOT, archives, zoo  # noqa: F401 (fixtures)

EXAMPLES = REPO_ROOT / "examples"


def run_example(script: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def assert_colourful_png(path: Path, min_colours: int = 50) -> None:
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] >= 500 and image.shape[1] >= 500
    assert len(np.unique(image.reshape(-1, 3), axis=0)) >= min_colours


def test_quickstart(zoo, tmp_path):
    result = run_example("quickstart.py", "--model", "test-scalr", "--out", "pictures", env=zoo.subprocess_env(), cwd=tmp_path)
    assert "features: (" in result.stdout
    assert_colourful_png(tmp_path / "pictures" / "features_pca.png")
    assert (tmp_path / "pictures" / "features_pca.ply").stat().st_size > 100_000
    assert zoo.archive_requests("test-scalr") == 1


def test_segment_file(tmp_path):
    case = load_case("scalr_finetuned")
    classes = [f"class{i}" for i in range(case.config["out"])]
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu", classes=classes)
    model.save_pretrained(tmp_path / "model")
    scan = write_bin(tmp_path / "scan.bin", case.points)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run_example("segment_file.py", str(scan), "--model", str(tmp_path / "model"), "-o", "out.npz", env=env, cwd=tmp_path)
    with np.load(tmp_path / "out.npz") as npz:
        expected = case.arrays["head"].argmax(1)
        np.testing.assert_array_equal(npz["labels"], expected)
        assert list(npz["names"][:3]) == [classes[i] for i in expected[:3]]
    assert_colourful_png(tmp_path / "out.png", min_colours=5)


def test_notebook(zoo, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("SCALR_ZOO_QUICKSTART_MODEL", "test-scalr")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2
    assert_colourful_png(tmp_path / "quickstart_pca.png")
    assert_colourful_png(tmp_path / "quickstart_similarity.png")


def test_torch_hub_entry_points(zoo):
    case = load_case("scalr_pretrained")
    model = torch.hub.load(str(REPO_ROOT), "test_scalr", source="local", trust_repo=True, device="cpu")
    assert_matches_reference(model.extract(case.points), case.arrays["backbone"])
    random = torch.hub.load(str(REPO_ROOT), "test_kitti", source="local", pretrained=False)
    assert random.config.arch.width == 32 and not torch.equal(
        random.state_dict()["classif.weight"], read_weight("test-kitti")
    )


def read_weight(name: str) -> torch.Tensor:
    return scalr_zoo.load(name, device="cpu").state_dict()["classif.weight"]


def test_hubconf_lists_every_registered_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scalr_zoo_hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for name in scalr_zoo.list_models():
        assert callable(getattr(hubconf, name.replace("-", "_")))
    assert "waffleiron_dinov2_L" in dir(hubconf)
