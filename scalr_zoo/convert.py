"""Reading the original training checkpoints.

The released ``.pth`` files are ``torch.save``d training states. They are read
with ``torch.load(weights_only=True)`` (never a full unpickle), allowing only
numpy's scalar reconstruction and float dtypes, which the original learning
rate schedules left in the optimiser state. This module is the only place in
the package that reads a pickle.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

__all__ = ["read_original_checkpoint", "strip_module_prefix", "STATE_DICT_KEYS"]

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
