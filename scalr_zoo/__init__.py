"""scalr-zoo: pretrained WaffleIron / ScaLR lidar backbones and per-point feature extraction.

>>> import scalr_zoo
>>> model = scalr_zoo.load("checkpoint.pth", config={...})   # doctest: +SKIP
>>> features = model.extract(points)                         # (N, C) float32  # doctest: +SKIP
"""

from ._platform import guard_onednn_isa as _guard_onednn_isa

_guard_onednn_isa()

from .config import SENSOR_PRESETS, ArchConfig, ModelConfig, PreprocessConfig
from .convert import read_original_checkpoint
from .extract import extract
from .fast import FastWaffleIron, fast_engine
from .loading import create_model, load
from .model import PackedInput, WaffleIron

__version__ = "0.1.0"

__all__ = [
    "ArchConfig",
    "FastWaffleIron",
    "ModelConfig",
    "PackedInput",
    "PreprocessConfig",
    "SENSOR_PRESETS",
    "WaffleIron",
    "__version__",
    "create_model",
    "extract",
    "fast_engine",
    "load",
    "read_original_checkpoint",
]
