"""Configuration dataclasses: network architecture and preprocessing.

A :class:`ModelConfig` bundles everything a set of weights needs to be used
correctly: the architecture (:class:`ArchConfig`), the preprocessing it was
trained with (:class:`PreprocessConfig`) and, for class heads, the class names.
It serialises to the nested ``config.json`` written next to converted weights
and also accepts the flat mapping used by the reference cases
(``width, depth, head, hidden, out, norm, act, fov, grids, mean, std,
voxel_size, num_neighbors``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = [
    "ArchConfig",
    "PreprocessConfig",
    "ModelConfig",
    "SENSOR_PRESETS",
    "resolve_intensity_stats",
    "apply_overrides",
]

#: Intensity normalisation (mean, std) of each training sensor (spec, section 1).
#: ``raw`` leaves intensities unchanged (the supervised WaffleIron models).
SENSOR_PRESETS: dict[str, tuple[float, float]] = {
    "nuscenes": (18.742355, 22.04632),
    "semantickitti": (0.28613698, 0.14090556),
    "pandar64": (18.23640649, 25.86983417),
    "pandargt": (23.06113565, 16.76273235),
    "raw": (0.0, 1.0),
}

_SENSOR_ALIASES = {
    "kitti": "semantickitti",
    "semantic_kitti": "semantickitti",
    "panda64": "pandar64",
    "pandagt": "pandargt",
    "nusc": "nuscenes",
}

HEAD_KINDS = ("none", "linear", "mlp", "bn_linear")
NORM_KINDS = ("layernorm", "batchnorm")
ACT_KINDS = ("relu", "gelu")


def resolve_intensity_stats(sensor: str | Sequence[float]) -> tuple[float, float]:
    """Turn a sensor preset name or a ``(mean, std)`` pair into ``(mean, std)``.

    Raises:
        ValueError: unknown preset, or a pair that is not two finite numbers
            with a positive std.
    """
    if isinstance(sensor, str):
        name = _SENSOR_ALIASES.get(sensor.lower(), sensor.lower())
        if name not in SENSOR_PRESETS:
            known = ", ".join(sorted(SENSOR_PRESETS))
            raise ValueError(
                f"unknown sensor preset {sensor!r}; use one of {known} or a (mean, std) pair"
            )
        return SENSOR_PRESETS[name]
    try:
        mean, std = (float(v) for v in sensor)
    except (TypeError, ValueError):
        raise ValueError(
            f"sensor must be a preset name or a (mean, std) pair of numbers, got {sensor!r}"
        ) from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"intensity (mean, std) must be finite with std > 0, got ({mean}, {std})")
    return mean, std


@dataclass(frozen=True)
class ArchConfig:
    """WaffleIron architecture.

    Attributes:
        width: channels C of every token.
        depth: number of backbone layers L (each a spatial then a channel mix).
        norm: ``"layernorm"`` (ScaLR, ScaLR+) or ``"batchnorm"`` (supervised WaffleIron).
        act: activation inside the mixers, ``"relu"`` or ``"gelu"`` (exact).
        head: ``"none"``, ``"linear"`` (Conv1d C→out), ``"mlp"`` (C→hidden→out,
            ReLU between) or ``"bn_linear"`` (BatchNorm1d then Conv1d C→out).
        out: output channels of the head (distillation width or class count).
        hidden: hidden width of the ``"mlp"`` head.
        in_channels: per-point input features (intensity, x, y, z, radius).
        dim_proj: projection axis of layer d is ``dim_proj[d % len(dim_proj)]``.
        layer_norm_eps: epsilon of every LayerNorm.
    """

    width: int = 768
    depth: int = 48
    norm: str = "layernorm"
    act: str = "relu"
    head: str = "none"
    out: int | None = None
    hidden: int | None = None
    in_channels: int = 5
    dim_proj: tuple[int, ...] = (2, 1, 0)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_proj", tuple(int(d) for d in self.dim_proj))
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be positive, got {self.width} and {self.depth}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if self.act not in ACT_KINDS:
            raise ValueError(f"act must be one of {ACT_KINDS}, got {self.act!r}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {self.head!r}")
        if self.head != "none" and not self.out:
            raise ValueError(f"head {self.head!r} needs 'out' (its number of outputs)")
        if self.head == "mlp" and not self.hidden:
            raise ValueError("head 'mlp' needs 'hidden' (its hidden width)")
        if sorted(self.dim_proj) != sorted(set(self.dim_proj)) or not set(self.dim_proj) <= {0, 1, 2}:
            raise ValueError(f"dim_proj must list distinct axes among 0, 1, 2, got {self.dim_proj}")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a scan becomes network input (spec, section 4).

    Attributes:
        fov_min, fov_max: field of view (x, y, z) in metres; points strictly
            inside (with a 1e-4 m margin) are fed to the network.
        grids: 2D grid size (rows, cols) of each projection plane, in the
            order of ``ArchConfig.dim_proj``.
        voxel_size: voxelisation step in metres (first point per voxel kept).
        num_neighbors: K, neighbours per point in the embedding.
        intensity_mean, intensity_std: intensity normalisation.
        sensor: name of the preset those statistics come from, if any.
    """

    fov_min: tuple[float, float, float] = (-64.0, -64.0, -8.0)
    fov_max: tuple[float, float, float] = (64.0, 64.0, 8.0)
    grids: tuple[tuple[int, int], ...] = ((256, 256), (256, 32), (256, 32))
    voxel_size: float = 0.1
    num_neighbors: int = 16
    intensity_mean: float = 0.0
    intensity_std: float = 1.0
    sensor: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fov_min", tuple(float(v) for v in self.fov_min))
        object.__setattr__(self, "fov_max", tuple(float(v) for v in self.fov_max))
        object.__setattr__(self, "grids", tuple(tuple(int(v) for v in g) for g in self.grids))
        if len(self.fov_min) != 3 or len(self.fov_max) != 3:
            raise ValueError("fov_min and fov_max must each hold 3 values (x, y, z)")
        if any(lo >= hi for lo, hi in zip(self.fov_min, self.fov_max)):
            raise ValueError(f"fov_min {self.fov_min} must be below fov_max {self.fov_max} on every axis")
        if any(len(g) != 2 or min(g) < 1 for g in self.grids):
            raise ValueError(f"grids must be (rows, cols) pairs of positive integers, got {self.grids}")
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive, got {self.voxel_size}")
        if self.num_neighbors < 1:
            raise ValueError(f"num_neighbors must be positive, got {self.num_neighbors}")
        resolve_intensity_stats((self.intensity_mean, self.intensity_std))

    @property
    def fov(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(fov_min, fov_max)``."""
        return self.fov_min, self.fov_max

    def plane_axes(self, dim_proj: Sequence[int]) -> list[tuple[int, int]]:
        """The two in-plane axes (u, v), in increasing order, of each projection."""
        return [tuple(d for d in range(3) if d != a) for a in dim_proj]  # type: ignore[misc]

    def cell_sizes(self, dim_proj: Sequence[int]) -> list[tuple[float, float]]:
        """Cell size in metres (along u, along v) of each projection plane."""
        sizes = []
        for (u, v), (gu, gv) in zip(self.plane_axes(dim_proj), self.grids):
            sizes.append(
                ((self.fov_max[u] - self.fov_min[u]) / gu, (self.fov_max[v] - self.fov_min[v]) / gv)
            )
        return sizes

    def with_fov(
        self,
        fov: Sequence[Sequence[float]],
        dim_proj: Sequence[int],
        grids: Sequence[Sequence[int]] | None = None,
    ) -> "PreprocessConfig":
        """A copy with another field of view.

        Without ``grids`` the cell size is kept: each grid is the new extent
        divided by the old cell size, which must come out a whole number.
        """
        try:
            fov_min, fov_max = (tuple(float(v) for v in corner) for corner in fov)
        except (TypeError, ValueError):
            raise ValueError(f"fov must be ((xmin, ymin, zmin), (xmax, ymax, zmax)), got {fov!r}") from None
        if len(fov_min) != 3 or len(fov_max) != 3 or any(lo >= hi for lo, hi in zip(fov_min, fov_max)):
            raise ValueError(f"fov_min {fov_min} must be below fov_max {fov_max} on every axis (x, y, z)")
        if grids is None:
            new_grids = []
            for (u, v), (su, sv) in zip(self.plane_axes(dim_proj), self.cell_sizes(dim_proj)):
                sizes = []
                for axis, cell in ((u, su), (v, sv)):
                    n = (fov_max[axis] - fov_min[axis]) / cell
                    if abs(n - round(n)) > 1e-6 or round(n) < 1:
                        raise ValueError(
                            f"the FOV extent {fov_max[axis] - fov_min[axis]} m along axis {'xyz'[axis]} "
                            f"is not a whole number of {cell} m cells; pass grids= explicitly "
                            "or choose a FOV that is a multiple of the cell size"
                        )
                    sizes.append(int(round(n)))
                new_grids.append(tuple(sizes))
            grids = new_grids
        return dataclasses.replace(self, fov_min=fov_min, fov_max=fov_max, grids=tuple(map(tuple, grids)))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build and use one set of weights.

    Attributes:
        arch: the network.
        preprocess: preprocessing defaults the weights were trained with.
        classes: class names of a class head, in output order (None otherwise).
        name: registry name of the weights, if any.
        meta: free-form metadata (paper, licence, reported mIoU, source URL...).
    """

    arch: ArchConfig = field(default_factory=ArchConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    classes: tuple[str, ...] | None = None
    name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
            if self.arch.out is not None and len(self.classes) != self.arch.out:
                raise ValueError(
                    f"{len(self.classes)} class names given for a head with {self.arch.out} outputs"
                )
        if len(self.preprocess.grids) != len(self.arch.dim_proj):
            raise ValueError(
                f"{len(self.preprocess.grids)} grids given for {len(self.arch.dim_proj)} projection axes"
            )

    def to_dict(self) -> dict[str, Any]:
        """Nested JSON-ready mapping (the ``config.json`` format)."""
        pre = dataclasses.asdict(self.preprocess)
        pre["grids"] = [list(g) for g in self.preprocess.grids]
        pre["fov_min"] = list(self.preprocess.fov_min)
        pre["fov_max"] = list(self.preprocess.fov_max)
        arch = dataclasses.asdict(self.arch)
        arch["dim_proj"] = list(self.arch.dim_proj)
        out: dict[str, Any] = {"architecture": arch, "preprocessing": pre}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        if self.name is not None:
            out["name"] = self.name
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from a nested ``config.json`` mapping or a flat reference-case mapping.

        The flat form takes the keys ``width, depth, head, hidden, out, norm,
        act, fov, grids, mean, std, voxel_size, num_neighbors`` (and
        optionally ``dim_proj``, ``sensor``, ``classes``); unknown keys of the
        reference cases (``key``, ``seed``, ``input_features``) are ignored.
        """
        if "architecture" in data:
            arch = ArchConfig(**_known(ArchConfig, data["architecture"]))
            preprocess = PreprocessConfig(**_known(PreprocessConfig, data.get("preprocessing", {})))
            classes = data.get("classes")
            return cls(arch, preprocess, tuple(classes) if classes else None, data.get("name"), dict(data.get("meta", {})))
        unknown = set(data) - _FLAT_KEYS
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; expected some of {sorted(_FLAT_KEYS)}")
        head = data.get("head", "none") or "none"
        arch_kwargs: dict[str, Any] = {
            "width": data.get("width", 768),
            "depth": data.get("depth", 48),
            "norm": data.get("norm", "layernorm"),
            "act": data.get("act", "relu"),
            "head": head,
            "out": data.get("out"),
            "hidden": data.get("hidden"),
        }
        if "dim_proj" in data:
            arch_kwargs["dim_proj"] = data["dim_proj"]
        pre_kwargs: dict[str, Any] = {}
        if "fov" in data:
            pre_kwargs["fov_min"], pre_kwargs["fov_max"] = data["fov"]
        for key in ("grids", "voxel_size", "num_neighbors"):
            if key in data:
                pre_kwargs[key] = data[key]
        if "sensor" in data and data["sensor"] is not None:
            mean, std = resolve_intensity_stats(data["sensor"])
            pre_kwargs.update(intensity_mean=mean, intensity_std=std)
            if isinstance(data["sensor"], str):
                pre_kwargs["sensor"] = data["sensor"]
        if "mean" in data or "std" in data:
            pre_kwargs["intensity_mean"] = float(data.get("mean", 0.0))
            pre_kwargs["intensity_std"] = float(data.get("std", 1.0))
            pre_kwargs["sensor"] = _preset_name(pre_kwargs["intensity_mean"], pre_kwargs["intensity_std"])
        classes = data.get("classes")
        return cls(ArchConfig(**arch_kwargs), PreprocessConfig(**pre_kwargs), tuple(classes) if classes else None)


_FLAT_KEYS = {
    "width", "depth", "head", "hidden", "out", "norm", "act", "fov", "grids", "mean", "std",
    "voxel_size", "num_neighbors", "dim_proj", "sensor", "classes",
    # carried by the reference cases, not needed to build the model
    "key", "seed", "input_features",
}


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; expected some of {sorted(names)}")
    return dict(data)


def _preset_name(mean: float, std: float) -> str | None:
    for name, (m, s) in SENSOR_PRESETS.items():
        if math.isclose(m, mean, rel_tol=1e-6, abs_tol=1e-9) and math.isclose(s, std, rel_tol=1e-6):
            return name
    return None


def apply_overrides(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """A copy of ``config`` with fields replaced by name.

    Keys may name any :class:`ArchConfig` or :class:`PreprocessConfig` field,
    or one of ``fov`` (a ``(min, max)`` pair, grids follow to keep the cell
    size), ``sensor`` (preset or ``(mean, std)``), ``mean``, ``std``,
    ``classes``, ``name``.
    """
    arch_fields = {f.name for f in dataclasses.fields(ArchConfig)}
    pre_fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
    arch_kw: dict[str, Any] = {}
    pre_kw: dict[str, Any] = {}
    top_kw: dict[str, Any] = {}
    preprocess = config.preprocess
    for key, value in overrides.items():
        if key == "fov":
            preprocess = preprocess.with_fov(value, config.arch.dim_proj, overrides.get("grids"))
        elif key == "sensor":
            mean, std = resolve_intensity_stats(value)
            pre_kw.update(intensity_mean=mean, intensity_std=std, sensor=value if isinstance(value, str) else None)
        elif key in ("mean", "std"):
            pre_kw["intensity_" + key] = float(value)
            pre_kw.setdefault("sensor", None)
        elif key in ("classes", "name", "meta"):
            top_kw[key] = tuple(value) if key == "classes" and value is not None else value
        elif key in arch_fields:
            arch_kw[key] = value
        elif key in pre_fields:
            if not (key == "grids" and "fov" in overrides):
                pre_kw[key] = value
        else:
            known = sorted(arch_fields | pre_fields | {"fov", "sensor", "mean", "std", "classes", "name", "meta"})
            raise ValueError(f"unknown override {key!r}; expected one of {known}")
    return dataclasses.replace(
        config,
        arch=dataclasses.replace(config.arch, **arch_kw),
        preprocess=dataclasses.replace(preprocess, **pre_kw),
        **top_kw,
    )
