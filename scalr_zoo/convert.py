"""Reading the original training checkpoints and converting them to Hub-ready folders.

The released ``.pth`` files are ``torch.save``d training states. They are read
with ``torch.load(weights_only=True)`` (never a full unpickle), allowing only
numpy's scalar reconstruction and float dtypes, which the original learning
rate schedules left in the optimiser state. This module is the only place in
the package that reads a pickle.

Conversion writes what :meth:`WaffleIron.save_pretrained` writes
(``model.safetensors``, ``config.json``, ``README.md``). Maintainers convert
every release archive into Hub-ready folders with :func:`main`::

    python tools/convert_releases.py --all OUT_DIR     # or NAME... OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .config import ModelConfig

__all__ = [
    "read_original_checkpoint",
    "strip_module_prefix",
    "STATE_DICT_KEYS",
    "convert_checkpoint",
    "convert_archive",
    "convert_registered",
]

logger = logging.getLogger(__name__)

#: Where the state dict sits in an original checkpoint, in the order tried.
STATE_DICT_KEYS = ("model_point", "model_points", "net")


def _numpy_safe_globals() -> list:
    """numpy scalar reconstruction (under both its numpy 1 and numpy 2 paths) and float dtypes."""
    from numpy._core.multiarray import scalar  # numpy >= 2

    allowed: list = [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),  # pickles written by numpy 1.x
        np.dtype,
    ]
    for name in ("Float16DType", "Float32DType", "Float64DType", "LongDoubleDType"):
        dtype_cls = getattr(np.dtypes, name, None)
        if dtype_cls is not None:
            allowed.append(dtype_cls)
    return allowed


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DistributedDataParallel put on every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def read_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network state dict of an original ScaLR / WaffleIron checkpoint.

    Args:
        path: a ``.pth`` file written by the original training code.

    Returns:
        The state dict, ``module.`` stripped, on the CPU. Training state
        (optimiser, scheduler, epoch, scaler) is ignored.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint, holds objects other
            than tensors and numpy scalars, or has no state dict under
            ``model_point``, ``model_points`` or ``net``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise ValueError(
            f"could not read {path} as a checkpoint with torch.load(weights_only=True): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            "Is it an original ScaLR/WaffleIron .pth file, complete and not corrupted?"
        ) from exc
    if isinstance(checkpoint, Mapping):
        for key in STATE_DICT_KEYS:
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                logger.debug("state dict of %s found under %r", path, key)
                return strip_module_prefix(checkpoint[key])
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return strip_module_prefix(checkpoint)
    found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(
        f"{path} holds no state dict under any of {STATE_DICT_KEYS} (found {found}); "
        "is it a ScaLR/WaffleIron checkpoint?"
    )


def convert_checkpoint(
    checkpoint: str | os.PathLike, config: ModelConfig, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Convert an original checkpoint into a Hub-ready folder.

    The weights are checked strictly against ``config`` and written with
    :meth:`WaffleIron.save_pretrained` (``model.safetensors``, ``config.json``,
    ``README.md``) into a temporary sibling directory that is then renamed to
    ``out_dir``, so ``out_dir`` never holds a partial conversion.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: an unreadable checkpoint or weights that do not fit ``config``.
    """
    from .loading import model_from_state_dict  # loading imports this module

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    model = model_from_state_dict(config, read_original_checkpoint(checkpoint), str(checkpoint), "cpu")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        model.save_pretrained(partial)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("converted %s into %s", checkpoint, out_dir)
    return out_dir


def convert_archive(
    archive: str | os.PathLike, config: ModelConfig, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Convert an original release archive (``.tar.gz``) into a Hub-ready folder.

    The archive is checked for unsafe members and its checkpoint extracted
    (:func:`scalr_zoo.archive.extract_checkpoint`) into a temporary directory
    next to ``out_dir``, then converted by :func:`convert_checkpoint`.
    """
    from .archive import extract_checkpoint

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.extract.") as tmp:
        checkpoint = extract_checkpoint(archive, Path(tmp) / "checkpoint.pth")
        return convert_checkpoint(checkpoint, config, out_dir, overwrite=overwrite)


def convert_registered(
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    keep_archives: bool = False,
    local_files_only: bool = False,
) -> dict[str, dict[str, str]]:
    """Convert the release archives of registered models into ``out_dir/<name>/`` Hub-ready folders.

    Each archive is downloaded into the cache (or taken from it), checked,
    converted and, unless ``keep_archives``, deleted again.

    Args:
        out_dir: parent of the per-model folders.
        names: registry names or aliases; default every entry with an archive.
        overwrite: replace existing folders (else they are skipped).
        keep_archives: keep the downloaded archives in the cache.
        local_files_only: use only archives already in the cache.

    Returns:
        name -> {file name: sha256} of the written folders, ready for the
        ``hub.files`` of a manifest entry once the folder is uploaded.
    """
    from .hub import download_archive, sha256_file
    from .registry import iter_entries

    out_dir = Path(out_dir)
    hashes: dict[str, dict[str, str]] = {}
    entries = [e for e in iter_entries(names) if e.archive_url is not None]
    for entry in entries:
        folder = out_dir / entry.name
        if folder.exists() and not overwrite:
            logger.info("%s exists; skipped (overwrite=True replaces it)", folder)
        else:
            archive = download_archive(entry, local_files_only=local_files_only)
            convert_archive(archive, entry.model_config(), folder, overwrite=overwrite)
            if not keep_archives:
                archive.unlink(missing_ok=True)
        hashes[entry.name] = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return hashes


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: release archives -> Hub-ready folders (``tools/convert_releases.py``)."""
    parser = argparse.ArgumentParser(
        prog="convert_releases",
        description="Convert original WaffleIron/ScaLR release archives into Hub-ready folders "
        "(model.safetensors, config.json, README.md) and print the sha256 of their files.",
    )
    parser.add_argument("names", nargs="*", help="registry names or aliases (or use --all)")
    parser.add_argument("out_dir", help="parent directory of the per-model folders")
    parser.add_argument("--all", action="store_true", help="convert every registered archive")
    parser.add_argument("--overwrite", action="store_true", help="replace existing folders")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives in the cache")
    parser.add_argument("--offline", action="store_true", help="use only archives already in the cache")
    args = parser.parse_args(argv)
    if args.all == bool(args.names):
        parser.error("give registry names or --all (not both)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hashes = convert_registered(
        args.out_dir,
        None if args.all else args.names,
        overwrite=args.overwrite,
        keep_archives=args.keep_archives,
        local_files_only=args.offline,
    )
    json.dump(hashes, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
