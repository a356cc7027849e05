"""Per-point feature extraction: raw clouds in, one feature row per input point out."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np
import torch

from .config import PreprocessConfig, resolve_intensity_stats
from .fast import fast_engine
from .literal import literal_forward
from .model import PackedInput, WaffleIron
from .preprocess import PreparedCloud, pack_clouds, prepare_cloud

__all__ = ["extract", "as_points_tensor", "PreparedPoints", "prepare_points", "run_prepared"]

logger = logging.getLogger(__name__)

PointsLike = Union[np.ndarray, torch.Tensor]

#: Implementations of the forward pass that ``extract(impl=...)`` accepts.
IMPLS = ("fast", "module", "literal")

_AUTOCAST_DTYPES = {
    "float32": None,
    "fp32": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def as_points_tensor(points: PointsLike, device: torch.device, name: str = "points") -> torch.Tensor:
    """Check a raw cloud and return it as a ``(N, >=4)`` float tensor on ``device``.

    float64 input stays float64 (voxel keys are computed in float64); every
    other real dtype becomes float32.

    Raises:
        ValueError: not an array, not 2D, fewer than 4 columns, a dtype that is
            not real numbers, or no points.
    """
    if isinstance(points, np.ndarray):
        if points.dtype == object or points.dtype.kind not in "fiu":
            raise ValueError(
                f"{name} must hold real numbers (float or int), got dtype {points.dtype}; "
                "convert with np.asarray(points, dtype=np.float32)"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(points))
    elif isinstance(points, torch.Tensor):
        if points.dtype.is_complex or points.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers (float or int), got dtype {points.dtype}")
        tensor = points.detach()
    else:
        raise ValueError(
            f"{name} must be a numpy array or a torch tensor of shape (N, 4+), got {type(points).__name__}"
        )
    if tensor.ndim != 2 or tensor.shape[1] < 4:
        raise ValueError(
            f"{name} must have shape (N, 4+) with columns x, y, z, intensity, got shape {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 points); give at least one point")
    if tensor.dtype != torch.float64:
        tensor = tensor.float()
    return tensor.to(device)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in _AUTOCAST_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_AUTOCAST_DTYPES)}, got {dtype!r}")
        return _AUTOCAST_DTYPES[dtype.lower()]
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")


def _preprocess_config(
    model: WaffleIron,
    sensor: str | Sequence[float] | None,
    fov: Sequence[Sequence[float]] | None,
    grids: Sequence[Sequence[int]] | None,
) -> PreprocessConfig:
    config = model.config.preprocess
    dim_proj = model.config.arch.dim_proj
    if fov is not None:
        config = config.with_fov(fov, dim_proj, grids)
    elif grids is not None:
        config = dataclasses.replace(config, grids=tuple(tuple(g) for g in grids))
    if len(config.grids) != len(dim_proj):
        raise ValueError(f"grids must give one (rows, cols) per projection plane ({len(dim_proj)}), got {config.grids}")
    if sensor is not None:
        mean, std = resolve_intensity_stats(sensor)
        config = dataclasses.replace(
            config, intensity_mean=mean, intensity_std=std, sensor=sensor if isinstance(sensor, str) else None
        )
    return config


@contextlib.contextmanager
def _inference(model: WaffleIron) -> Iterator[None]:
    """Eval mode and no gradients, restoring each module's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _finite_rows(points: torch.Tensor, name: str, drop_nonfinite: bool) -> torch.Tensor | None:
    """None when every x, y, z, intensity is finite; else the mask of finite rows (or raise)."""
    finite = torch.isfinite(points[:, :4]).all(dim=1)
    bad = int((~finite).sum())
    if bad == 0:
        return None
    if not drop_nonfinite:
        raise ValueError(
            f"{name} has {bad} of {points.shape[0]} points with NaN or Inf in x, y, z or intensity; "
            "clean them or pass drop_nonfinite=True (their output rows are then NaN)"
        )
    logger.warning("%s: dropping %d points with NaN or Inf values", name, bad)
    return finite


@dataclass
class PreparedPoints:
    """One raw cloud, checked and preprocessed, ready to be packed.

    Attributes:
        cloud: the preprocessed finite points.
        finite: ``(N,)`` bool mask of the finite input rows, or None when all are.
        num_points: N, rows of the raw input.
    """

    cloud: PreparedCloud
    finite: torch.Tensor | None
    num_points: int

    def to(self, device: torch.device | str) -> "PreparedPoints":
        """A copy with every tensor on ``device``."""
        return PreparedPoints(
            self.cloud.to(device), None if self.finite is None else self.finite.to(device), self.num_points
        )


def prepare_points(
    points: PointsLike,
    config: PreprocessConfig,
    dim_proj: Sequence[int],
    *,
    name: str,
    device: torch.device,
    drop_nonfinite: bool = False,
    knn_backend: str = "auto",
) -> PreparedPoints:
    """Check one raw ``(N, >=4)`` cloud and preprocess it on ``device``.

    Raises:
        ValueError: naming ``name`` and the problem (see :func:`extract`).
    """
    tensor = as_points_tensor(points, device, name)
    finite = _finite_rows(tensor, name, drop_nonfinite)
    usable = tensor if finite is None else tensor[finite]
    if usable.shape[0] == 0:
        raise ValueError(f"{name} has no finite point left")
    try:
        cloud = prepare_cloud(usable, config, dim_proj, knn_backend)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return PreparedPoints(cloud, finite, tensor.shape[0])


def forward_packed(
    model: WaffleIron,
    packed: PackedInput,
    *,
    head: bool,
    autocast_dtype: torch.dtype | None,
    impl: str = "fast",
) -> torch.Tensor:
    """Network outputs ``(M, C)`` (or ``(M, out)``) float32 of packed kept points.

    ``impl="fast"`` runs the folded, sparse engine of :mod:`scalr_zoo.fast`;
    ``"module"`` the model's own forward (point-major, dense grids) and
    ``"literal"`` :func:`scalr_zoo.literal.literal_forward` (the spec step by
    step, channel-major), both under autocast when ``autocast_dtype`` is set.
    """
    if impl == "fast":
        return fast_engine(model, autocast_dtype)(packed, head=head)
    autocast = (
        torch.autocast(packed.features.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        result = literal_forward(model, packed, head=head) if impl == "literal" else model(packed, head=head)
    return result.float()


def run_prepared(
    model: WaffleIron,
    prepared: Sequence[PreparedPoints],
    grids: Sequence[Sequence[int]],
    *,
    head: bool = False,
    autocast_dtype: torch.dtype | None = None,
    impl: str = "fast",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run prepared clouds as one packed batch; per cloud, ``(N, C)`` rows for every
    input point (NaN for dropped ones) and the ``(N,)`` FOV mask. Call under no_grad."""
    packed, offsets = pack_clouds([p.cloud for p in prepared], grids)
    result = forward_packed(model, packed, head=head, autocast_dtype=autocast_dtype, impl=impl)
    per_cloud = []
    for item, offset in zip(prepared, offsets):
        rows = result[offset + item.cloud.upsample]
        mask = item.cloud.fov_mask
        if item.finite is not None:
            full = rows.new_full((item.num_points, rows.shape[1]), float("nan"))
            full[item.finite] = rows
            rows = full
            mask = torch.zeros(item.num_points, dtype=torch.bool, device=rows.device).masked_scatter_(item.finite, mask)
        per_cloud.append((rows, mask))
    return per_cloud


def extract(
    model: WaffleIron,
    points: PointsLike | Sequence[PointsLike],
    *,
    head: bool = False,
    sensor: str | Sequence[float] | None = None,
    fov: Sequence[Sequence[float]] | None = None,
    grids: Sequence[Sequence[int]] | None = None,
    dtype: torch.dtype | str | None = None,
    drop_nonfinite: bool = False,
    return_fov_mask: bool = False,
    batch_size: int | None = None,
    knn_backend: str = "auto",
    impl: str = "fast",
) -> torch.Tensor | list[torch.Tensor] | tuple:
    """Features of every input point of one cloud or a list of clouds.

    Args:
        model: the network.
        points: ``(N, >=4)`` array or tensor (x, y, z, intensity; extra
            columns ignored), or a list of them (run together as batches).
        head: return head outputs ``(N, out)`` instead of backbone features ``(N, C)``.
        sensor: intensity normalisation, a preset name (``"nuscenes"``,
            ``"semantickitti"``, ``"pandar64"``, ``"pandargt"``, ``"raw"``) or
            a ``(mean, std)`` pair; default: the model's own.
        fov: ``((xmin, ymin, zmin), (xmax, ymax, zmax))`` replacing the
            model's FOV; the grids follow so that the cell size is kept,
            unless ``grids`` is given too.
        grids: grid shape of each projection plane.
        dtype: reduced precision, ``torch.bfloat16`` / ``torch.float16`` (or
            ``"bf16"``, ``"fp16"``); default float32. The fast path runs its
            matrix products in that dtype and keeps the residual stream,
            norms and spatial mixing in float32; the other paths run
            under autocast. Outputs are float32.
        drop_nonfinite: drop points with NaN/Inf instead of raising; their
            output rows are NaN and their mask entries False.
        return_fov_mask: also return a ``(N,)`` bool mask of the points that
            lay inside the FOV (the others took the features of the nearest
            kept point).
        batch_size: clouds per forward pass for a list (default: all at once).
        knn_backend: ``"auto"``, ``"scipy"`` or ``"torch"``.
        impl: ``"fast"`` (default) runs the folded, sparse inference engine
            of :mod:`scalr_zoo.fast`; ``"module"`` runs the model's own
            ``forward`` (point-major tokens, dense grids: the path that
            trains); ``"literal"`` runs :mod:`scalr_zoo.literal`, the spec
            step by step (channel-major, dense grids, slow; the ground truth
            of the tests and benchmarks). All give the same features up to
            float rounding.

    Returns:
        A float32 ``(N, C)`` (or ``(N, out)``) tensor on the model's device,
        one row per input point in input order; a list of them for a list
        input; with ``return_fov_mask`` a ``(features, mask)`` pair (of lists
        for a list input).

    Raises:
        ValueError: bad shape or dtype, an empty cloud, NaN/Inf values, no
            point inside the FOV, too few points, a model without head for
            ``head=True``, or a bad option.
    """
    if head and not model.has_head:
        raise ValueError("this model has no head; use head=False for backbone features")
    single = isinstance(points, (np.ndarray, torch.Tensor))
    clouds = [points] if single else list(points)
    if not clouds:
        raise ValueError("points is an empty list; give at least one cloud")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    batch_size = batch_size or len(clouds)
    autocast_dtype = _resolve_dtype(dtype)
    config = _preprocess_config(model, sensor, fov, grids)
    dim_proj = model.config.arch.dim_proj
    device = model.device

    outputs: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    with _inference(model):
        for start in range(0, len(clouds), batch_size):
            prepared = [
                prepare_points(
                    clouds[i], config, dim_proj, name="points" if single else f"points[{i}]", device=device,
                    drop_nonfinite=drop_nonfinite, knn_backend=knn_backend,
                )
                for i in range(start, min(start + batch_size, len(clouds)))
            ]
            for rows, mask in run_prepared(
                model, prepared, config.grids, head=head, autocast_dtype=autocast_dtype, impl=impl
            ):
                outputs.append(rows)
                masks.append(mask)
    if single:
        return (outputs[0], masks[0]) if return_fov_mask else outputs[0]
    return (outputs, masks) if return_fov_mask else outputs
