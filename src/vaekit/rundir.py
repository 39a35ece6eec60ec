"""The run directory: config, weights with their description, metrics; every file written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import Config, from_dict, read_toml
from .errors import VaekitError
from .model import VAE

CONFIG, WEIGHTS, DESCRIPTION, METRICS, PLOTS, BEST = (
    "config.toml",
    "model.safetensors",
    "model.json",
    "metrics.jsonl",
    "plots",
    "best",  # the model of the epoch with the lowest validation loss, as a run directory of its own
)
FORMAT = "vaekit-model"


def _umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside path; on success it is renamed to path, on failure removed."""
    path = Path(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        # mkstemp makes the file private (0600); outputs get the usual permissions that the umask allows.
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise VaekitError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise VaekitError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def check_writable(*paths: str | Path | None) -> None:
    """Refuse output paths that name a folder, a device or anything else that is not a regular file."""
    for path in paths:
        if path is not None and Path(path).exists() and not Path(path).is_file():
            raise VaekitError(f"cannot write {path}: it exists and is not a regular file")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write text to path atomically."""
    write_bytes(path, text.encode("utf-8"))


def save_model(model: VAE, run_dir: str | Path) -> None:
    """Write the model's weights (safetensors) and the description that rebuilds it (JSON)."""
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(run_dir / WEIGHTS, save(state))
    description = {"format": FORMAT, "version": 1, "shape": list(model.shape), "model": asdict(model.config)}
    write_text(run_dir / DESCRIPTION, json.dumps(description, indent=2) + "\n")


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> VAE:
    """Rebuild a trained model from a run directory, without unpickling anything."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VaekitError(f"run directory not found: {run_dir}")
    desc_path, weights_path = run_dir / DESCRIPTION, run_dir / WEIGHTS
    try:
        desc = json.loads(desc_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VaekitError(f"{run_dir} is not a vaekit run: {DESCRIPTION} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VaekitError(f"cannot read {desc_path}: {e}") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise VaekitError(f"{desc_path} is not a vaekit model description")
    try:
        shape = tuple(int(s) for s in desc["shape"])
        if not shape or min(shape) < 1:
            raise ValueError(f"bad shape {shape}")
        config = from_dict({"model": desc["model"]}).model
    except (KeyError, TypeError, ValueError) as e:
        raise VaekitError(f"{desc_path} is incomplete or malformed ({e})") from None
    model = VAE(shape, config)
    try:
        state = load_file(weights_path)
    except FileNotFoundError:
        raise VaekitError(f"{run_dir} has no {WEIGHTS}") from None
    except (SafetensorError, OSError) as e:
        raise VaekitError(f"{weights_path} is not a valid safetensors file ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise VaekitError(f"{weights_path} does not hold weights for the model {DESCRIPTION} describes") from None
    return model.to(device).eval()


def load_config(run_dir: str | Path) -> Config:
    """The resolved training configuration saved in a run directory."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise VaekitError(f"{run_dir} is not a vaekit run: {CONFIG} is missing")
    raw = read_toml(path)
    # Keys added in later versions may be missing and take their defaults; these were always written.
    for key in ("data.name", "model.latent", "model.hidden", "train.epochs", "train.seed"):
        section, name = key.split(".")
        if not isinstance(raw.get(section), dict) or name not in raw[section]:
            raise VaekitError(f"{path} is incomplete: it has no '{key}', which every run's {CONFIG} records")
    return from_dict(raw)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (an empty list if it has none yet)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VaekitError(f"cannot read {path}: {e}") from None
    for r in rows:
        # A loss is null where it was not finite (an epoch without updates, or diverged weights).
        if not (
            isinstance(r, dict)
            and all(isinstance(r.get(k), (int, float)) for k in ("epoch", "seconds"))
            and all(isinstance(r.get(k, 0), (int, float, type(None))) for k in ("train_loss", "test_loss"))
        ):
            raise VaekitError(f"{path} has lines without numeric epoch and seconds, or with non-numeric losses")
    return rows
