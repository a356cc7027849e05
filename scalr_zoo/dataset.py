"""Feature extraction over whole datasets, on one process or many (torchrun).

``extract_dataset`` reads every scan below an input folder, extracts its
features and writes ``OUT/<relative folder>/STEM.npy`` ((N, C) float32, one
row per input point) atomically. DataLoader workers read and preprocess
scans while the model runs. Existing outputs are skipped, so an interrupted
run is resumed by running it again.

Under ``torchrun --nproc_per_node=N -m scalr_zoo extract-dataset ...`` every
rank takes the scans ``rank, rank + N, ...`` of the sorted list, writes its
own outputs, and rank 0 writes ``index.json`` (inputs, shapes, model name,
config hash) after a barrier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import PreprocessConfig
from .extract import PreparedPoints, _inference, _preprocess_config, _resolve_dtype, prepare_points, run_prepared
from .io import SCAN_SUFFIXES, atomic_write, read_points, scan_stem
from .model import WaffleIron

__all__ = ["DatasetExtraction", "extract_dataset", "list_scans", "distributed_context", "INDEX_NAME"]

logger = logging.getLogger(__name__)

#: Name of the index file written at the root of the output folder.
INDEX_NAME = "index.json"


def list_scans(input_dir: str | os.PathLike, suffixes: Sequence[str] = SCAN_SUFFIXES) -> list[Path]:
    """Every scan file below ``input_dir``, sorted by relative path (the same on every rank)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    scans = [p for p in root.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)) and not p.name.startswith(".")]
    return sorted(scans, key=lambda p: p.relative_to(root).as_posix())


def output_path(input_dir: Path, output_dir: Path, scan: Path) -> Path:
    """``OUT/<folder of the scan relative to IN>/STEM.npy``."""
    relative = scan.relative_to(input_dir)
    return output_dir / relative.parent / f"{scan_stem(scan)}.npy"


def config_hash(model: WaffleIron, preprocess: PreprocessConfig, head: bool, dtype: Any) -> str:
    """sha256 of everything that determines the features: config, options and weights."""
    digest = hashlib.sha256()
    config = dataclasses.replace(model.config, preprocess=preprocess, meta={}).to_dict()
    digest.update(json.dumps({"config": config, "head": head, "dtype": str(dtype)}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class DatasetExtraction:
    """What one rank did.

    Attributes:
        written: outputs this rank wrote.
        skipped: outputs that already existed.
        failed: scan path -> error message, for scans that could not be read or prepared.
        index: the index file (on rank 0), else None.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    index: Path | None = None


class _ScanDataset(Dataset):
    """Reads and preprocesses scans (on the CPU, in DataLoader workers)."""

    def __init__(self, scans: Sequence[Path], config: PreprocessConfig, dim_proj: Sequence[int], drop_nonfinite: bool):
        self.scans = list(scans)
        self.config = config
        self.dim_proj = tuple(dim_proj)
        self.drop_nonfinite = drop_nonfinite

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> tuple[int, PreparedPoints | str]:
        path = self.scans[index]
        try:
            points = read_points(path)
            prepared = prepare_points(
                points, self.config, self.dim_proj, name=str(path), device=torch.device("cpu"),
                drop_nonfinite=self.drop_nonfinite,
            )
        except (ValueError, OSError, ImportError) as exc:
            return index, f"{type(exc).__name__}: {exc}"
        return index, prepared


def _collate(items: list) -> list:
    return items


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and device of this process."""

    rank: int
    world_size: int
    device: torch.device
    initialised_here: bool

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def distributed_context(device: str | torch.device | None = None) -> DistributedContext:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1).

    The backend is NCCL with one GPU per local rank when CUDA is available,
    else gloo on the CPU. Without torchrun: rank 0 of 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if world_size <= 1:
        target = torch.device(device) if device is not None else torch.device("cuda" if use_cuda else "cpu")
        return DistributedContext(0, 1, target, False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    initialised_here = False
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(target)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialised_here = True
    return DistributedContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), target, initialised_here)


def _write_index(
    input_dir: Path, output_dir: Path, scans: Sequence[Path], model: WaffleIron, model_name: str | None,
    digest: str, failed: dict[str, str],
) -> Path:
    entries = []
    for scan in scans:
        target = output_path(input_dir, output_dir, scan)
        if target.exists():
            shape = list(np.load(target, mmap_mode="r").shape)
            entries.append({"input": scan.relative_to(input_dir).as_posix(),
                            "output": target.relative_to(output_dir).as_posix(), "shape": shape})
    index = {
        "model": model_name or model.config.name,
        "config_hash": digest,
        "num_features": entries[0]["shape"][1] if entries else None,
        "num_scans": len(scans),
        "complete": len(entries) == len(scans),
        "scans": entries,
        "failed": dict(sorted(failed.items())),
    }
    path = output_dir / INDEX_NAME
    text = json.dumps(index, indent=1) + "\n"
    if not path.exists() or path.read_text() != text:  # a rerun that changes nothing writes nothing
        with atomic_write(path, "w") as handle:
            handle.write(text)
    return path


def _gather_failures(failed: dict[str, str], world_size: int) -> dict[str, str]:
    if world_size <= 1:
        return failed
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, failed)
    merged: dict[str, str] = {}
    for part in gathered:
        merged.update(part)
    return merged


def extract_dataset(
    model: WaffleIron,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    batch_size: int = 4,
    num_workers: int = 2,
    sensor: str | Sequence[float] | None = None,
    dtype: torch.dtype | str | None = None,
    head: bool = False,
    drop_nonfinite: bool = False,
    context: DistributedContext | None = None,
    progress: bool = True,
) -> DatasetExtraction:
    """Extract and save the features of every scan below ``input_dir``.

    Args:
        model: the network, on the device this rank should use.
        input_dir: folder searched recursively for scans (see :data:`SCAN_SUFFIXES`).
        output_dir: where ``STEM.npy`` files ((N, C) float32) and the index go.
        model_name: recorded in the index (default: ``model.config.name``).
        batch_size: scans per forward pass.
        num_workers: DataLoader worker processes reading and preprocessing.
        sensor, dtype, head, drop_nonfinite: as for :meth:`WaffleIron.extract`.
        context: rank / world size (default: from the torchrun environment).
        progress: show a progress bar (rank 0).

    Returns:
        What this rank wrote, skipped and failed on; the index path on rank 0.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    context = context or DistributedContext(0, 1, model.device, False)
    preprocess = _preprocess_config(model, sensor, None, None)
    autocast_dtype = _resolve_dtype(dtype)
    digest = config_hash(model, preprocess, head, autocast_dtype)
    scans = list_scans(input_dir)
    if not scans:
        raise ValueError(f"no scans ({', '.join(SCAN_SUFFIXES)}) found below {input_dir}")
    mine = scans[context.rank :: context.world_size]
    result = DatasetExtraction()
    todo = []
    for scan in mine:
        target = output_path(input_dir, output_dir, scan)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed run of this rank's share
            stale.unlink(missing_ok=True)
        (result.skipped if target.exists() else todo).append(scan)
    logger.info("rank %d/%d: %d scans, %d already done", context.rank, context.world_size, len(mine), len(result.skipped))

    if todo:
        dataset = _ScanDataset(todo, preprocess, model.config.arch.dim_proj, drop_nonfinite)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"extract (rank {context.rank})", unit="scan",
                   disable=not progress or context.rank != 0)
        with _inference(model):
            for batch in loader:
                ready = [(i, item) for i, item in batch if not isinstance(item, str)]
                for i, message in ((i, item) for i, item in batch if isinstance(item, str)):
                    logger.error("%s: %s", todo[i], message)
                    result.failed[todo[i].relative_to(input_dir).as_posix()] = message
                if ready:
                    moved = [item.to(context.device) for _, item in ready]
                    outputs = run_prepared(model, moved, preprocess.grids, head=head, autocast_dtype=autocast_dtype)
                    for (i, _), (rows, _mask) in zip(ready, outputs):
                        target = output_path(input_dir, output_dir, todo[i])
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_write(target) as handle:
                            np.save(handle, rows.cpu().numpy())
                        result.written.append(target)
                bar.update(len(batch))
        bar.close()

    context.barrier()
    failed = _gather_failures(result.failed, context.world_size)
    if context.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        result.index = _write_index(input_dir, output_dir, scans, model, model_name, digest, failed)
    context.barrier()
    return result
