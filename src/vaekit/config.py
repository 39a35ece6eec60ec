"""Configuration as plain data: dataclasses, presets, TOML in and out, overrides and validation."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import VaekitError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@dataclass
class DataConfig:
    """Where the data comes from and how it is prepared."""

    name: str = "digits"  # a built-in source, or a path to a .npy/.npz file or an image folder
    root: str = ""  # where downloadable sources live; "" means the user cache directory
    download: bool = True  # fetch missing files of downloadable sources from the web
    binarize: bool = False  # dynamic binarisation: a fresh Bernoulli sample of each training image every epoch
    image_size: int = 28  # image folders are resized to this height and width
    channels: int = 0  # image folders: 1 (grey) or 3 (RGB); 0 picks 3 if any image has colour
    test_fraction: float = 0.2  # held-out fraction for sources that come without a test split
    validation: int = 0  # training examples held out (a fixed random choice) as the 'valid' split
    classes: list[int] = field(default_factory=list)  # train only on these labels (one-class); [] means all
    label_column: str = ""  # tables: the CSV column holding labels, which is not a feature
    one_hot: bool = False  # tables: one-hot encode text columns instead of refusing them
    memory_map: str = "auto"  # a float32 .npy file read from disk as batches need it: on, off, or auto (see README)


@dataclass
class ModelConfig:
    """The VAE's networks and likelihood; the input shape comes from the data."""

    net: str = "mlp"  # mlp, or conv for images (C, H, W)
    hidden: list[int] = field(default_factory=lambda: [256])  # dense layers (after the convolutions for conv)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # conv only: stride-2 convolution widths
    latent: int = 2
    hidden2: list[int] = field(default_factory=list)  # a second stochastic layer: the dense layers around it
    latent2: int = 0  # its size; 0 means one stochastic layer
    activation: str = "relu"
    likelihood: str = "bernoulli"  # bernoulli, gaussian or logistic-mixture
    variance: str = "global"  # gaussian only: fixed, global (one learned value) or per-dim (learned per dimension)
    sigma: float = 0.1  # gaussian only: the fixed standard deviation, or the initial one when learned
    mixtures: int = 5  # logistic-mixture only: components per sub-pixel


@dataclass
class TrainConfig:
    """The optimisation: the objective, summed over each batch, minimised by a torch optimizer."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 1
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    eval_batch_size: int = 1000
    objective: str = "elbo"  # elbo (averaged over k draws) or iwae (the k-sample importance-weighted bound)
    k: int = 1  # posterior draws per example
    beta: float = 1.0  # weight of the KL term (beta-VAE)
    warmup: int = 0  # epochs over which the KL weight rises linearly from 0 to beta
    free_bits: float = 0.0  # nats per latent dimension below which the (batch-mean) KL is not penalised
    optimizer: str = "Adam"  # any torch.optim class, by name
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # its keyword arguments besides lr
    scheduler: str = ""  # "", burda, or any torch.optim.lr_scheduler class by name; stepped once per epoch
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    clip_grad: float = 0.0  # maximum gradient norm; 0 means no clipping
    checkpoint_every: int = 1000  # steps between checkpoints, besides the one at each epoch's end; 0: epoch ends only
    keep_checkpoints: int = 2  # the newest checkpoints kept in RUN/checkpoints
    patience: int = 0  # early stopping: epochs without a lower validation loss before training stops; 0: off
    skip_limit: int = 20  # updates with a non-finite loss or gradient are skipped; this many in a row stop the run
    compile: str = "auto"  # the step through torch.compile: on, off, or auto (on for runs of 50,000 steps or more)
    precision: str = "fp32"  # fp32, or bf16: the networks under bfloat16 autocast, the likelihood and ELBO in fp32
    tensorboard: bool = False  # also log losses, KL per dimension and images to RUN/tensorboard (vaekit[tensorboard])


@dataclass
class Config:
    """A complete, resolved training configuration."""

    preset: str = "digits"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as nested plain dictionaries."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The configuration as TOML text."""
        return tomli_w.dumps(self.to_dict())


# Burda et al.'s data and schedule: dynamically binarised MNIST with 400 training images held out for validation,
# batch 20, Adam (beta2 0.999, eps 1e-4), 3^i passes at lr 0.001 * 10^(-i/7) for i = 0..7 (3,280 passes).
_BURDA: dict[str, Any] = {
    "data": {"name": "mnist", "binarize": True, "validation": 400},
    "train": {
        "epochs": 3280,
        "batch_size": 20,
        "lr": 1e-3,
        "optimizer": "Adam",
        "optimizer_args": {"betas": [0.9, 0.999], "eps": 1e-4},
        "scheduler": "burda",
    },
}

PRESETS: dict[str, dict[str, Any]] = {
    # The quick-start job: the seed VAE on scikit-learn's bundled 8x8 digits, which needs no download.
    "digits": {
        "data": {"name": "digits"},
        "model": {"hidden": [256], "latent": 2},
        "train": {"epochs": 150, "batch_size": 64, "lr": 1e-3},
    },
    # The classic tutorial VAE exactly: MNIST, 784-256-2 ReLU MLP, Bernoulli decoder, Adam 1e-3, batch 64, 10 epochs.
    "seed": {
        "data": {"name": "mnist"},
        "model": {"hidden": [256], "latent": 2, "activation": "relu", "likelihood": "bernoulli"},
        "train": {"epochs": 10, "batch_size": 64, "lr": 1e-3, "seed": 1},
    },
    # The seed's model and data, trained to the tutorial's 10-epoch test loss (154.8 nats) in the least time on two CPU
    # cores: batch 128 and a learning rate 12 times the seed's, decaying linearly to a fifth of it by the last of 5
    # epochs (chosen by measurement: benchmarks/seed_speed.py, README "Speed").
    "fast": {
        "data": {"name": "mnist"},
        "model": {"hidden": [256], "latent": 2, "activation": "relu", "likelihood": "bernoulli"},
        "train": {
            "epochs": 5,
            "batch_size": 128,
            "lr": 1.2e-2,
            "seed": 1,
            "scheduler": "LinearLR",
            "scheduler_args": {"start_factor": 1.0, "end_factor": 0.2, "total_iters": 4},
        },
    },
    # Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders", section 5 and appendix: one stochastic
    # layer, 784-200-200-50 tanh. Choose objective = elbo or iwae and k with --objective/--k.
    "iwae-1l": {
        **_BURDA,
        "model": {"hidden": [200, 200], "latent": 50, "activation": "tanh", "likelihood": "bernoulli"},
    },
    # The same paper's two-stochastic-layer model: 784-[200,200]-100-[100,100]-50, tanh.
    "iwae-2l": {
        **_BURDA,
        "model": {
            "hidden": [200, 200],
            "latent": 100,
            "hidden2": [100, 100],
            "latent2": 50,
            "activation": "tanh",
            "likelihood": "bernoulli",
        },
    },
    # Defaults for data named without a preset (`vaekit train --data X`): one preset per kind of data, chosen by
    # `data_preset`; runs trained with them are named after their data.
    "mnist-like": {
        "data": {"name": "mnist"},
        "model": {"hidden": [512], "latent": 16},
        "train": {"epochs": 20},
    },
    "images": {"model": {"net": "conv", "channels": [32, 64], "hidden": [256], "latent": 16}, "train": {"epochs": 30}},
    "arrays": {"model": {"hidden": [512], "latent": 16}, "train": {"epochs": 30}},
    "table": {"model": {"hidden": [128], "latent": 4, "likelihood": "gaussian"}, "train": {"epochs": 50}},
    # Models for `vaekit compress` (see README: "Compression"). Static binarised MNIST, whose standard split holds
    # out 10,000 validation images; early stopping on them, as the static binarisation overfits.
    "compression": {
        "data": {"name": "binarized-mnist"},
        "model": {"hidden": [500, 500], "latent": 40, "likelihood": "bernoulli"},
        "train": {"epochs": 50, "batch_size": 100, "patience": 10},
    },
    # 8-bit MNIST: a convolutional VAE with a mixture of five discretised logistics per pixel.
    "compression-8bit": {
        "data": {"name": "mnist", "validation": 5000},
        "model": {"net": "conv", "channels": [32, 64], "hidden": [512], "latent": 32, "likelihood": "logistic-mixture"},
        "train": {"epochs": 14, "batch_size": 100, "patience": 5},
    },
}

_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check one value against the type of its default, converting ints to floats where a float is wanted."""
    if isinstance(value, str) and not isinstance(default, str):
        # Text from the command line ('5', '[512, 256]', 'true') is read as a TOML value.
        with contextlib.suppress(tomllib.TOMLDecodeError):
            value = tomllib.loads(f"v = {value}")["v"]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif isinstance(default, dict):
        ok = isinstance(value, dict) and all(isinstance(v, (bool, int, float, str, list)) for v in value.values())
    else:
        ok = isinstance(value, str)
    if not ok:
        raise VaekitError(f"config key '{key}' must be {type(default).__name__}, got {value!r}")
    return value


def _merge(cfg: Config, updates: dict[str, Any]) -> None:
    """Apply nested {section: {key: value}} updates to cfg in place, rejecting unknown keys."""
    for section, values in updates.items():
        if section == "preset":
            cfg.preset = _coerce("preset", values, "")
            continue
        if section not in _SECTIONS:
            raise VaekitError(f"unknown config section '{section}' (allowed: {', '.join(['preset', *_SECTIONS])})")
        if not isinstance(values, dict):
            raise VaekitError(f"config section '{section}' must be a table of keys")
        target = getattr(cfg, section)
        allowed = [f.name for f in dataclasses.fields(target)]
        for key, value in values.items():
            if key not in allowed:
                raise VaekitError(f"unknown config key '{section}.{key}' (allowed: {', '.join(allowed)})")
            setattr(target, key, _coerce(f"{section}.{key}", value, getattr(target, key)))


def preset(name: str) -> Config:
    """The configuration of a named preset."""
    if name not in PRESETS:
        raise VaekitError(f"unknown preset '{name}' (available: {', '.join(PRESETS)})")
    cfg = Config(preset=name)
    _merge(cfg, copy.deepcopy(PRESETS[name]))  # the presets themselves must never change
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    """A validated Config from nested dictionaries such as a run's config.toml (missing keys keep defaults)."""
    cfg = Config()
    _merge(cfg, raw)
    validate(cfg)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file into nested dictionaries, with user-facing errors."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VaekitError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise VaekitError(f"cannot read config file {path}: {e}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """Split 'section.key=value' into a dotted key and the value as text (typed later by the key's type)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise VaekitError(f"override '{text}' must look like section.key=value, e.g. train.epochs=5")
    return key.strip(), raw


def _dotted(key: str) -> str:
    """The full 'section.key' name of a key given either in full or by its unique short name ('data' is data.name)."""
    if "." in key:
        return key
    if key == "data":
        return "data.name"
    owners = [s for s, cls in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) > 1:
        raise VaekitError(f"config key '{key}' is ambiguous: say {' or '.join(f'{o}.{key}' for o in owners)}")
    if not owners:
        raise VaekitError(f"unknown config key '{key}' (use section.key, with sections {', '.join(_SECTIONS)})")
    return f"{owners[0]}.{key}"


def override(cfg: Config, overrides: dict[str, Any] | None = None) -> Config:
    """A validated copy of cfg with overrides ('section.key' or a unique short key such as 'epochs') applied."""
    cfg = copy.deepcopy(cfg)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in (overrides or {}).items():
        section, _, name = _dotted(key).partition(".")
        nested.setdefault(section, {})[name] = value
    _merge(cfg, nested)
    validate(cfg)
    return cfg


DATA_PRESETS = ("mnist-like", "images", "arrays", "table")  # presets that name their runs after the data


def data_preset(name: str) -> str:
    """The preset for data named without one: digits for the digits, mnist-like for the other built-in sets, and
    images, arrays or table for a folder, a .npy/.npz file or a CSV file."""
    if name == "digits":
        return "digits"
    if name in ("mnist", "fashion-mnist", "kmnist", "binarized-mnist"):
        return "mnist-like"
    suffix = Path(name).suffix.lower()
    return {".csv": "table", ".npy": "arrays", ".npz": "arrays"}.get(suffix, "images")


def run_name(cfg: Config) -> str:
    """What a new run of cfg is named after: its preset, or its data for the presets chosen by the data."""
    if cfg.preset not in DATA_PRESETS:
        return cfg.preset
    path = Path(cfg.data.name)
    stem = path.stem if path.suffix.lower() in (".npy", ".npz", ".csv") else path.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".") or cfg.preset


def make_config(
    preset_name: str | None = None,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Resolve a configuration: the preset (or the file's own preset), then the file, then the overrides."""
    from_file = read_toml(file) if file is not None else {}
    data = {**from_file.get("data", {}), **{_dotted(k): v for k, v in (overrides or {}).items()}}
    named = data.get("data.name", data.get("name"))
    name = preset_name or from_file.get("preset") or (data_preset(named) if isinstance(named, str) else "digits")
    cfg = preset(_coerce("preset", name, ""))
    _merge(cfg, from_file)
    cfg.preset = name
    cfg = override(cfg, overrides)
    # Tables are standardised, so they take a Gaussian with a learned deviation unless a likelihood was chosen.
    chosen = [PRESETS[name].get("model", {}), from_file.get("model", {}), {_dotted(k) for k in overrides or {}}]
    if cfg.data.name.lower().endswith(".csv") and not any("likelihood" in c or "model.likelihood" in c for c in chosen):
        cfg.model.likelihood = "gaussian"
    return cfg


# Layer widths, latent sizes and batch sizes beyond this cannot be allocated on any current machine.
MAX_SIZE = 2**24
SIZE, SIZES = "an integer from 1 to 2**24", "integers from 1 to 2**24"


def validate(cfg: Config) -> None:
    """Reject values that cannot work, naming the key and what is allowed."""
    checks = [
        ("train.epochs", 1 <= cfg.train.epochs <= 10**9, "an integer from 1 to 10**9"),
        ("train.batch_size", 1 <= cfg.train.batch_size <= MAX_SIZE, SIZE),
        ("train.eval_batch_size", 1 <= cfg.train.eval_batch_size <= MAX_SIZE, SIZE),
        ("train.lr", 0 < cfg.train.lr < math.inf, "a finite number > 0"),
        ("train.seed", 0 <= cfg.train.seed < 2**63, "an integer from 0 to 2**63 - 1"),
        ("model.latent", 1 <= cfg.model.latent <= MAX_SIZE, SIZE),
        ("model.hidden", all(1 <= h <= MAX_SIZE for h in cfg.model.hidden), f"a list of {SIZES}"),
        ("model.hidden2", all(1 <= h <= MAX_SIZE for h in cfg.model.hidden2), f"a list of {SIZES}"),
        ("model.latent2", 0 <= cfg.model.latent2 <= MAX_SIZE, "an integer from 0 (one stochastic layer) to 2**24"),
        (
            "model.channels",
            len(cfg.model.channels) >= 1 and all(1 <= c <= MAX_SIZE for c in cfg.model.channels),
            f"a non-empty list of {SIZES}",
        ),
        ("model.net", cfg.model.net in ("mlp", "conv"), "mlp or conv"),
        ("model.variance", cfg.model.variance in ("fixed", "global", "per-dim"), "fixed, global or per-dim"),
        ("model.sigma", 0 < cfg.model.sigma < math.inf, "a finite number > 0"),
        ("model.mixtures", 1 <= cfg.model.mixtures <= 1024, "an integer from 1 to 1024"),
        ("train.objective", cfg.train.objective in ("elbo", "iwae"), "elbo or iwae"),
        ("train.k", 1 <= cfg.train.k <= MAX_SIZE, SIZE),
        ("train.beta", 0 <= cfg.train.beta < math.inf, "a finite number >= 0"),
        ("train.warmup", cfg.train.warmup >= 0, "an integer >= 0"),
        ("train.free_bits", 0 <= cfg.train.free_bits < math.inf, "a finite number >= 0"),
        (
            "train.free_bits",
            cfg.train.objective == "elbo" or cfg.train.free_bits == 0,
            "0 with objective iwae (inside importance weights it would no longer give a bound)",
        ),
        ("train.clip_grad", 0 <= cfg.train.clip_grad < math.inf, "a finite number >= 0 (0: no clipping)"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 0, "an integer >= 0 (0: at epoch ends only)"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "an integer >= 1"),
        ("train.patience", cfg.train.patience >= 0, "an integer >= 0 (0: no early stopping)"),
        ("train.skip_limit", cfg.train.skip_limit >= 1, "an integer >= 1"),
        ("train.compile", cfg.train.compile in ("auto", "on", "off"), "auto, on or off"),
        ("train.precision", cfg.train.precision in ("fp32", "bf16"), "fp32 or bf16"),
        ("data.validation", cfg.data.validation >= 0, "an integer >= 0"),
        ("data.image_size", 1 <= cfg.data.image_size <= 4096, "an integer from 1 to 4096"),
        ("data.channels", cfg.data.channels in (0, 1, 3), "0 (auto), 1 or 3"),
        ("data.test_fraction", 0 < cfg.data.test_fraction < 1, "a number between 0 and 1"),
        ("data.classes", all(c >= 0 for c in cfg.data.classes), "a list of labels >= 0 ([] for all)"),
        ("data.memory_map", cfg.data.memory_map in ("auto", "on", "off"), "auto, on or off"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise VaekitError(f"invalid value {value!r} for '{key}': must be {allowed}")
