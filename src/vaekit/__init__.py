"""vaekit: variational auto-encoders as tools: train, measure, look at and use them."""

import importlib
from typing import Any

__version__ = "0.1.0"

# Names are imported on first use, so that `vaekit --help` and `import vaekit` do not wait for torch.
_EXPORTS = {
    "config": ["PRESETS", "Config", "DataConfig", "ModelConfig", "TrainConfig", "make_config"],
    "data": ["Dataset", "Split", "load_data"],
    "errors": ["VaekitError"],
    "evaluation": ["Evaluation", "estimate"],
    "model": ["VAE"],
    "rundir": ["load", "load_config", "read_metrics"],
    "training": ["Interrupted", "Run", "pick_device", "resume", "train"],
    "uses": ["decode", "encode", "evaluate", "interpolate", "manifold", "plot", "reconstruct", "sample"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = globals()[name] = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        return value
    raise AttributeError(f"module 'vaekit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
