"""Linear probing and fine-tuning on a folder of labelled scans.

>>> model = scalr_zoo.load(...)                                   # doctest: +SKIP
>>> result = scalr_zoo.linear_probe(model, "train/", val_dir="val/", classes=names)  # doctest: +SKIP
>>> print(result.scores.table())                                 # doctest: +SKIP

:func:`fit` (and its two shorthands :func:`linear_probe`, :func:`finetune`)
puts a fresh BatchNorm1d + linear class head on the model, trains on packed
batches of scans with cross-entropy (+ Lovász-softmax) computed on the kept
points, and scores every labelled input point of the validation folder
(per-class IoU, mIoU). The data layout is described in
:mod:`scalr_zoo.labelled_scans`.

Defaults follow the original ScaLR downstream recipe (configs
``configs/downstream/*/WI_768_{linprob,finetune_100p}.yaml`` and
``finetune.py`` of valeoai/ScaLR), see :data:`RECIPES`:

- AdamW, a per-iteration schedule with linear warm-up then cosine decay to
  ``min_lr``, batches of 8 scans, loss = cross-entropy + 1.0 x Lovász-softmax,
  ignored label 255.
- Linear probing: backbone frozen and in eval mode, lr 1e-3, weight decay
  3e-3 on every trainable parameter (one group), 20 epochs, 2 of warm-up,
  ``min_lr`` 1e-5, no drop-path.
- Fine-tuning: lr 2e-3, weight decay 0, layer-wise lr decay 0.99 (see
  :func:`layer_decay_param_groups`), 25 epochs, 2 of warm-up, ``min_lr`` 0,
  drop-path 0.2 on every layer (uniform).
- Augmentations: random rotation about z, random flips of x and y, random
  scaling of the coordinates by up to +-10 %.

Not reproduced: the recipe's random crop to 20,000 points per scan and
distributed training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import PreprocessConfig
from .extract import _inference, _preprocess_config, _resolve_dtype, as_points_tensor
from .labelled_scans import DEFAULT_IGNORE_INDEX, LabelledScan, find_labelled_scans, read_labelled_scan
from .losses import segmentation_loss
from .metrics import SegmentationScores, confusion_matrix
from .model import PackedInput, WaffleIron
from .preprocess import PreparedCloud, pack_clouds, prepare_cloud

__all__ = [
    "TrainRecipe",
    "RECIPES",
    "EpochLog",
    "TrainResult",
    "layer_decay_param_groups",
    "fit",
    "linear_probe",
    "finetune",
    "evaluate",
]

logger = logging.getLogger(__name__)

MODES = ("linear_probe", "finetune")


@dataclass(frozen=True)
class TrainRecipe:
    """Default hyper-parameters of one training mode (see the module docstring)."""

    epochs: int
    lr: float
    weight_decay: float
    layer_decay: float | None
    warmup_epochs: float
    min_lr: float
    drop_path_rate: float
    lovasz_weight: float = 1.0
    batch_size: int = 8


#: The original recipe's values per mode.
RECIPES: dict[str, TrainRecipe] = {
    "linear_probe": TrainRecipe(
        epochs=20, lr=1e-3, weight_decay=3e-3, layer_decay=None, warmup_epochs=2, min_lr=1e-5, drop_path_rate=0.0
    ),
    "finetune": TrainRecipe(
        epochs=25, lr=2e-3, weight_decay=0.0, layer_decay=0.99, warmup_epochs=2, min_lr=0.0, drop_path_rate=0.2
    ),
}


@dataclass
class EpochLog:
    """One training epoch: mean loss, last learning rate (of the head), mIoU on the kept training points."""

    epoch: int
    loss: float
    lr: float
    train_miou: float


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        mode: ``"linear_probe"`` or ``"finetune"``.
        scores: IoU / mIoU / accuracy on every labelled input point of the
            evaluation folder.
        evaluated_on: ``"val"`` (``val_dir``) or ``"train"`` (no ``val_dir`` given).
        history: one :class:`EpochLog` per epoch.
    """

    mode: str
    scores: SegmentationScores
    evaluated_on: str
    history: list[EpochLog] = field(default_factory=list)

    @property
    def miou(self) -> float:
        return self.scores.miou

    @property
    def iou(self) -> dict[str, float]:
        """Per-class IoU by class name (NaN for a class neither present nor predicted)."""
        return dict(zip(self.scores.classes, self.scores.iou.tolist()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {
            "mode": self.mode,
            "evaluated_on": self.evaluated_on,
            "scores": self.scores.to_dict(),
            "history": [dataclasses.asdict(h) for h in self.history],
        }


def _layer_id(name: str, depth: int) -> int:
    """Layer of a parameter in the lr decay: embedding 0, backbone layer d -> d+1, anything else (head) L+1."""
    if name.startswith("embed."):
        return 0
    for prefix in ("waffleiron.spatial_mix.", "waffleiron.channel_mix."):
        if name.startswith(prefix):
            return int(name[len(prefix) :].split(".", 1)[0]) + 1
    return depth + 1


def layer_decay_param_groups(
    model: WaffleIron,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with layer-wise learning-rate decay, as the ScaLR recipe builds them.

    Facts followed from the original ``finetune.py`` (BEiT-style):

    - layer ids: every ``embed.*`` parameter is layer 0, both mixes of backbone
      layer d (``waffleiron.spatial_mix.d.*``, ``waffleiron.channel_mix.d.*``)
      are layer d+1, every other parameter (the head) is layer L+1;
    - lr of layer i = ``lr * layer_decay ** (L + 1 - i)``: the head gets
      ``lr``, the last backbone layer ``lr * layer_decay``, the embedding
      ``lr * layer_decay ** (L + 1)``;
    - no weight decay on 1-D parameters (biases, norm weights; the LayerScale
      weights are ``(C, 1, 1)`` and keep it) nor on names in ``no_weight_decay``;
    - parameters that do not require gradients are left out.

    Returns:
        Groups ``{"params", "lr", "weight_decay", "lr_scale", "name"}``, named
        ``layer_{i}_{decay|no_decay}``, ready for ``torch.optim.AdamW``.
    """
    depth = len(model.waffleiron.spatial_mix)
    skip = set(no_weight_decay)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim == 1 or name in skip)
        layer = _layer_id(name, depth)
        key = f"layer_{layer}_{'decay' if decays else 'no_decay'}"
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {
                "name": key,
                "params": [],
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": weight_decay if decays else 0.0,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


# --------------------------------------------------------------------------- data


def _augment(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation about z, flips of x / y (each with probability 1/2), coordinate scaling in [0.9, 1.1]."""
    out = points.astype(np.float64 if points.dtype == np.float64 else np.float32, copy=True)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    x, y = out[:, 0].copy(), out[:, 1].copy()
    out[:, 0], out[:, 1] = cos * x - sin * y, sin * x + cos * y
    for axis in (0, 1):
        if rng.random() < 0.5:
            out[:, axis] = -out[:, axis]
    out[:, :3] *= rng.uniform(0.9, 1.1)
    return out


@dataclass
class _Item:
    prepared: PreparedCloud
    labels: torch.Tensor  # (N,) int64 labels of the points fed to preprocessing
    name: str


class _ScanDataset(Dataset):
    """Reads, augments (seeded per epoch and scan) and preprocesses labelled scans on the CPU."""

    def __init__(
        self,
        scans: Sequence[LabelledScan],
        config: PreprocessConfig,
        dim_proj: Sequence[int],
        *,
        num_classes: int,
        ignore_index: int,
        label_map: Mapping[int, int] | None,
        augment: bool,
        seed: int,
    ) -> None:
        self.scans = list(scans)
        self.config = config
        self.dim_proj = tuple(dim_proj)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_map = dict(label_map) if label_map is not None else None
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> _Item:
        scan = self.scans[index]
        points, labels = read_labelled_scan(
            scan, num_classes=self.num_classes, ignore_index=self.ignore_index, label_map=self.label_map
        )
        finite = np.isfinite(points[:, :4]).all(axis=1)
        if not finite.all():
            logger.warning("%s: dropping %d points with NaN or Inf values", scan.points, int((~finite).sum()))
            points, labels = points[finite], labels[finite]
        if self.augment:
            points = _augment(points, np.random.default_rng([self.seed, self.epoch, index]))
        tensor = as_points_tensor(points, torch.device("cpu"), str(scan.points))
        try:
            prepared = prepare_cloud(tensor, self.config, self.dim_proj)
        except ValueError as exc:
            raise ValueError(f"{scan.points}: {exc}") from None
        return _Item(prepared, torch.from_numpy(labels), scan.name)


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def _loader(dataset: _ScanDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    """Batches of items; the order depends on ``seed`` only (not on ``num_workers`` nor the global RNG)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order.tolist() if order is not None else None,
        num_workers=num_workers,
        collate_fn=_collate,
        # Worker seeds come from this generator, not from the global RNG (drop-path draws stay put).
        generator=torch.Generator().manual_seed(seed),
    )


def _pack(items: list[_Item], config: PreprocessConfig, device: torch.device) -> tuple[PackedInput, list[int]]:
    packed, offsets = pack_clouds([item.prepared for item in items], config.grids)
    return packed.to(device), offsets


def _infer_num_classes(scans: Sequence[LabelledScan], ignore_index: int, label_map: Mapping[int, int] | None) -> int:
    if label_map is not None:
        targets = [int(v) for v in label_map.values() if v != ignore_index]
        if not targets:
            raise ValueError("label_map sends every raw label to the ignore index; nothing to learn from")
        return max(targets) + 1
    largest = -1
    for scan in tqdm(scans, desc="reading labels", leave=False, disable=len(scans) < 50):
        _, labels = read_labelled_scan(scan, ignore_index=ignore_index)
        valid = labels[labels != ignore_index]
        if valid.size:
            if valid.min() < 0:
                raise ValueError(f"{scan.points}: negative label {valid.min()} (ignore index is {ignore_index})")
            largest = max(largest, int(valid.max()))
    if largest < 0:
        raise ValueError("every training label equals the ignore index; nothing to learn from")
    return largest + 1


# --------------------------------------------------------------------------- training


def _warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float) -> Callable[[int], float]:
    """lr factor of step s: linear warm-up to 1, then cosine decay to ``min_factor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return min_factor + 0.5 * (1.0 - min_factor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _forward_logits(model: WaffleIron, packed: PackedInput) -> torch.Tensor:
    """Head logits ``(M, K)``; a frozen backbone runs without autograd (its embedding then works in chunks)."""
    if model.backbone_frozen:
        with torch.no_grad():
            tokens = model.forward_backbone(packed)
        return model.forward_head(tokens)
    return model(packed, head=True)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _resolve(value: Any, default: Any) -> Any:
    return default if value is None else value


def fit(
    model: WaffleIron,
    train_dir: str | os.PathLike,
    *,
    mode: str = "linear_probe",
    val_dir: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    new_head: bool = True,
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    layer_decay: float | None = None,
    warmup_epochs: float | None = None,
    min_lr: float | None = None,
    drop_path_rate: float | None = None,
    drop_path_schedule: str = "uniform",
    lovasz_weight: float | None = None,
    batch_size: int | None = None,
    augment: bool = True,
    grad_checkpointing: bool = False,
    dtype: torch.dtype | str | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_map: Mapping[int, int] | None = None,
    sensor: str | Sequence[float] | None = None,
    fov: Sequence[Sequence[float]] | None = None,
    grids: Sequence[Sequence[int]] | None = None,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Linear-probe or fine-tune ``model`` on the labelled scans of ``train_dir``, in place.

    Every option left at None takes the value of :data:`RECIPES` for ``mode``.

    Args:
        model: the network (any head; ``new_head`` replaces it).
        train_dir: folder of labelled scans (see :mod:`scalr_zoo.labelled_scans`).
        mode: ``"linear_probe"`` (frozen backbone, head only) or ``"finetune"`` (everything).
        val_dir: folder scored at the end; without it the training folder is
            scored (``result.evaluated_on == "train"``).
        classes: class names in label order; sets K.
        num_classes: K when no names are given; default: largest training label + 1.
        new_head: put a fresh BatchNorm1d + Conv1d head with K outputs
            (:meth:`WaffleIron.reset_head`); False keeps a class head with K outputs.
        epochs, lr, weight_decay, warmup_epochs, min_lr: AdamW and its
            warm-up + cosine schedule (stepped per batch).
        layer_decay: layer-wise lr decay (:func:`layer_decay_param_groups`);
            None: one group, weight decay on every trainable parameter.
        drop_path_rate, drop_path_schedule: stochastic depth while fine-tuning
            (:meth:`WaffleIron.set_drop_path`).
        lovasz_weight: weight of the Lovász-softmax term added to the cross-entropy (0: off).
        batch_size: scans per optimiser step, packed into one forward pass.
        augment: random rotation about z, x / y flips and scaling, seeded.
        grad_checkpointing: recompute activations in the backward pass to save memory.
        dtype: autocast dtype (``"bf16"``, ``"fp16"``; fp16 uses a gradient scaler).
        ignore_index: label of unlabelled points (no loss, not scored).
        label_map: raw label -> class index, for raw dataset ids.
        sensor, fov, grids: preprocessing overrides as in :func:`scalr_zoo.extract`;
            they are written into ``model.config`` so later extraction matches.
        num_workers: DataLoader worker processes reading and preprocessing scans.
        seed: seeds shuffling, augmentations, head initialisation and drop-path;
            the caller's random state is left untouched.
        progress: show tqdm progress bars.

    Returns:
        A :class:`TrainResult`; the model is left trained, in eval mode (its
        backbone still frozen after linear probing).

    Raises:
        ValueError: an unknown mode, bad options, unreadable scans or labels out of range.
        FileNotFoundError: a folder does not exist.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    recipe = RECIPES[mode]
    epochs = int(_resolve(epochs, recipe.epochs))
    lr = float(_resolve(lr, recipe.lr))
    weight_decay = float(_resolve(weight_decay, recipe.weight_decay))
    layer_decay = layer_decay if layer_decay is not None else recipe.layer_decay
    warmup_epochs = float(_resolve(warmup_epochs, recipe.warmup_epochs))
    min_lr = float(_resolve(min_lr, recipe.min_lr))
    drop_path_rate = float(_resolve(drop_path_rate, recipe.drop_path_rate))
    lovasz_weight = float(_resolve(lovasz_weight, recipe.lovasz_weight))
    batch_size = int(_resolve(batch_size, recipe.batch_size))
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    if lr <= 0 or not 0 <= min_lr <= lr or weight_decay < 0 or warmup_epochs < 0:
        raise ValueError(
            f"need lr > 0, 0 <= min_lr <= lr, weight_decay >= 0, warmup_epochs >= 0; "
            f"got lr={lr}, min_lr={min_lr}, weight_decay={weight_decay}, warmup_epochs={warmup_epochs}"
        )
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")

    train_scans = find_labelled_scans(train_dir)
    val_scans = find_labelled_scans(val_dir) if val_dir is not None else None
    if classes is not None:
        classes = tuple(str(c) for c in classes)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes={num_classes} but {len(classes)} class names given")
        num_classes = len(classes)
    elif num_classes is None:
        num_classes = _infer_num_classes(train_scans, ignore_index, label_map)
        logger.info("%d classes found in the training labels", num_classes)
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class index (K={num_classes}); pick one outside [0, K)")

    preprocess = _preprocess_config(model, sensor, fov, grids)
    if preprocess != model.config.preprocess:
        model.config = dataclasses.replace(model.config, preprocess=preprocess)
    device = model.device
    autocast_dtype = _resolve_dtype(dtype)
    fork_devices = [device] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if new_head:
            model.reset_head(num_classes, classes)
        elif model.config.arch.head == "none" or model.config.arch.out != num_classes:
            raise ValueError(
                f"new_head=False needs a class head with {num_classes} outputs; the model's head is "
                f"{model.config.arch.head!r} with {model.config.arch.out} outputs"
            )
        if mode == "linear_probe":
            model.freeze_backbone()
        else:
            if model.backbone_frozen:
                model.unfreeze_backbone()
            model.set_drop_path(drop_path_rate, drop_path_schedule)
        model.set_grad_checkpointing(grad_checkpointing)

        if layer_decay is not None:
            groups = layer_decay_param_groups(model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(train_scans) / batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            _warmup_cosine(round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch, min_lr / lr),
        )
        scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
        classes = classes or model.config.classes or tuple(f"class_{i}" for i in range(num_classes))

        dataset = _ScanDataset(
            train_scans,
            preprocess,
            model.config.arch.dim_proj,
            num_classes=num_classes,
            ignore_index=ignore_index,
            label_map=label_map,
            augment=augment,
            seed=seed,
        )
        logger.info(
            "%s on %d scans: %d epochs of %d steps, lr %g, %d parameter tensors trained",
            mode, len(train_scans), epochs, steps_per_epoch, lr,
            sum(1 for p in model.parameters() if p.requires_grad),
        )
        history: list[EpochLog] = []
        for epoch in range(epochs):
            dataset.epoch = epoch
            model.train()
            epoch_scores = SegmentationScores.empty(classes)
            losses = []
            batches = tqdm(
                _loader(dataset, batch_size, True, num_workers, seed + epoch),
                desc=f"epoch {epoch + 1}/{epochs}",
                total=steps_per_epoch,
                disable=not progress,
                leave=False,
            )
            for items in batches:
                packed, _ = _pack(items, preprocess, device)
                labels = torch.cat([item.labels[item.prepared.kept_index] for item in items]).to(device)
                with _autocast(device, autocast_dtype):
                    logits = _forward_logits(model, packed)
                loss = segmentation_loss(logits, labels, ignore_index=ignore_index, lovasz_weight=lovasz_weight)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                epoch_scores.add(
                    confusion_matrix(logits.detach().argmax(dim=1), labels, num_classes, ignore_index)
                )
                batches.set_postfix(loss=f"{losses[-1]:.3f}")
            log = EpochLog(epoch + 1, float(np.mean(losses)), optimizer.param_groups[-1]["lr"], epoch_scores.miou)
            history.append(log)
            logger.info(
                "epoch %d/%d: loss %.4f, train mIoU (kept points) %.2f%%", log.epoch, epochs, log.loss, 100 * log.train_miou
            )
    model.eval()

    scores = evaluate(
        model,
        val_scans if val_scans is not None else train_scans,
        ignore_index=ignore_index,
        label_map=label_map,
        batch_size=batch_size,
        dtype=dtype,
        num_workers=num_workers,
        progress=progress,
    )
    evaluated_on = "val" if val_scans is not None else "train"
    logger.info("%s mIoU on %s: %.2f%%", mode, evaluated_on, 100 * scores.miou)
    return TrainResult(mode, scores, evaluated_on, history)


def linear_probe(model: WaffleIron, train_dir: str | os.PathLike, **options: Any) -> TrainResult:
    """:func:`fit` with ``mode="linear_probe"``: a fresh class head on a frozen backbone."""
    return fit(model, train_dir, mode="linear_probe", **options)


def finetune(model: WaffleIron, train_dir: str | os.PathLike, **options: Any) -> TrainResult:
    """:func:`fit` with ``mode="finetune"``: every parameter trains, with layer-wise lr decay."""
    return fit(model, train_dir, mode="finetune", **options)


def evaluate(
    model: WaffleIron,
    data: str | os.PathLike | Sequence[LabelledScan],
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_map: Mapping[int, int] | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> SegmentationScores:
    """Score a model with a class head on labelled scans.

    Every labelled input point is scored: points merged by voxelisation or
    outside the field of view take the prediction of their nearest kept point,
    as :func:`scalr_zoo.extract` gives them features. Preprocessing is the
    model's (``model.config.preprocess``).

    Args:
        model: a network whose head outputs K class logits.
        data: a folder of labelled scans or a list from :func:`~scalr_zoo.labelled_scans.find_labelled_scans`.
        ignore_index, label_map: as in :func:`fit`.
        batch_size: scans per forward pass.
        dtype: autocast dtype.
        num_workers: DataLoader worker processes.
        progress: show a progress bar.
    Returns:
        :class:`~scalr_zoo.metrics.SegmentationScores` (confusion matrix, per-class IoU, mIoU).
    """
    if not model.has_head or model.config.arch.out is None:
        raise ValueError("the model has no class head; call model.reset_head(num_classes) and train it first")
    num_classes = int(model.config.arch.out)
    scans = list(data) if not isinstance(data, (str, os.PathLike)) else find_labelled_scans(data)
    classes = model.config.classes or tuple(f"class_{i}" for i in range(num_classes))
    preprocess = model.config.preprocess
    dataset = _ScanDataset(
        scans,
        preprocess,
        model.config.arch.dim_proj,
        num_classes=num_classes,
        ignore_index=ignore_index,
        label_map=label_map,
        augment=False,
        seed=0,
    )
    autocast_dtype = _resolve_dtype(dtype)
    device = model.device
    scores = SegmentationScores.empty(classes)
    with _inference(model):
        for items in tqdm(
            _loader(dataset, batch_size, False, num_workers, 0),
            desc="evaluating",
            total=math.ceil(len(scans) / batch_size),
            disable=not progress,
            leave=False,
        ):
            packed, offsets = _pack(items, preprocess, device)
            with _autocast(device, autocast_dtype):
                predicted = model(packed, head=True).argmax(dim=1)
            for item, offset in zip(items, offsets):
                per_point = predicted[offset + item.prepared.upsample.to(device)]
                scores.add(confusion_matrix(per_point, item.labels.to(device), num_classes, ignore_index))
    return scores
