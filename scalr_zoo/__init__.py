"""scalr-zoo: pretrained WaffleIron / ScaLR lidar backbones and per-point feature extraction.

>>> import scalr_zoo
>>> model = scalr_zoo.load("checkpoint.pth", config={...})   # doctest: +SKIP
>>> features = model.extract(points)                         # (N, C) float32  # doctest: +SKIP
"""

from ._platform import guard_onednn_isa as _guard_onednn_isa

_guard_onednn_isa()

from . import data, io, viz
from .config import SENSOR_PRESETS, ArchConfig, ModelConfig, PreprocessConfig
from .convert import read_original_checkpoint
from .data import SampleScan, sample_scan
from .extract import extract
from .io import read_point_cloud, read_points
from .loading import create_model, load
from .model import PackedInput, WaffleIron
from .segment import Segmentation, segment

__version__ = "0.1.0"

__all__ = [
    "ArchConfig",
    "ModelConfig",
    "PackedInput",
    "PreprocessConfig",
    "SENSOR_PRESETS",
    "SampleScan",
    "Segmentation",
    "WaffleIron",
    "__version__",
    "create_model",
    "data",
    "extract",
    "io",
    "load",
    "read_original_checkpoint",
    "read_point_cloud",
    "read_points",
    "sample_scan",
    "segment",
    "viz",
]
