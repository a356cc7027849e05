"""The scalr-zoo command line, end to end as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scalr_zoo
from scalr_zoo.io import write_bin

from conftest import load_case
from zoo_helpers import REPO_ROOT, archives, zoo  # noqa: F401 (fixtures)

NUSCENES_CLASSES = (
    "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian", "traffic_cone",
    "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade", "vegetation",
)
COMMANDS = ("list", "info", "download", "extract", "segment", "viz", "convert", "push", "extract-dataset", "finetune")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = dict(env or os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), environment.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "scalr_zoo", *args], env=environment, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    """Two KITTI-format .bin files cut from the package's sample scan."""
    folder = tmp_path_factory.mktemp("scans")
    paths = []
    for seed in (0, 1):
        points = scalr_zoo.sample_scan(seed).points
        near = points[np.linalg.norm(points[:, :2], axis=1) < 25][:12000]
        paths.append(write_bin(folder / f"scan{seed}.bin", near))
    return paths


@pytest.fixture(scope="module")
def class_model_dir(tmp_path_factory) -> Path:
    """The finetuned reference case with nuScenes class names, saved as a model folder."""
    case = load_case("scalr_finetuned")
    model = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu", classes=NUSCENES_CLASSES)
    folder = tmp_path_factory.mktemp("model") / "finetuned"
    model.save_pretrained(folder)
    return folder


def test_help_of_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    for command in COMMANDS:
        result = run_cli(command, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: scalr-zoo {command}")


def test_list_and_info():
    result = run_cli("list", "*kitti*")
    assert result.returncode == 0
    names = result.stdout.split()
    assert "waffleiron-48-256-kitti" in names and all("kitti" in n for n in names)
    result = run_cli("list", "--json", "--task", "distillation")
    assert set(json.loads(result.stdout)) == set(scalr_zoo.list_models(task="distillation"))
    result = run_cli("info", "waffleiron-dinov2-L")
    info = json.loads(result.stdout)
    assert info["name"] == "waffleiron-dinov2-L"
    assert_one_line_error(run_cli("info", "no-such-model"), "no-such-model")


def test_download_then_extract_offline(zoo, scans, tmp_path):
    env = zoo.subprocess_env()
    result = run_cli("download", "test-scalr", env=env)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert zoo.archive_requests("test-scalr") == 1

    offline = dict(env, HF_HUB_OFFLINE="1")
    zoo.static.stop()
    out = tmp_path / "features"
    result = run_cli("extract", *map(str, scans), "--model", "test-scalr", "-o", str(out), env=offline)
    assert result.returncode == 0, result.stderr
    model = scalr_zoo.load(folder, device="cpu")
    for scan in scans:
        saved = np.load(out / (scan.stem + ".npy"))
        expected = model.extract(np.fromfile(scan, np.float32).reshape(-1, 4)).numpy()
        assert saved.dtype == np.float32 and saved.shape == expected.shape
        np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".ply"])
def test_extract_output_types(class_model_dir, scans, tmp_path, suffix):
    target = tmp_path / f"out{suffix}"
    result = run_cli("extract", str(scans[0]), "--model", str(class_model_dir), "-o", str(target), "--head")
    assert result.returncode == 0, result.stderr
    n = len(np.fromfile(scans[0], np.float32)) // 4
    if suffix == ".npz":
        with np.load(target) as npz:
            assert npz["features"].shape == (n, 16) and npz["fov_mask"].shape == (n,)
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        assert load_file(str(target))["features"].shape == (n, 16)
    else:
        from plyfile import PlyData

        vertex = PlyData.read(str(target))["vertex"]
        assert vertex.count == n
        colours = np.stack([vertex["red"], vertex["green"], vertex["blue"]], 1)
        assert len(np.unique(colours, axis=0)) > 50


def test_segment(class_model_dir, scans, tmp_path):
    model = scalr_zoo.load(class_model_dir, device="cpu")
    points = np.fromfile(scans[0], np.float32).reshape(-1, 4)
    expected = model.segment(points)
    result = run_cli("segment", str(scans[0]), "--model", str(class_model_dir), "-o", str(tmp_path / "ids.npy"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), expected.labels)
    result = run_cli("segment", str(scans[0]), "--model", str(class_model_dir), "-o", str(tmp_path / "all.npz"))
    with np.load(tmp_path / "all.npz") as npz:
        np.testing.assert_array_equal(npz["names"], expected.names)
        np.testing.assert_allclose(npz["probabilities"], expected.probabilities, rtol=1e-5)
        assert tuple(npz["class_names"]) == NUSCENES_CLASSES


def test_viz_png_and_html(class_model_dir, scans, tmp_path):
    from PIL import Image

    for mode, extra in (("pca", ()), ("similarity", ("--query", "10")), ("labels", ())):
        target = tmp_path / f"{mode}.png"
        result = run_cli("viz", str(scans[0]), "--model", str(class_model_dir), "-o", str(target), "--mode", mode, *extra)
        assert result.returncode == 0, result.stderr
        image = np.asarray(Image.open(target).convert("RGB"))
        assert image.shape[0] >= 500 and len(np.unique(image.reshape(-1, 3), axis=0)) > 30
    result = run_cli("viz", str(scans[0]), "--model", str(class_model_dir), "-o", str(tmp_path / "v.html"))
    assert result.returncode == 0 and (tmp_path / "v.html").stat().st_size > 100_000


def test_bad_input_gives_one_line_errors(class_model_dir, scans, tmp_path):
    model = str(class_model_dir)
    assert_one_line_error(run_cli("extract", str(tmp_path / "nope.bin"), "--model", model, "-o", str(tmp_path)), "no such file")
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"\x00" * 10)  # not a multiple of 16 bytes
    assert_one_line_error(run_cli("extract", str(broken), "--model", model, "-o", str(tmp_path / "o.npy")), "broken.bin")
    assert_one_line_error(
        run_cli("extract", str(scans[0]), "--model", model, "-o", str(tmp_path / "o.npy"), "--sensor", "velodyne"),
        "unknown sensor preset",
    )
    assert_one_line_error(
        run_cli("extract", *map(str, scans), "--model", model, "-o", str(tmp_path / "o.npy")), "output directory"
    )
    assert_one_line_error(run_cli("viz", str(scans[0]), "--model", model, "-o", str(tmp_path / "o.jpg")), ".png")
    assert_one_line_error(run_cli("extract", str(scans[0]), "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o.npy")), "missing")
    nohead = tmp_path / "nohead"
    scalr_zoo.create_model({"width": 32, "depth": 2}).save_pretrained(nohead)
    assert_one_line_error(run_cli("segment", str(scans[0]), "--model", str(nohead), "-o", str(tmp_path / "s.npy")), "head")
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "s.npy").exists()
    usage = run_cli("extract", str(scans[0]))
    assert usage.returncode == 2 and "required" in usage.stderr and "Traceback" not in usage.stderr


def test_convert_checkpoint(tmp_path):
    case = load_case("waffleiron_kitti")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(case.config))
    result = run_cli("convert", str(case.checkpoint), "-o", str(tmp_path / "out"), "--config", str(config))
    assert result.returncode == 0, result.stderr
    model = scalr_zoo.load(tmp_path / "out", device="cpu")
    reference = scalr_zoo.load(case.checkpoint, config=case.config, device="cpu")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert_one_line_error(run_cli("convert", str(case.checkpoint), "-o", str(tmp_path / "o2")), "--config")


def test_finetune_linear_probe(tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    for seed in (0, 1):
        scan = scalr_zoo.sample_scan(seed)
        near = np.linalg.norm(scan.points[:, :2], axis=1) < 20
        np.savez(data / f"scan{seed}.npz", points=scan.points[near], labels=scan.labels[near])
    start = tmp_path / "start"
    scalr_zoo.create_model({"width": 32, "depth": 2, "sensor": "semantickitti"}).save_pretrained(start)
    names = ",".join(scalr_zoo.sample_scan(0).label_names)
    out = tmp_path / "probe"
    result = run_cli("finetune", str(data), "--model", str(start), "-o", str(out), "--epochs", "1", "--classes", names)
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "linear_probe"
    trained = scalr_zoo.load(out, device="cpu")
    assert trained.config.classes == tuple(names.split(","))
    before = scalr_zoo.load(start, device="cpu").state_dict()
    after = trained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("classif"))
    assert_one_line_error(run_cli("finetune", str(tmp_path / "none"), "--model", str(start), "-o", str(out)), "none")
