"""``scalr_zoo.load``: one call from a weights source to a ready model."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .archive import extract_checkpoint
from .config import ModelConfig, apply_overrides
from .convert import read_original_checkpoint
from .hub import HUB_PREFIX, download
from .model import WaffleIron
from .registry import entry_for_archive, find_entry, model_info

__all__ = [
    "load",
    "create_model",
    "default_device",
    "load_state_dict_strict",
    "model_from_state_dict",
    "load_model_dir",
]

#: File name endings of release archives, loaded like the registry's downloads.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_config(config: ModelConfig | Mapping[str, Any] | str | None) -> ModelConfig | None:
    if config is None or isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return ModelConfig.from_dict(config)
    if isinstance(config, str):
        return model_info(config).model_config()
    raise ValueError(
        f"config must be a ModelConfig, a mapping or a registry name, got {type(config).__name__}"
    )


def create_model(config: ModelConfig | Mapping[str, Any], **overrides: Any) -> WaffleIron:
    """A randomly initialised network of the given configuration (eval mode)."""
    config = _as_config(config)
    if overrides:
        config = apply_overrides(config, overrides)
    return WaffleIron(config).eval()


def load_state_dict_strict(
    model: WaffleIron, state_dict: Mapping[str, torch.Tensor], source: str, *, assign: bool = False
) -> None:
    """Load weights, failing with a readable message on missing, unexpected or mis-shaped keys.

    ``assign=True`` makes the tensors of ``state_dict`` the model's own (for a
    model built on the meta device)."""
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
    model.load_state_dict(state_dict, strict=True, assign=assign)


def model_from_state_dict(
    config: ModelConfig, state_dict: Mapping[str, torch.Tensor], source: str, device: torch.device | str | None = None
) -> WaffleIron:
    """A model holding exactly these weights (float32), in eval mode on ``device``.

    The network is built on the meta device and the tensors are assigned, so
    no memory or time goes into a random initialisation first.

    Raises:
        ValueError: the weights do not fit ``config`` (names what differs).
    """
    with torch.device("meta"):
        model = WaffleIron(config)
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    load_state_dict_strict(model, weights, source, assign=True)
    target = torch.device(device) if device is not None else default_device()
    return model.to(target).eval()


def load_model_dir(
    path: str | os.PathLike, *, device: torch.device | str | None = None, source: str | None = None, **overrides: Any
) -> WaffleIron:
    """Load a directory written by :meth:`WaffleIron.save_pretrained` (``model.safetensors`` + ``config.json``).

    Args:
        path: the directory.
        device: where the model goes; default CUDA when available, else CPU.
        source: how to name the model in messages (default: the path).
        **overrides: config fields to replace.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    source = source or str(path)
    missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a saved model directory: no {' or '.join(missing)} "
            "(expected the files written by model.save_pretrained)"
        )
    try:
        config = ModelConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ValueError(f"{path / 'config.json'} is not a scalr-zoo model config: {exc}") from exc
    if overrides:
        config = apply_overrides(config, overrides)
    target = torch.device(device) if device is not None else default_device()
    try:
        state_dict = load_file(path / "model.safetensors", device=str(target))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {path / 'model.safetensors'}: {exc}") from exc
    model = model_from_state_dict(config, state_dict, source, target)
    logger.info("loaded %s (width %d, depth %d) on %s", source, config.arch.width, config.arch.depth, target)
    return model


def _load_archive(path: Path, config: ModelConfig | None, device: torch.device, overrides: Mapping[str, Any]) -> WaffleIron:
    """A local release archive: its checkpoint, extracted safely into a temporary directory."""
    if config is None:
        entry = entry_for_archive(path.name)
        if entry is None:
            raise ValueError(
                f"{path.name} is not the file name of a registered release archive; pass config= "
                "(a registry name, a ModelConfig or a mapping) to say which network it holds"
            )
        config = entry.model_config()
    if overrides:
        config = apply_overrides(config, overrides)
    with tempfile.TemporaryDirectory(prefix="scalr_zoo-") as tmp:
        checkpoint = extract_checkpoint(path, Path(tmp) / "checkpoint.pth")
        state_dict = read_original_checkpoint(checkpoint)
    return model_from_state_dict(config, state_dict, str(path), device)


def load(
    source: str | os.PathLike,
    *,
    config: ModelConfig | Mapping[str, Any] | str | None = None,
    device: torch.device | str | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    **overrides: Any,
) -> WaffleIron:
    """Load a WaffleIron / ScaLR model, ready for :meth:`WaffleIron.extract`.

    Args:
        source: one of

            * a registry name or alias (``"waffleiron-dinov2-L"``, see
              :func:`scalr_zoo.list_models`): from the Hub if the manifest has a
              Hub copy, else from the original release archive, downloaded,
              verified, converted and cached once;
            * ``"hf-hub:owner/repo"`` or ``"hf-hub:owner/repo@revision"``;
            * a directory written by :meth:`WaffleIron.save_pretrained`;
            * an original checkpoint file (``.pth``), with ``config=``;
            * an original release archive (``.tar.gz``), with ``config=`` or
              under its original file name (its registry entry gives the config).

            An existing local path takes precedence over a registry name.
        config: for a bare checkpoint or archive: a :class:`ModelConfig`, a
            mapping (flat keys ``width, depth, head, hidden, out, norm, act,
            fov, grids, mean, std, voxel_size, num_neighbors``, or the nested
            ``config.json`` form) or a registry name whose config applies.
        device: where the model goes; default CUDA when available, else CPU.
        local_files_only: make no network request (as ``HF_HUB_OFFLINE=1``):
            load from the cache or fail saying what to download.
        revision: Hub branch, tag or commit (Hub sources only).
        force_download: download (and convert) again even if cached.
        token: Hugging Face token for private or gated repositories.
        **overrides: config fields to replace (see
            :func:`scalr_zoo.config.apply_overrides`), e.g. ``sensor="semantickitti"``.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        FileNotFoundError: a path that does not exist (or a ``NotCachedError``
            / ``SourceNotFoundError`` from the download).
        UnknownModelError: neither a path nor a registered name.
        ValueError: no config for a bare checkpoint, or weights that do not fit it.
        IntegrityError: a downloaded or cached file failed its sha256 check.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a string or a path, got {type(source).__name__}")
    text = os.fspath(source)
    path = Path(text)
    target = torch.device(device) if device is not None else default_device()
    if text.startswith(HUB_PREFIX) or (not path.exists() and find_entry(text) is not None):
        if config is not None:
            raise ValueError(f"{text} brings its own config.json; give config fields as keyword overrides instead of config=")
        folder = download(
            text, revision=revision, local_files_only=local_files_only, force_download=force_download, token=token
        )
        return load_model_dir(folder, device=target, source=text, **overrides)
    if revision is not None:
        raise ValueError("revision= applies only to hf-hub: sources and registry names with a Hub copy")
    if not path.exists():
        if path.suffix or os.sep in text or "/" in text:
            raise FileNotFoundError(f"{text} is not a file or directory")
        model_info(text)  # raises UnknownModelError suggesting close names
    if path.is_dir():
        if config is not None:
            raise ValueError(f"{text} brings its own config.json; give config fields as keyword overrides instead of config=")
        return load_model_dir(path, device=target, **overrides)
    if path.name.endswith(ARCHIVE_SUFFIXES):
        return _load_archive(path, _as_config(config), target, overrides)
    if path.suffix not in (".pth", ".pt", ".tar"):
        raise ValueError(
            f"{text}: expected an original checkpoint (.pth), a release archive (.tar.gz) "
            "or a directory written by save_pretrained"
        )
    config = _as_config(config)
    if config is None:
        raise ValueError(
            f"{text} is a bare checkpoint with no architecture or preprocessing; pass config= "
            "(a registry name such as 'waffleiron-dinov2-L', or keys width, depth, head, out, norm, act, fov, grids, mean, std, ...)"
        )
    if overrides:
        config = apply_overrides(config, overrides)
    model = model_from_state_dict(config, read_original_checkpoint(path), text, target)
    logger.info("loaded %s (%s, width %d, depth %d) on %s", text, config.arch.head, config.arch.width, config.arch.depth, target)
    return model
