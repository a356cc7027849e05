"""Readers and writers: every format round-trips through the library its users write it with;
broken files give a ValueError naming the file and the problem."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from scalr_zoo.io import lzf_decompress, read_point_cloud, read_points, write_bin, write_ply


def make_points(n: int = 500, seed: int = 0, step: float | None = None) -> np.ndarray:
    """(n, 4) float32 points; with ``step``, coordinates and intensity on a grid of that step
    (few distinct bytes, so that LZF compresses them as it does real sensor data)."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-50, 50, size=(n, 3))
    intensity = rng.uniform(0, 1, size=(n, 1))
    points = np.hstack([xyz, intensity])
    if step is not None:
        points = np.round(points / step) * step
    return points.astype(np.float32)


# ----------------------------------------------------------------------------- flat binary


def test_kitti_bin_round_trip(tmp_path):
    points = make_points()
    path = tmp_path / "000000.bin"
    points.tofile(path)  # how KITTI's own files are made: raw float32 records
    cloud = read_point_cloud(path)
    assert cloud.format == "kitti" and cloud.intensity_field == "reflectance"
    np.testing.assert_array_equal(cloud.points, points)
    assert cloud.points.dtype == np.float32 and cloud.points.flags.c_contiguous


def test_nuscenes_pcd_bin_round_trip(tmp_path):
    points = make_points()
    ring = np.arange(len(points), dtype=np.float32)[:, None] % 32
    path = tmp_path / "n008__LIDAR_TOP__1533151603547590.pcd.bin"
    np.hstack([points[:, :3], points[:, 3:] * 255, ring]).astype(np.float32).tofile(path)
    cloud = read_point_cloud(path)
    assert cloud.format == "nuscenes" and cloud.intensity_field == "intensity"
    np.testing.assert_array_equal(cloud.points[:, :3], points[:, :3])
    np.testing.assert_array_equal(cloud.points[:, 3], (points[:, 3:] * 255).astype(np.float32)[:, 0])


def test_format_override_and_unknown_extension(tmp_path):
    points = make_points(50)
    path = tmp_path / "scan.dat"
    points.tofile(path)
    with pytest.raises(ValueError, match=r"scan\.dat.*\.dat.*format="):
        read_points(path)
    np.testing.assert_array_equal(read_points(path, format="kitti"), points)
    np.testing.assert_array_equal(read_points(path, format="bin"), points)
    with pytest.raises(ValueError, match="unknown format 'xyz'"):
        read_points(path, format="xyz")


def test_kitti_write_bin_round_trip(tmp_path):
    points = make_points(100)
    path = write_bin(tmp_path / "out.bin", points)
    np.testing.assert_array_equal(np.fromfile(path, dtype=np.float32).reshape(-1, 4), points)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left


def test_truncated_and_wrong_bin_files(tmp_path):
    points = make_points(100)
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(points.tobytes()[:-6])
    with pytest.raises(ValueError, match=r"cut\.bin: 1594 bytes is not a whole number of KITTI points.*truncated"):
        read_points(truncated)
    nuscenes_as_kitti = tmp_path / "five.bin"
    np.zeros((3, 5), np.float32).tofile(nuscenes_as_kitti)  # 60 bytes: not a multiple of 16
    with pytest.raises(ValueError, match="format='nuscenes'"):
        read_points(nuscenes_as_kitti)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.bin: the file holds no points"):
        read_points(empty)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_points(tmp_path / "missing.bin")


# ----------------------------------------------------------------------------- PCD


@pytest.mark.parametrize("encoding", ["ascii", "binary", "binary_compressed"])
def test_pcd_round_trip(tmp_path, encoding):
    pypcd4 = pytest.importorskip("pypcd4")
    points = make_points(700, step=1 / 64)
    path = tmp_path / f"{encoding}.pcd"
    cloud = pypcd4.PointCloud.from_points(points, ("x", "y", "z", "intensity"), (np.float32,) * 4)
    cloud.save(path, encoding=pypcd4.Encoding(encoding))
    assert f"DATA {encoding}\n".encode() in path.read_bytes()  # not pypcd4's fallback to binary
    read = read_point_cloud(path)
    assert read.format == "pcd" and read.intensity_field == "intensity"
    if encoding == "ascii":  # written as decimal text
        np.testing.assert_allclose(read.points, points, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(read.points, points)


@pytest.mark.parametrize("encoding", ["ascii", "binary", "binary_compressed"])
def test_pcd_mixed_field_types(tmp_path, encoding):
    """An Ouster/ROS-style layout: float32 xyz, uint16 reflectivity, uint8 ring, float64 time."""
    pypcd4 = pytest.importorskip("pypcd4")
    points = make_points(300, seed=1, step=1 / 64)
    rng = np.random.default_rng(1)
    reflectivity = rng.integers(0, 1024, len(points)).astype(np.uint16)
    ring = rng.integers(0, 128, len(points)).astype(np.uint8)
    time = np.arange(len(points)) * 1e-5
    cloud = pypcd4.PointCloud.from_points(
        [points[:, 0], points[:, 1], points[:, 2], ring, reflectivity, time],
        ("x", "y", "z", "ring", "reflectivity", "t"),
        (np.float32, np.float32, np.float32, np.uint8, np.uint16, np.float64),
    )
    path = tmp_path / "ouster.pcd"
    cloud.save(path, encoding=pypcd4.Encoding(encoding))
    assert f"DATA {encoding}\n".encode() in path.read_bytes()
    read = read_point_cloud(path)
    assert read.intensity_field == "reflectivity"
    np.testing.assert_allclose(read.points[:, :3], points[:, :3], rtol=0, atol=1e-6 if encoding == "ascii" else 0)
    np.testing.assert_array_equal(read.points[:, 3], reflectivity.astype(np.float32))


def test_pcd_without_intensity_warns_and_uses_zeros(tmp_path, caplog):
    pypcd4 = pytest.importorskip("pypcd4")
    points = make_points(50)
    path = tmp_path / "xyz.pcd"
    pypcd4.PointCloud.from_xyz_points(points[:, :3]).save(path, encoding=pypcd4.Encoding.BINARY)
    with caplog.at_level(logging.WARNING, logger="scalr_zoo.io"):
        read = read_point_cloud(path)
    assert read.intensity_field is None
    np.testing.assert_array_equal(read.points[:, :3], points[:, :3])
    np.testing.assert_array_equal(read.points[:, 3], 0)
    assert "no intensity field" in caplog.text and "xyz.pcd" in caplog.text


def test_pcd_hand_written_ascii_with_comments_and_count(tmp_path):
    """The PCD spec's own kind of file: comments, COUNT, WIDTH x HEIGHT instead of POINTS."""
    text = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z normal intensity\n"
        "SIZE 4 4 4 4 4\nTYPE F F F F F\nCOUNT 1 1 1 3 1\nWIDTH 2\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        "DATA ascii\n1.5 -2 3 0 0 1 0.25\n4 5 6.5 1 0 0 0.75\n"
    )
    path = tmp_path / "spec.pcd"
    path.write_text(text)
    np.testing.assert_array_equal(read_points(path), np.array([[1.5, -2, 3, 0.25], [4, 5, 6.5, 0.75]], np.float32))


def _pcd_bytes(tmp_path, encoding: str, n: int = 400) -> bytes:
    pypcd4 = pytest.importorskip("pypcd4")
    points = make_points(n, step=1 / 64)
    path = tmp_path / "source.pcd"
    pypcd4.PointCloud.from_points(points, ("x", "y", "z", "intensity"), (np.float32,) * 4).save(
        path, encoding=pypcd4.Encoding(encoding)
    )
    return path.read_bytes()


def test_broken_pcd_files(tmp_path):
    cases = {}
    binary = _pcd_bytes(tmp_path, "binary")
    cases["binary_cut.pcd"] = (binary[:-10], "binary PCD data is .* bytes, expected 400 points x 16.*truncated")
    compressed = _pcd_bytes(tmp_path, "binary_compressed")
    cases["compressed_cut.pcd"] = (compressed[:-10], r"size word says .*truncated")
    start = compressed.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n") + 8
    corrupt = bytearray(compressed)
    corrupt[start] = 0xFF  # a back-reference with nothing before it
    cases["compressed_corrupt.pcd"] = (bytes(corrupt), "corrupt binary_compressed PCD data")
    ascii_data = _pcd_bytes(tmp_path, "ascii")
    cases["ascii_cut.pcd"] = (ascii_data[: ascii_data.rindex(b"\n", 0, -1)], "ASCII PCD data holds 1596 values, expected 400 points")
    header_end = ascii_data.index(b"DATA ascii\n") + len(b"DATA ascii\n")
    cases["ascii_word.pcd"] = (ascii_data[:header_end] + b"hello " + ascii_data[header_end:], "not a number")
    cases["no_data.pcd"] = (b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\n", "header ends before its DATA line")
    cases["no_x.pcd"] = (b"FIELDS a y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\nDATA ascii\n1 2 3\n", "no x field; the file's fields are a, y, z")
    cases["mismatch.pcd"] = (b"FIELDS x y z\nSIZE 4 4\nTYPE F F F\nPOINTS 1\nDATA ascii\n1 2 3\n", "3 FIELDS, 2 SIZE")
    cases["bad_type.pcd"] = (b"FIELDS x y z\nSIZE 4 4 3\nTYPE F F F\nPOINTS 1\nDATA ascii\n1 2 3\n", "unsupported TYPE F / SIZE 3")
    cases["encoding.pcd"] = (b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\nDATA zip\n", "unknown PCD DATA encoding 'zip'")
    cases["binary.pcd"] = (b"\x89PNG\r\n\x1a\n\xff\xfe" * 10, "non-ASCII|DATA line")
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message) as info:
            read_points(path)
        assert name in str(info.value), name


def test_lzf_decoder_matches_liblzf():
    """Our pure-Python decoder against the C liblzf compressor (python-lzf)."""
    lzf = pytest.importorskip("lzf")
    rng = np.random.default_rng(0)
    samples = [
        b"a" * 1000,  # overlapping back-references (distance 1)
        bytes(rng.integers(0, 4, 5000, dtype=np.uint8)),  # short matches
        np.repeat(rng.normal(size=300).astype(np.float32), 7).tobytes(),  # long matches (extra length byte)
        (b"scalr-zoo " * 700) + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)),  # long literals too
        make_points(2000, step=1 / 256).T.copy().tobytes(),  # a column-major point block as PCL writes it
    ]
    for raw in samples:
        packed = lzf.compress(raw)
        assert packed is not None and len(packed) < len(raw)
        assert lzf_decompress(packed, len(raw)) == raw
    packed = lzf.compress(samples[0])
    with pytest.raises(ValueError, match="decompresses to 1000 bytes, expected 1001"):
        lzf_decompress(packed, 1001)
    with pytest.raises(ValueError, match="more than 999 bytes"):
        lzf_decompress(packed, 999)
    with pytest.raises(ValueError, match="past the end"):
        lzf_decompress(b"\x05abc", 6)
    with pytest.raises(ValueError, match="before the start"):
        lzf_decompress(b"\x00a\x20\x05", 4)


# ----------------------------------------------------------------------------- PLY


@pytest.mark.parametrize("text,byte_order", [(True, "="), (False, "<"), (False, ">")])
@pytest.mark.parametrize("intensity_name", ["intensity", "scalar_Intensity"])
def test_ply_round_trip(tmp_path, text, byte_order, intensity_name):
    plyfile = pytest.importorskip("plyfile")
    points = make_points(300)
    vertex = np.empty(len(points), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), (intensity_name, "f4"), ("red", "u1")])
    for i, name in enumerate(("x", "y", "z", intensity_name)):
        vertex[name] = points[:, i]
    vertex["red"] = 7
    path = tmp_path / "cloud.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(vertex, "vertex")], text=text, byte_order=byte_order).write(str(path))
    cloud = read_point_cloud(path)
    assert cloud.format == "ply" and cloud.intensity_field == intensity_name
    if text:
        np.testing.assert_allclose(cloud.points, points, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(cloud.points, points)


def test_write_ply_read_by_plyfile(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    points = make_points(200)
    colors = np.random.default_rng(0).integers(0, 256, (200, 3)).astype(np.uint8)
    path = write_ply(tmp_path / "out.ply", points, colors)
    vertex = plyfile.PlyData.read(str(path))["vertex"].data
    np.testing.assert_array_equal(np.column_stack([vertex[a] for a in ("x", "y", "z", "intensity")]), points)
    np.testing.assert_array_equal(np.column_stack([vertex[c] for c in ("red", "green", "blue")]), colors)
    np.testing.assert_array_equal(read_points(path), points)  # and our reader reads our writer
    write_ply(tmp_path / "xyz.ply", points[:, :3], colors / 255.0)  # float colours, no intensity
    vertex = plyfile.PlyData.read(str(tmp_path / "xyz.ply"))["vertex"].data
    assert "intensity" not in vertex.dtype.names
    np.testing.assert_array_equal(vertex["green"], colors[:, 1])
    with pytest.raises(ValueError, match=r"colors must have shape \(200, 3\)"):
        write_ply(tmp_path / "bad.ply", points, colors[:10])
    assert not (tmp_path / "bad.ply").exists()


def test_broken_ply_files(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    vertex = np.zeros(100, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    for text in (True, False):
        path = tmp_path / f"cut_{text}.ply"
        plyfile.PlyData([plyfile.PlyElement.describe(vertex, "vertex")], text=text).write(str(path))
        path.write_bytes(path.read_bytes()[:-30])
        with pytest.raises(ValueError, match=rf"cut_{text}\.ply: not a readable PLY file .*(end-of-file|end-of-line)"):
            read_points(path)
    faces = tmp_path / "faces.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(np.zeros(2, dtype=[("a", "i4")]), "face")]).write(str(faces))
    with pytest.raises(ValueError, match=r"faces\.ply: the PLY file has no 'vertex' element"):
        read_points(faces)
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"ply\nformat nonsense\n")
    with pytest.raises(ValueError, match="garbage.ply: not a readable PLY file"):
        read_points(garbage)


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "a.ply"
    path.write_bytes(b"ply\n")
    monkeypatch.setitem(sys.modules, "plyfile", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install scalr-zoo\[ply\]"):
        read_points(path)
    las = tmp_path / "a.las"
    las.write_bytes(b"LASF")
    monkeypatch.setitem(sys.modules, "laspy", None)
    with pytest.raises(ImportError, match=r"pip install scalr-zoo\[las\]"):
        read_points(las)


# ----------------------------------------------------------------------------- LAS / LAZ


@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_las_round_trip(tmp_path, suffix):
    laspy = pytest.importorskip("laspy")
    if suffix == ".laz":
        pytest.importorskip("lazrs")
    rng = np.random.default_rng(0)
    n = 400
    # LAS stores integers times a scale: pick coordinates on the 1 mm grid so they are exact.
    xyz = rng.integers(-50_000, 50_000, size=(n, 3)) * 0.001
    intensity = rng.integers(0, 65535, n).astype(np.uint16)
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales = np.array([0.001, 0.001, 0.001])
    header.offsets = np.zeros(3)
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    las.intensity = intensity
    path = tmp_path / f"tile{suffix}"
    las.write(str(path))
    cloud = read_point_cloud(path)
    assert cloud.format == "las" and cloud.intensity_field == "intensity"
    np.testing.assert_array_equal(cloud.points[:, :3], xyz.astype(np.float32))
    np.testing.assert_array_equal(cloud.points[:, 3], intensity.astype(np.float32))


def test_broken_las_files(tmp_path):
    laspy = pytest.importorskip("laspy")
    pytest.importorskip("lazrs")
    header = laspy.LasHeader(point_format=3, version="1.4")
    las = laspy.LasData(header)
    las.x = las.y = las.z = np.arange(200) * 0.01
    for suffix in (".las", ".laz"):
        path = tmp_path / f"full{suffix}"
        las.write(str(path))
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(path.read_bytes()[:-100])
        with pytest.raises(ValueError, match=rf"cut\{suffix}: not a readable LAS/LAZ file"):
            read_points(cut)
    garbage = tmp_path / "garbage.las"
    garbage.write_bytes(b"not a las file" * 20)
    with pytest.raises(ValueError, match="garbage.las: not a readable LAS/LAZ file .*signature"):
        read_points(garbage)


# ----------------------------------------------------------------------------- numpy


def test_npy_and_npz_round_trip(tmp_path, caplog):
    points = make_points(100)
    np.save(tmp_path / "p.npy", points)
    np.testing.assert_array_equal(read_points(tmp_path / "p.npy"), points)
    np.save(tmp_path / "wide.npy", np.hstack([points, points]).astype(np.float64))
    np.testing.assert_array_equal(read_points(tmp_path / "wide.npy"), points)
    np.save(tmp_path / "p3.npy", points[:, :3])
    with caplog.at_level(logging.WARNING, logger="scalr_zoo.io"):
        xyz = read_point_cloud(tmp_path / "p3.npy")
    assert xyz.intensity_field is None and "no intensity field" in caplog.text
    np.testing.assert_array_equal(xyz.points[:, 3], 0)
    structured = np.zeros(100, dtype=[("X", "f8"), ("Y", "f8"), ("Z", "f8"), ("remission", "f4")])
    for i, name in enumerate(("X", "Y", "Z", "remission")):
        structured[name] = points[:, i]
    np.save(tmp_path / "s.npy", structured)
    cloud = read_point_cloud(tmp_path / "s.npy")
    assert cloud.intensity_field == "remission"
    np.testing.assert_array_equal(cloud.points, points)
    np.savez(tmp_path / "a.npz", points=points, labels=np.arange(100))
    np.testing.assert_array_equal(read_points(tmp_path / "a.npz"), points)
    np.savez_compressed(tmp_path / "one.npz", scan=points)
    np.testing.assert_array_equal(read_points(tmp_path / "one.npz"), points)


def test_broken_numpy_files(tmp_path):
    points = make_points(100)
    np.save(tmp_path / "full.npy", points)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"cut\.npy: not a readable \.npy array"):
        read_points(tmp_path / "cut.npy")
    np.save(tmp_path / "flat.npy", points[:, 0])
    with pytest.raises(ValueError, match=r"flat\.npy: the array must be an \(N, 3\+\) array.*shape \(100,\)"):
        read_points(tmp_path / "flat.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects\.npy: not a readable \.npy array.*pickle"):
        read_points(tmp_path / "objects.npy")
    np.savez(tmp_path / "two.npz", a=points, b=points)
    with pytest.raises(ValueError, match=r"two\.npz: holds arrays \['a', 'b'\] and none is called 'points'"):
        read_points(tmp_path / "two.npz")
    np.savez_compressed(tmp_path / "whole.npz", points=points)
    data = bytearray((tmp_path / "whole.npz").read_bytes())
    data[100:140] = bytes(40)  # damage the compressed array, keep the zip directory
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged\.npz: (array 'points' is not readable|not a readable)"):
        read_points(tmp_path / "damaged.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"bad\.npz: not a readable \.npz archive"):
        read_points(tmp_path / "bad.npz")
