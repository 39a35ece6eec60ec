"""vaekit: variational auto-encoders as tools: train, measure, look at and use them."""

from .config import PRESETS, Config, DataConfig, ModelConfig, TrainConfig, make_config
from .data import Dataset, Split, load_data
from .errors import VaekitError
from .model import VAE
from .rundir import load, load_config, read_metrics
from .train import Run, train
from .uses import decode, encode, interpolate, manifold, plot, reconstruct, sample

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "make_config",
    "Dataset",
    "Split",
    "load_data",
    "VaekitError",
    "VAE",
    "load",
    "load_config",
    "read_metrics",
    "Run",
    "train",
    "decode",
    "encode",
    "interpolate",
    "manifold",
    "plot",
    "reconstruct",
    "sample",
]
