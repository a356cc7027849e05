"""``scalr_zoo.load``: one call from a weights source to a ready model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig, apply_overrides
from .convert import read_original_checkpoint
from .model import WaffleIron

__all__ = ["load", "create_model", "default_device", "load_state_dict_strict"]

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_config(config: ModelConfig | Mapping[str, Any] | None) -> ModelConfig | None:
    if config is None or isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return ModelConfig.from_dict(config)
    raise ValueError(f"config must be a ModelConfig or a mapping, got {type(config).__name__}")


def create_model(config: ModelConfig | Mapping[str, Any], **overrides: Any) -> WaffleIron:
    """A randomly initialised network of the given configuration (eval mode)."""
    config = _as_config(config)
    if overrides:
        config = apply_overrides(config, overrides)
    return WaffleIron(config).eval()


def load_state_dict_strict(model: WaffleIron, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights, failing with a readable message on missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape (e.g. {mismatched[:2]})")
        raise ValueError(
            f"the weights of {source} do not fit the configured architecture: {'; '.join(parts)}. "
            "Check width, depth, norm and head in the config."
        )
    model.load_state_dict(state_dict, strict=True)


def load(
    source: str | os.PathLike,
    *,
    config: ModelConfig | Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> WaffleIron:
    """Load a WaffleIron / ScaLR model, ready for :meth:`WaffleIron.extract`.

    Args:
        source: an original checkpoint file (``.pth``) as written by the
            ScaLR / WaffleIron training code.
        config: the architecture and preprocessing, a :class:`ModelConfig` or
            a mapping (flat keys ``width, depth, head, hidden, out, norm, act,
            fov, grids, mean, std, voxel_size, num_neighbors``, or the nested
            ``config.json`` form).
        device: where the model goes; default CUDA when available, else CPU.
        **overrides: config fields to replace (see
            :func:`scalr_zoo.config.apply_overrides`), e.g. ``sensor="nuscenes"``.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no config for a bare checkpoint, or weights that do not fit it.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source!s} is not a file or directory")
    if path.is_dir() or path.suffix not in (".pth", ".pt", ".tar") or path.name.endswith(".tar.gz"):
        raise ValueError(f"{source!s}: expected an original checkpoint file (.pth)")
    config = _as_config(config)
    if config is None:
        raise ValueError(
            f"{source!s} is a bare checkpoint with no architecture or preprocessing; "
            "pass config= (keys width, depth, head, out, norm, act, fov, grids, mean, std, ...)"
        )
    if overrides:
        config = apply_overrides(config, overrides)
    state_dict = read_original_checkpoint(path)
    model = WaffleIron(config)
    load_state_dict_strict(model, state_dict, str(source))
    target = torch.device(device) if device is not None else default_device()
    logger.info("loaded %s (%s, width %d, depth %d) on %s", source, config.arch.head, config.arch.width, config.arch.depth, target)
    return model.to(target).eval()
