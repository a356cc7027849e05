"""scalr-zoo: pretrained WaffleIron / ScaLR lidar backbones and per-point feature extraction.

>>> import scalr_zoo
>>> model = scalr_zoo.load("waffleiron-dinov2-L")            # doctest: +SKIP
>>> features = model.extract(points)                         # (N, C) float32  # doctest: +SKIP
"""

from ._platform import guard_onednn_isa as _guard_onednn_isa

_guard_onednn_isa()

from . import data, io, viz
from .archive import UnsafeArchiveError
from .config import SENSOR_PRESETS, ArchConfig, ModelConfig, PreprocessConfig
from .convert import convert_archive, convert_checkpoint, read_original_checkpoint
from .data import SampleScan, sample_scan
from .extract import extract
from .hub import IntegrityError, NotCachedError, SourceNotFoundError, download
from .io import read_point_cloud, read_points
from .fast import FastWaffleIron, fast_engine
from .loading import create_model, load
from .metrics import SegmentationScores
from .model import PackedInput, WaffleIron
from .registry import PretrainedEntry, UnknownModelError, list_models, model_info
from .segment import Segmentation, segment
from .train import TrainResult, finetune, layer_decay_param_groups, linear_probe

__version__ = "0.1.0"

__all__ = [
    "ArchConfig",
    "convert_archive",
    "convert_checkpoint",
    "create_model",
    "data",
    "download",
    "extract",
    "fast_engine",
    "FastWaffleIron",
    "finetune",
    "IntegrityError",
    "io",
    "layer_decay_param_groups",
    "linear_probe",
    "list_models",
    "load",
    "model_info",
    "ModelConfig",
    "NotCachedError",
    "PackedInput",
    "PreprocessConfig",
    "PretrainedEntry",
    "read_original_checkpoint",
    "read_point_cloud",
    "read_points",
    "sample_scan",
    "SampleScan",
    "segment",
    "Segmentation",
    "SegmentationScores",
    "SENSOR_PRESETS",
    "SourceNotFoundError",
    "TrainResult",
    "UnknownModelError",
    "UnsafeArchiveError",
    "viz",
    "WaffleIron",
    "__version__",
]
