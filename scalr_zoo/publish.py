"""Saving and publishing models: the files of ``save_pretrained`` and the model card.

A saved model directory (and a scalr-zoo Hub repository) holds

* ``model.safetensors``: the state dict, original key names (``embed.*``,
  ``waffleiron.*``, ``classif.*``), float32;
* ``config.json``: :meth:`ModelConfig.to_dict` (architecture, preprocessing,
  classes, name, meta);
* ``README.md``: a model card with Hub metadata (library, licence, tags,
  datasets) and what the weights are.

:class:`~scalr_zoo.model.WaffleIron` gets ``save_pretrained``,
``push_to_hub`` and ``from_pretrained`` from huggingface_hub's
``PyTorchModelHubMixin``; the methods here are what it delegates to.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .model import WaffleIron

__all__ = ["write_model_files", "model_card", "from_pretrained", "LIBRARY_NAME"]

LIBRARY_NAME = "scalr-zoo"
_HEAD_DESCRIPTIONS = {
    "none": "none (backbone features only)",
    "linear": "linear (Conv1d), {out} outputs",
    "mlp": "MLP (Conv1d, ReLU, Conv1d; hidden {hidden}), {out} outputs",
    "bn_linear": "BatchNorm1d + linear, {out} outputs",
}


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(temporary_path)`` then rename the result to ``path``."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    os.close(handle)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def write_model_files(model: "WaffleIron", directory: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``config.json`` of ``model`` into ``directory`` (each atomically)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    _write_atomic(directory / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    text = json.dumps(model.config.to_dict(), indent=2) + "\n"
    _write_atomic(directory / "config.json", lambda p: Path(p).write_text(text, encoding="utf-8"))


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def model_card(config: ModelConfig, repo_id: str | None = None) -> ModelCard:
    """The ``README.md`` of a saved model: Hub metadata and a description of ``config``.

    Args:
        config: the model's configuration (its ``meta`` fills licence, paper,
            datasets, mIoU and source when known).
        repo_id: the Hub repository, for the usage snippet.
    """
    meta = config.meta
    arch, pre = config.arch, config.preprocess
    tags = ["lidar", "point-cloud", "waffleiron", "feature-extraction"]
    if meta.get("family"):
        tags.append(str(meta["family"]))
    if meta.get("teacher"):
        tags += ["distillation", str(meta["teacher"])]
    if config.classes:
        tags.append("semantic-segmentation")
    datasets = [meta["dataset"]] if meta.get("dataset") else list(meta.get("pretraining_datasets") or [])
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=meta.get("license"),
        tags=tags,
        datasets=datasets or None,
        pipeline_tag="feature-extraction",
    )
    title = config.name or f"WaffleIron WI-{arch.depth}-{arch.width}"
    source = f"hf-hub:{repo_id}" if repo_id else (config.name or "path/to/this/folder")
    intensity = (
        f"`{pre.sensor}` preset" if pre.sensor else "custom"
    ) + f" (mean {pre.intensity_mean:g}, std {pre.intensity_std:g})"
    rows = [
        ("network", f"WaffleIron, width {arch.width}, depth {arch.depth}, {arch.norm}, {arch.act}"),
        ("head", _HEAD_DESCRIPTIONS[arch.head].format(out=arch.out, hidden=arch.hidden)),
        ("field of view (m)", f"{_fmt(pre.fov_min)} to {_fmt(pre.fov_max)}"),
        ("grids", ", ".join(f"{r}x{c}" for r, c in pre.grids)),
        ("voxel size / neighbours", f"{pre.voxel_size:g} m / {pre.num_neighbors}"),
        ("intensity normalisation", intensity),
    ]
    if meta.get("sensors"):
        rows.append(("training sensors", ", ".join(meta["sensors"])))
    if meta.get("task"):
        rows.append(("task", str(meta["task"]) + (f" on {meta['dataset']}" if meta.get("dataset") else "")))
    if meta.get("data_fraction") is not None:
        rows.append(("labels used", f"{100 * float(meta['data_fraction']):g}% of the training set"))
    if meta.get("miou") is not None:
        rows.append(("reported mIoU", f"{meta['miou']}%"))
    if config.classes:
        rows.append(("classes", ", ".join(config.classes)))
    if meta.get("archive_url"):
        rows.append(("converted from", meta["archive_url"]))
    if meta.get("paper"):
        rows.append(("paper", meta["paper"]))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    body = f"""
# {title}

{meta.get("description", "A WaffleIron lidar point-cloud network.")}

| | |
|---|---|
{table}

## Usage

```python
import scalr_zoo

model = scalr_zoo.load("{source}")
features = model.extract(points)   # points: (N, 4) x, y, z, intensity -> (N, {arch.width}) float32
```

Weights in `model.safetensors` (original parameter names), configuration
(architecture, preprocessing, classes) in `config.json`, written by scalr-zoo.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def from_pretrained(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    token: str | bool | None = None,
    device: "torch.device | str | None" = None,
    **overrides: Any,
) -> "WaffleIron":
    """``WaffleIron.from_pretrained``: like :func:`scalr_zoo.load`, and a bare ``owner/repo``
    (neither a local path nor a registry name) means that Hub repository."""
    from .hub import HUB_PREFIX
    from .loading import load
    from .registry import find_entry

    text = os.fspath(source)
    if not text.startswith(HUB_PREFIX) and not Path(text).exists() and find_entry(text) is None and text.count("/") == 1:
        text = HUB_PREFIX + text
    return load(
        text,
        device=device,
        local_files_only=local_files_only,
        revision=revision,
        force_download=force_download,
        token=token,
        **overrides,
    )
