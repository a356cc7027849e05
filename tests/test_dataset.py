"""Dataset extraction: one process and torchrun (gloo, CPU), resumable, with an index."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import scalr_zoo
from scalr_zoo.dataset import INDEX_NAME, extract_dataset, list_scans
from scalr_zoo.io import write_bin

from zoo_helpers import REPO_ROOT

NUM_SCANS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Eight scans (two in a sub-folder) and a small model folder.

    The last scan, rank 1's last one under two ranks, is three whole sample
    scans overlaid (~160k points) so that it takes long enough for the
    kill test to stop a run before it is done; the others are small.
    """
    root = tmp_path_factory.mktemp("dataset")
    scans = root / "scans"
    for i in range(NUM_SCANS):
        rng = np.random.default_rng(i)
        if i == NUM_SCANS - 1:
            parts = [scalr_zoo.sample_scan(seed).points + np.float32([0.13 * seed, 0, 0, 0]) for seed in range(3)]
            subset = np.concatenate(parts)
        else:
            points = scalr_zoo.sample_scan(i % 3).points
            subset = points[rng.choice(len(points), 3000 + 500 * i, replace=False)]
        folder = scans / "seq1" if i >= 6 else scans
        write_bin(folder / f"{i:06d}.bin", subset)
    model_dir = root / "model"
    scalr_zoo.create_model({"width": 32, "depth": 3, "sensor": "semantickitti"}, name="tiny").save_pretrained(model_dir)
    return scans, model_dir


@pytest.fixture(scope="module")
def expected(dataset) -> dict[str, np.ndarray]:
    """Single-process features of every scan, from model.extract."""
    scans, model_dir = dataset
    model = scalr_zoo.load(model_dir, device="cpu")
    return {
        path.relative_to(scans).with_name(path.stem + ".npy").as_posix(): model.extract(scalr_zoo.read_points(path)).numpy()
        for path in list_scans(scans)
    }


def assert_outputs_equal(out: Path, expected: dict[str, np.ndarray]) -> None:
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == sorted(expected)
    assert not list(out.rglob("*.tmp"))
    for name, features in expected.items():
        saved = np.load(out / name)
        assert saved.dtype == np.float32 and saved.shape == features.shape
        np.testing.assert_allclose(saved, features, rtol=1e-5, atol=1e-5)


def torchrun(scans: Path, out: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "scalr_zoo", "extract-dataset", str(scans), "-o", str(out), "--model", str(model_dir),
        "--device", "cpu", "--num-workers", "1", *extra,
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as an out-of-memory killer or a pre-emption would."""
    victims = [pid, *descendants(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGSTOP)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def test_single_process_equals_extract_and_is_resumable(dataset, expected, tmp_path):
    scans, model_dir = dataset
    model = scalr_zoo.load(model_dir, device="cpu")
    out = tmp_path / "out"
    result = extract_dataset(model, scans, out, batch_size=3, num_workers=2, progress=False)
    assert len(result.written) == NUM_SCANS and not result.skipped
    assert_outputs_equal(out, expected)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["complete"] and index["num_scans"] == NUM_SCANS and index["model"] == "tiny"
    assert {e["output"]: e["shape"] for e in index["scans"]} == {k: list(v.shape) for k, v in expected.items()}

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = extract_dataset(model, scans, out, num_workers=0, progress=False)
    assert not again.written and len(again.skipped) == NUM_SCANS
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    other = scalr_zoo.create_model({"width": 32, "depth": 3})
    digest = index["config_hash"]
    extract_dataset(other, scans, tmp_path / "other", num_workers=0, progress=False)
    assert json.loads((tmp_path / "other" / INDEX_NAME).read_text())["config_hash"] != digest


def test_bad_scan_is_reported_and_others_done(dataset, tmp_path):
    scans, model_dir = dataset
    broken = tmp_path / "scans"
    broken.mkdir()
    write_bin(broken / "good.bin", scalr_zoo.sample_scan(0).points[:4000])
    (broken / "bad.bin").write_bytes(b"\x00" * 10)
    model = scalr_zoo.load(model_dir, device="cpu")
    result = extract_dataset(model, broken, tmp_path / "out", num_workers=0, progress=False)
    assert [p.name for p in result.written] == ["good.npy"]
    assert list(result.failed) == ["bad.bin"] and "bad.bin" in result.failed["bad.bin"]
    assert json.loads((tmp_path / "out" / INDEX_NAME).read_text())["failed"].keys() == {"bad.bin"}


def test_torchrun_two_ranks(dataset, expected, tmp_path):
    scans, model_dir = dataset
    out = tmp_path / "out"
    run = torchrun(scans, out, model_dir, "--batch-size", "2")
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert_outputs_equal(out, expected)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["complete"] and len(index["scans"]) == NUM_SCANS
    # sharded: rank 0 extracted its half only (scans 0, 2, 4, 6 of the sorted list)
    assert f"{NUM_SCANS // 2} written, 0 already there (rank 0)" in stdout

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rerun = torchrun(scans, out, model_dir)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # a rerun writes nothing


def test_torchrun_killed_midway_then_rerun_completes(dataset, expected, tmp_path):
    scans, model_dir = dataset
    out = tmp_path / "out"
    run = torchrun(scans, out, model_dir, "--batch-size", "1", "--num-workers", "0")
    deadline = time.monotonic() + 240
    # Kill once rank 1 has written the scan before its large last one.
    while not (out / "000005.npy").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_tree(run.pid)
    run.communicate()
    done = list(out.rglob("*.npy"))
    assert 0 < len(done) < NUM_SCANS, f"{len(done)} outputs before the kill"
    assert not (out / INDEX_NAME).exists()
    rerun = torchrun(scans, out, model_dir)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert_outputs_equal(out, expected)
    assert json.loads((out / INDEX_NAME).read_text())["complete"]
