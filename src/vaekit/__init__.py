"""vaekit: variational auto-encoders as tools: train, measure, look at and use them."""

from __future__ import annotations

import importlib

# Not typing.TYPE_CHECKING: importing typing would cost the command's start-up, before its signal handlers are in
# place, a hundredth of a second; type checkers treat any constant of this name alike.
TYPE_CHECKING = False

__version__ = "0.1.0"

# Names are imported on first use, so that `vaekit --help` and `import vaekit` do not wait for torch. The block under
# TYPE_CHECKING and __all__ name the same things for editors, type checkers and help(vaekit); a test keeps the three
# in step.
_EXPORTS = {
    "config": ["PRESETS", "Config", "DataConfig", "ModelConfig", "TrainConfig", "make_config"],
    "data": ["Dataset", "Split", "load_data"],
    "errors": ["VaekitError"],
    "importance": ["log_likelihood"],
    "likelihoods": ["DiscreteLikelihood", "Likelihood"],
    "model": ["VAE", "log_weights", "objective"],
    "optim": ["pick_device"],
    "plots": ["plot"],
    "run": ["Run", "load", "load_config", "open_run", "read_metrics"],
    "training": ["Interrupted", "resume", "train"],
    "uses.compression": ["compress", "decompress"],
    "uses.detector": ["AnomalyDetector"],
    "uses.evaluation": ["Evaluation", "estimate", "evaluate"],
    "uses.generation": ["decode", "encode", "interpolate", "manifold", "reconstruct", "sample"],
    "uses.report": ["report"],
}

if TYPE_CHECKING:
    from .config import PRESETS, Config, DataConfig, ModelConfig, TrainConfig, make_config
    from .data import Dataset, Split, load_data
    from .errors import VaekitError
    from .importance import log_likelihood
    from .likelihoods import DiscreteLikelihood, Likelihood
    from .model import VAE, log_weights, objective
    from .optim import pick_device
    from .plots import plot
    from .run import Run, load, load_config, open_run, read_metrics
    from .training import Interrupted, resume, train
    from .uses.compression import compress, decompress
    from .uses.detector import AnomalyDetector
    from .uses.evaluation import Evaluation, estimate, evaluate
    from .uses.generation import decode, encode, interpolate, manifold, reconstruct, sample
    from .uses.report import report

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "AnomalyDetector",
    "compress",
    "Config",
    "DataConfig",
    "Dataset",
    "decode",
    "decompress",
    "DiscreteLikelihood",
    "encode",
    "estimate",
    "evaluate",
    "Evaluation",
    "interpolate",
    "Interrupted",
    "Likelihood",
    "load",
    "load_config",
    "load_data",
    "log_likelihood",
    "log_weights",
    "make_config",
    "manifold",
    "ModelConfig",
    "objective",
    "open_run",
    "pick_device",
    "plot",
    "PRESETS",
    "read_metrics",
    "reconstruct",
    "report",
    "resume",
    "Run",
    "sample",
    "Split",
    "train",
    "TrainConfig",
    "VAE",
    "VaekitError",
]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        value = globals()[name] = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        return value
    raise AttributeError(f"module 'vaekit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
