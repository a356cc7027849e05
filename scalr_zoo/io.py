"""Point-cloud files in and out.

:func:`read_points` turns a lidar file into the ``(N, 4)`` float32 array
(x, y, z, intensity) that :meth:`WaffleIron.extract` takes. Supported formats,
chosen by file name or by ``format=``:

========== ======================= ==============================================
format     file names              contents
========== ======================= ==============================================
kitti      ``*.bin``               float32 x, y, z, reflectance (KITTI, SemanticKITTI)
nuscenes   ``*.pcd.bin``           float32 x, y, z, intensity, ring (nuScenes)
pcd        ``*.pcd``               PCL point cloud: ascii, binary or binary_compressed
ply        ``*.ply``               ascii or binary PLY (needs ``pip install scalr-zoo[ply]``)
las        ``*.las``, ``*.laz``    ASPRS LAS / LAZ (needs ``pip install scalr-zoo[las]``)
npy        ``*.npy``               (N, >=3) array, or a structured array with x, y, z fields
npz        ``*.npz``               the array ``points`` (or the only array) as for npy
========== ======================= ==============================================

Intensity comes from the file's own field when it has one, looked up by the
names in :data:`INTENSITY_FIELDS` (the name used is reported in
:attr:`PointCloud.intensity_field` and logged). A file without one gets zero
intensity, with a warning: features are then computed without that cue, which
changes them; pass the right intensity yourself when you have it. Values are
kept as stored (KITTI 0-1, nuScenes 0-255, LAS 0-65535), so pick the matching
``sensor=`` normalisation when extracting.

Truncated or malformed files raise a :class:`ValueError` that names the file
and the problem. Writers (:func:`write_ply`, :func:`write_bin`) write to a
temporary file next to the target and rename it into place, so a target is
never left half-written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping, Union

import numpy as np

__all__ = [
    "FORMATS",
    "SCAN_SUFFIXES",
    "scan_stem",
    "INTENSITY_FIELDS",
    "PointCloud",
    "read_point_cloud",
    "read_points",
    "write_ply",
    "write_bin",
    "atomic_write",
    "lzf_decompress",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Format names accepted by ``format=`` (see the module docstring).
FORMATS = ("kitti", "nuscenes", "pcd", "ply", "las", "npy", "npz")

_FORMAT_ALIASES = {"bin": "kitti", "semantickitti": "kitti", "pcd.bin": "nuscenes", "laz": "las"}

#: Field names taken as intensity, in order of preference (compared case-insensitively).
INTENSITY_FIELDS = (
    "intensity",
    "reflectance",
    "remission",
    "i",
    "scalar_intensity",
    "intensities",
    "reflectivity",
)


@dataclass
class PointCloud:
    """A scan read from a file.

    Attributes:
        points: ``(N, 4)`` float32 x, y, z, intensity.
        format: the format it was read as (one of :data:`FORMATS`).
        intensity_field: the file's field the intensity column came from, or
            None when the file has none (the column is then zeros).
        path: the file.
    """

    points: np.ndarray
    format: str
    intensity_field: str | None
    path: Path

    def __len__(self) -> int:
        return int(self.points.shape[0])


#: File endings of scans, longest first (``.pcd.bin`` before ``.bin``).
SCAN_SUFFIXES = (".pcd.bin", ".bin", ".pcd", ".ply", ".las", ".laz", ".npy", ".npz")


def scan_stem(path: PathLike) -> str:
    """The file name without its scan ending: ``000042.pcd.bin`` -> ``000042``."""
    name = Path(path).name
    for suffix in SCAN_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def detect_format(path: PathLike) -> str:
    """The format of a file from its name (``.pcd.bin`` before ``.bin``).

    Raises:
        ValueError: an extension that names no supported format.
    """
    name = Path(path).name.lower()
    if name.endswith(".pcd.bin"):
        return "nuscenes"
    suffix = Path(name).suffix.lstrip(".")
    fmt = _FORMAT_ALIASES.get(suffix, suffix)
    if fmt not in FORMATS:
        raise ValueError(
            f"{path}: cannot tell the point-cloud format from the extension {Path(name).suffix or '(none)'!r}; "
            f"pass format= one of {', '.join(FORMATS)}"
        )
    return fmt


def read_points(path: PathLike, format: str | None = None) -> np.ndarray:  # noqa: A002 - the natural name
    """``(N, 4)`` float32 x, y, z, intensity of a point-cloud file.

    See :func:`read_point_cloud`, which also says where the intensity came from.
    """
    return read_point_cloud(path, format).points


def read_point_cloud(path: PathLike, format: str | None = None) -> PointCloud:  # noqa: A002
    """Read a point-cloud file.

    Args:
        path: the file.
        format: one of :data:`FORMATS` (or ``"bin"``, ``"laz"``); default:
            from the file name.

    Returns:
        A :class:`PointCloud` with ``(N, 4)`` float32 points.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown format, or a truncated or malformed file.
        ImportError: the optional package a format needs is missing (the
            message names the ``pip install`` to run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if format is None:
        fmt = detect_format(path)
    else:
        fmt = _FORMAT_ALIASES.get(format.lower(), format.lower())
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    reader = _READERS[fmt]
    points, field = reader(path)
    if points.shape[0] == 0:
        raise ValueError(f"{path}: the file holds no points")
    if field is None:
        logger.warning(
            "%s has no intensity field; using intensity 0 for every point (features differ from "
            "those of a scan with intensity)", path
        )
    else:
        logger.info("%s: intensity from field %r", path, field)
    bad = int((~np.isfinite(points)).any(axis=1).sum())
    if bad:
        logger.warning("%s: %d of %d points have NaN or Inf values", path, bad, points.shape[0])
    return PointCloud(np.ascontiguousarray(points, dtype=np.float32), fmt, field, path)


# ----------------------------------------------------------------------------- flat float32 files


def _read_float_records(path: Path, columns: int, what: str, other: str) -> np.ndarray:
    size = path.stat().st_size
    record = 4 * columns
    if size % record:
        raise ValueError(
            f"{path}: {size} bytes is not a whole number of {what} points ({columns} float32 = {record} bytes "
            f"each); the file is truncated or not in this format ({other})"
        )
    return np.fromfile(path, dtype="<f4").reshape(-1, columns)


def _read_kitti(path: Path) -> tuple[np.ndarray, str | None]:
    data = _read_float_records(path, 4, "KITTI", "a nuScenes .pcd.bin holds 5 floats per point: format='nuscenes'")
    return data, "reflectance"


def _read_nuscenes(path: Path) -> tuple[np.ndarray, str | None]:
    data = _read_float_records(path, 5, "nuScenes", "a KITTI .bin holds 4 floats per point: format='kitti'")
    return data[:, :4], "intensity"


# ----------------------------------------------------------------------------- named fields


def _points_from_fields(fields: Mapping[str, np.ndarray], path: Path) -> tuple[np.ndarray, str | None]:
    """Assemble (N, 4) points from named per-point columns (x, y, z and an intensity field)."""
    by_lower = {name.lower(): name for name in fields}
    missing = [axis for axis in "xyz" if axis not in by_lower]
    if missing:
        raise ValueError(
            f"{path}: no {', '.join(missing)} field; the file's fields are {', '.join(fields) or '(none)'}"
        )
    columns = [np.asarray(fields[by_lower[axis]], dtype=np.float64).reshape(-1) for axis in "xyz"]
    intensity_name = next((by_lower[c] for c in INTENSITY_FIELDS if c in by_lower), None)
    n = columns[0].shape[0]
    if intensity_name is None:
        columns.append(np.zeros(n))
    else:
        intensity = np.asarray(fields[intensity_name])
        if intensity.ndim > 1 and intensity.shape[1] != 1:
            raise ValueError(f"{path}: intensity field {intensity_name!r} has {intensity.shape[1]} values per point")
        columns.append(intensity.astype(np.float64).reshape(-1))
    return np.stack(columns, axis=1).astype(np.float32), intensity_name


def _points_from_array(array: np.ndarray, path: Path, what: str) -> tuple[np.ndarray, str | None]:
    if array.dtype.names:
        return _points_from_fields({name: array[name] for name in array.dtype.names}, path)
    if array.dtype.kind not in "fiu" or array.ndim != 2 or array.shape[1] < 3:
        raise ValueError(
            f"{path}: {what} must be an (N, 3+) array of numbers (x, y, z[, intensity, ...]) "
            f"or a structured array with x, y, z fields, got shape {array.shape} dtype {array.dtype}"
        )
    if array.shape[1] == 3:
        return np.column_stack([array, np.zeros(len(array))]).astype(np.float32), None
    return array[:, :4].astype(np.float32), "column 3"


def _read_npy(path: Path) -> tuple[np.ndarray, str | None]:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    return _points_from_array(array, path, "the array")


def _read_npz(path: Path) -> tuple[np.ndarray, str | None]:
    unreadable = (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile, zlib.error)
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({exc})") from None
    with archive:
        keys = list(archive.files)
        if "points" not in keys and len(keys) != 1:
            raise ValueError(
                f"{path}: holds arrays {keys} and none is called 'points'; save the cloud under the key 'points'"
            )
        key = "points" if "points" in keys else keys[0]
        try:
            array = archive[key]
        except unreadable as exc:
            raise ValueError(f"{path}: array {key!r} is not readable ({exc})") from None
    return _points_from_array(array, path, f"array {key!r}")


# ----------------------------------------------------------------------------- PCD


_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def _read_pcd_header(handle: IO[bytes], path: Path) -> dict[str, list[str]]:
    header: dict[str, list[str]] = {}
    while True:
        raw = handle.readline(4096)
        if not raw:
            raise ValueError(f"{path}: the PCD header ends before its DATA line (truncated or not a PCD file)")
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: the PCD header holds non-ASCII bytes; not a PCD file") from None
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == "DATA":
            return header


def _pcd_layout(header: dict[str, list[str]], path: Path) -> tuple[np.dtype, int, str]:
    """Per-point dtype (little-endian, packed), point count and data encoding of a PCD header."""
    for key in ("FIELDS", "SIZE", "TYPE", "DATA"):
        if key not in header:
            raise ValueError(f"{path}: the PCD header has no {key} line")
    names, sizes, types = header["FIELDS"], header["SIZE"], header["TYPE"]
    counts = header.get("COUNT", ["1"] * len(names))
    if not (len(names) == len(sizes) == len(types) == len(counts)):
        raise ValueError(
            f"{path}: the PCD header lists {len(names)} FIELDS, {len(sizes)} SIZE, {len(types)} TYPE "
            f"and {len(counts)} COUNT entries; they must match"
        )
    fields = []
    seen: dict[str, int] = {}
    for name, size, kind, count in zip(names, sizes, types, counts):
        try:
            code = _PCD_TYPES[(kind.upper(), int(size))]
            count_int = int(count)
        except (KeyError, ValueError):
            raise ValueError(f"{path}: PCD field {name!r} has an unsupported TYPE {kind} / SIZE {size} / COUNT {count}") from None
        # PCL names padding fields "_"; make repeated names unique for numpy.
        unique = name if name not in seen else f"{name}__{seen[name]}"
        seen[name] = seen.get(name, 0) + 1
        fields.append((unique, "<" + code, (count_int,)) if count_int != 1 else (unique, "<" + code))
    dtype = np.dtype(fields)
    try:
        if "POINTS" in header:
            n = int(header["POINTS"][0])
        else:
            n = int(header["WIDTH"][0]) * int(header.get("HEIGHT", ["1"])[0])
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"{path}: the PCD header gives neither POINTS nor WIDTH x HEIGHT") from None
    if n < 0:
        raise ValueError(f"{path}: the PCD header gives a negative point count {n}")
    encoding = header["DATA"][0].lower() if header["DATA"] else ""
    return dtype, n, encoding


def _read_pcd(path: Path) -> tuple[np.ndarray, str | None]:
    with open(path, "rb") as handle:
        header = _read_pcd_header(handle, path)
        dtype, n, encoding = _pcd_layout(header, path)
        body = handle.read()
    if encoding == "ascii":
        columns = sum(int(np.prod(dtype[i].shape)) or 1 for i in range(len(dtype)))
        try:
            values = np.array(body.split(), dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}: the ASCII PCD data holds something that is not a number") from None
        if values.size != n * columns:
            raise ValueError(
                f"{path}: the ASCII PCD data holds {values.size} values, expected {n} points x {columns} = "
                f"{n * columns} (truncated file or wrong header)"
            )
        table = values.reshape(n, columns)
        fields, start = {}, 0
        for name in dtype.names:
            width = int(np.prod(dtype[name].shape)) or 1
            fields[name] = table[:, start : start + width]
            start += width
    elif encoding == "binary":
        expected = n * dtype.itemsize
        if len(body) < expected:
            raise ValueError(
                f"{path}: binary PCD data is {len(body)} bytes, expected {n} points x {dtype.itemsize} = "
                f"{expected} bytes (truncated file)"
            )
        records = np.frombuffer(body, dtype=dtype, count=n)
        fields = {name: records[name] for name in dtype.names}
    elif encoding == "binary_compressed":
        if len(body) < 8:
            raise ValueError(f"{path}: binary_compressed PCD data has no size words (truncated file)")
        compressed_size, raw_size = (int(v) for v in np.frombuffer(body[:8], dtype="<u4"))
        expected = n * dtype.itemsize
        if raw_size != expected:
            raise ValueError(
                f"{path}: binary_compressed PCD says {raw_size} bytes uncompressed, the header's "
                f"{n} points x {dtype.itemsize} bytes make {expected}"
            )
        if len(body) - 8 < compressed_size:
            raise ValueError(
                f"{path}: binary_compressed PCD data is {len(body) - 8} bytes, its size word says "
                f"{compressed_size} (truncated file)"
            )
        try:
            raw = lzf_decompress(body[8 : 8 + compressed_size], raw_size)
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt binary_compressed PCD data ({exc})") from None
        # Column-major: all values of the first field, then the second, ...
        fields, offset = {}, 0
        for name in dtype.names:
            sub = dtype[name]
            nbytes = n * sub.itemsize
            values = np.frombuffer(raw, dtype=sub.base, count=n * (sub.itemsize // sub.base.itemsize), offset=offset)
            fields[name] = values.reshape(n, -1) if sub.shape else values
            offset += nbytes
    else:
        raise ValueError(f"{path}: unknown PCD DATA encoding {encoding!r} (ascii, binary or binary_compressed)")
    return _points_from_fields(fields, path)


def lzf_decompress(data: bytes, size: int) -> bytes:
    """Decompress an LZF block (liblzf's format, as PCL's binary_compressed uses).

    The stream is a sequence of tokens: a control byte below 32 starts a run of
    ``ctrl + 1`` literal bytes; any other starts a back-reference of
    ``(ctrl >> 5) + 2`` bytes (length 7 takes an extra length byte) starting
    ``((ctrl & 31) << 8) + next_byte + 1`` bytes back.

    Args:
        data: the compressed bytes.
        size: the exact decompressed size.

    Raises:
        ValueError: the stream is cut short, points before its start, or
            does not decompress to ``size`` bytes.
    """
    out = bytearray(size)
    src = memoryview(data)
    ip, op, end = 0, 0, len(data)
    while ip < end:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            length = ctrl + 1
            if ip + length > end:
                raise ValueError("LZF literal run past the end of the input")
            if op + length > size:
                raise ValueError(f"LZF data decompresses to more than {size} bytes")
            out[op : op + length] = src[ip : ip + length]
            ip += length
            op += length
            continue
        length = ctrl >> 5
        if length == 7:
            if ip >= end:
                raise ValueError("LZF back-reference cut short")
            length += src[ip]
            ip += 1
        if ip >= end:
            raise ValueError("LZF back-reference cut short")
        ref = op - ((ctrl & 0x1F) << 8) - src[ip] - 1
        ip += 1
        length += 2
        if ref < 0:
            raise ValueError("LZF back-reference before the start of the output")
        if op + length > size:
            raise ValueError(f"LZF data decompresses to more than {size} bytes")
        distance = op - ref
        if distance >= length:
            out[op : op + length] = out[ref : ref + length]
        else:  # overlapping copy repeats the last `distance` bytes
            pattern = bytes(out[ref:op])
            out[op : op + length] = (pattern * (length // distance + 1))[:length]
        op += length
    if op != size:
        raise ValueError(f"LZF data decompresses to {op} bytes, expected {size}")
    return bytes(out)


# ----------------------------------------------------------------------------- PLY, LAS


def _read_ply(path: Path) -> tuple[np.ndarray, str | None]:
    try:
        import plyfile
    except ImportError:
        raise ImportError(f"reading {path} (PLY) needs plyfile: pip install scalr-zoo[ply]") from None
    try:
        ply = plyfile.PlyData.read(str(path))
    except (plyfile.PlyParseError, ValueError, EOFError, IndexError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: not a readable PLY file ({exc})") from None
    names = [element.name for element in ply.elements]
    if "vertex" not in names:
        raise ValueError(f"{path}: the PLY file has no 'vertex' element (it has {names})")
    vertex = ply["vertex"].data
    return _points_from_fields({name: vertex[name] for name in vertex.dtype.names}, path)


def _read_las(path: Path) -> tuple[np.ndarray, str | None]:
    try:
        import laspy
    except ImportError:
        raise ImportError(f"reading {path} (LAS/LAZ) needs laspy: pip install scalr-zoo[las]") from None
    try:
        las = laspy.read(str(path))
        xyz = np.column_stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)])
        intensity = np.asarray(las.intensity, dtype=np.float64)
    except laspy.errors.LaspyException as exc:
        message = str(exc)
        if "backend" in message.lower():
            raise ValueError(f"{path}: {message}; for .laz files install a backend: pip install scalr-zoo[las]") from None
        raise ValueError(f"{path}: not a readable LAS/LAZ file ({message})") from None
    except (ValueError, EOFError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable LAS/LAZ file ({exc})") from None
    if np.abs(xyz).max(initial=0.0) > 1e5:
        logger.warning(
            "%s: coordinates reach %.0f m; as float32 they lose centimetre precision. Subtract the "
            "scan's origin (e.g. the sensor position) before extracting features", path, np.abs(xyz).max()
        )
    return np.column_stack([xyz, intensity]).astype(np.float32), "intensity"


_READERS = {
    "kitti": _read_kitti,
    "nuscenes": _read_nuscenes,
    "pcd": _read_pcd,
    "ply": _read_ply,
    "las": _read_las,
    "npy": _read_npy,
    "npz": _read_npz,
}


# ----------------------------------------------------------------------------- writers


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path`` and rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _as_float_array(points: np.ndarray, name: str, min_columns: int) -> np.ndarray:
    if hasattr(points, "detach"):  # a torch tensor
        points = points.detach().cpu().numpy()
    array = np.asarray(points)
    if array.ndim != 2 or array.shape[1] < min_columns or array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be an (N, {min_columns}+) array of numbers, got shape {array.shape} dtype {array.dtype}")
    return array


def write_ply(path: PathLike, points: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Write a binary little-endian PLY of points, with colours if given.

    Args:
        path: the file to write (replaced atomically).
        points: ``(N, 3+)`` x, y, z[, intensity]; a 4th column is written as
            the float property ``intensity``.
        colors: ``(N, 3)`` uint8 RGB, or floats in [0, 1].

    Returns:
        ``path``.
    """
    array = _as_float_array(points, "points", 3)
    n = array.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if array.shape[1] >= 4:
        fields.append(("intensity", "<f4"))
    if colors is not None:
        colors = _as_uint8_colors(colors, n)
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    records = np.empty(n, dtype=fields)
    for i, axis in enumerate("xyz"):
        records[axis] = array[:, i]
    if array.shape[1] >= 4:
        records["intensity"] = array[:, 3]
    if colors is not None:
        records["red"], records["green"], records["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
    ply_types = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment written by scalr-zoo", f"element vertex {n}"]
    header += [f"property {ply_types[kind]} {name}" for name, kind in fields]
    header.append("end_header")
    with atomic_write(path) as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        handle.write(records.tobytes())
    return Path(path)


def write_bin(path: PathLike, points: np.ndarray) -> Path:
    """Write a KITTI-style ``.bin`` (float32 x, y, z, intensity per point), atomically."""
    array = _as_float_array(points, "points", 4)
    with atomic_write(path) as handle:
        handle.write(np.ascontiguousarray(array[:, :4], dtype="<f4").tobytes())
    return Path(path)


def _as_uint8_colors(colors: np.ndarray, n: int) -> np.ndarray:
    """``(N, 3)`` uint8 from uint8 or from floats in [0, 1]."""
    if hasattr(colors, "detach"):
        colors = colors.detach().cpu().numpy()
    colors = np.asarray(colors)
    if colors.shape != (n, 3):
        raise ValueError(f"colors must have shape ({n}, 3), got {colors.shape}")
    if colors.dtype == np.uint8:
        return colors
    if colors.dtype.kind == "f":
        return (np.clip(np.nan_to_num(colors, nan=0.5), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"colors must be uint8 (0-255) or floats in [0, 1], got dtype {colors.dtype}")
