"""Training checkpoints: all a run needs to continue exactly, as one safetensors file with JSON metadata.

A checkpoint holds the model's weights, the optimizer's state, every random-number state (torch, the device's, the
data-order generator's, NumPy's and Python's), the current epoch's data order and the position in it. Files are
written atomically and never unpickled; the learning-rate scheduler is rebuilt by replaying its epochs.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import VaekitError, first_line
from .files import write_bytes, written_here
from .run import ARTIFACTS

CHECKPOINTS = ARTIFACTS["checkpoints"]
FORMAT = "vaekit-checkpoint"
_NAME = re.compile(r"step-(\d+)\.safetensors")


@dataclass
class Progress:
    """Where training stands, besides the model, optimizer and random states."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch
    global_step: int = 0  # steps completed in all, skipped ones included
    order: torch.Tensor | None = None  # the current epoch's order of the training examples
    total: torch.Tensor | None = None  # the current epoch's summed training loss so far
    used: int = 0  # examples in the current epoch's updates so far (skipped batches are not counted)
    skipped: int = 0  # updates skipped in the current epoch because of a non-finite loss or gradient
    bad: int = 0  # consecutive skipped updates
    seconds: float = 0.0  # time spent on the current epoch so far
    best_loss: float = math.inf  # the lowest validation loss so far
    best_epoch: int = 0  # the epoch that reached it
    stopped: bool = False  # early stopping ended the run
    metrics: list[dict[str, Any]] = field(default_factory=list)


_TENSORS = ("order", "total")


def path_for(run_dir: Path, global_step: int) -> Path:
    """The checkpoint file of a run after global_step steps."""
    return run_dir / CHECKPOINTS / f"step-{global_step:010d}.safetensors"


def listing(run_dir: str | Path) -> list[Path]:
    """A run's checkpoint files, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = [p for p in folder.glob("step-*.safetensors") if _NAME.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name)[1]))  # type: ignore[index]


def _rng_states(device: torch.device, shuffle: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The random states as tensors (torch's) and plain data (NumPy's, Python's)."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.shuffle": shuffle.get_state()}
    if device.type == "cuda":
        tensors["rng.device"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        tensors["rng.device"] = torch.mps.get_rng_state()
    name, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, state, next_gauss = random.getstate()
    plain = {"numpy": [name, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(state), next_gauss]}
    return tensors, plain


def _set_rng_states(device: torch.device, shuffle: torch.Generator, tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    shuffle.set_state(tensors["rng.shuffle"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.device"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(tensors["rng.device"])
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, next_gauss = plain["python"]
    random.setstate((version, tuple(state), next_gauss))


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    shuffle: torch.Generator,
    progress: Progress,
    identity: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint of the training state atomically, then remove all but the newest keep.

    identity (the settings and a fingerprint of the data) must match when the checkpoint is loaded again.
    """
    device = next(model.parameters()).device
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    plain_state: dict[str, dict[str, Any]] = {}
    for i, values in opt["state"].items():
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{i}.{k}"] = v
            else:
                plain_state.setdefault(str(i), {})[k] = v
    rng_tensors, rng_plain = _rng_states(device, shuffle)
    tensors.update(rng_tensors)
    tensors.update({f"progress.{k}": getattr(progress, k) for k in _TENSORS if getattr(progress, k) is not None})
    scalars = {k: v for k, v in asdict(progress).items() if k not in _TENSORS}
    meta = {
        "format": FORMAT,
        "version": 1,
        "device": device.type,
        "identity": identity,
        "progress": scalars,
        "optimizer": {"param_groups": opt["param_groups"], "state": plain_state},
        "rng": rng_plain,
    }
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"vaekit": json.dumps(meta)})
    path = path_for(run_dir, progress.global_step)
    write_bytes(path, blob)
    # Temporary files of saves cut short by a kill are left over too.
    # A file the run did not write (the user's, named like a checkpoint) is passed by.
    old = [p for p in listing(run_dir)[:-keep] if written_here(p)]
    for stale in [*old, *path.parent.glob(".step-*.tmp.safetensors")]:
        stale.unlink(missing_ok=True)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a checkpoint file, refusing anything that is not one (nothing is unpickled)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("vaekit", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except FileNotFoundError:
        raise VaekitError(f"checkpoint not found: {path}") from None
    except (SafetensorError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VaekitError(f"{path} is not a vaekit checkpoint (not a valid safetensors file: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VaekitError(f"{path} is a safetensors file but not a vaekit checkpoint")
    # Training never keeps a non-finite update, so a NaN or infinity here is damage, found before anything runs.
    damaged = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if damaged is not None:
        raise VaekitError(f"{path} is damaged: its {damaged} holds NaN or infinite values")
    return tensors, meta


def _progress(meta: dict[str, Any], tensors: dict[str, torch.Tensor], n: int, steps: int) -> Progress:
    """The progress a checkpoint records, checked to be a consistent position in an epoch of n examples."""
    raw = meta["progress"]
    if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(Progress)} - set(_TENSORS):
        raise ValueError("the progress record is incomplete")
    p = Progress(**raw)
    for f in fields(Progress):
        value, default = getattr(p, f.name), getattr(Progress(), f.name)
        if f.name in _TENSORS:
            continue
        if isinstance(default, (bool, list)):
            ok = isinstance(value, type(default))
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"progress.{f.name} is {value!r}")
    if not all(isinstance(m, dict) for m in p.metrics) or len(p.metrics) != p.epoch or p.step > steps:
        raise ValueError("the epoch, step and metrics do not agree")
    if p.step:
        order, total = tensors.get("progress.order"), tensors.get("progress.total")
        if order is None or order.dtype != torch.int64 or not torch.equal(order.sort().values, torch.arange(n)):
            raise ValueError(f"the data order is not a permutation of the {n} training examples")
        if total is None or total.shape != () or not total.dtype.is_floating_point:
            raise ValueError("the epoch's running loss is missing")
        p.order, p.total = order, total
    return p


def _difference(expected: Any, found: Any, key: str = "") -> str | None:
    """The first key at which two nested dictionaries differ, or None when they are equal."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for k in [*expected, *(k for k in found if k not in expected)]:
            d = _difference(expected.get(k), found.get(k), f"{key}.{k}" if key else k)
            if d:
                return d
        return None
    return None if expected == found else f"{key} ({found!r} then, {expected!r} now)"


def _unmoved(identity: dict[str, Any], found: Any) -> dict[str, Any]:
    """identity with the data file's or folder's former path where only its place changed (resume --data-dir): the
    same name in another folder; that the content is the same, the data's SHA-256s check."""
    try:
        then, now = found["settings"]["data"]["name"], identity["settings"]["data"]["name"]
    except (KeyError, TypeError):
        return identity
    if not (isinstance(then, str) and then != now and Path(then).name == Path(now).name and Path(now).is_absolute()):
        return identity
    moved = copy.deepcopy(identity)
    moved["settings"]["data"]["name"] = then
    return moved


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    shuffle: torch.Generator,
    identity: dict[str, Any],
    steps: int,
) -> Progress:
    """Restore a checkpoint's training state into freshly built objects and return the progress it records.

    The checkpoint must have been made with the same identity (settings and data) and a data set of steps batches.
    """
    tensors, meta = _read(path)
    device = next(model.parameters()).device
    if meta.get("device") != device.type:
        raise VaekitError(
            f"{path} was written on a {meta.get('device')} device and this run now trains on {device.type}: its random "
            "states only fit the device they came from, so resume it where it ran"
        )
    differs = _difference(_unmoved(identity, meta.get("identity")), meta.get("identity"))
    if differs:
        raise VaekitError(f"{path} was made with other settings or data: {differs}; resuming needs the same ones")
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        progress = _progress(meta, tensors, identity["data"]["train"][0], steps)
        for k in _TENSORS:
            if getattr(progress, k) is not None:
                setattr(progress, k, getattr(progress, k).to(device))
        if scheduler is not None:
            # A scheduler's state is a function of how many epochs it has stepped, so replaying them restores it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(progress.epoch):
                    scheduler.step()
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        for i, values in meta["optimizer"]["state"].items():
            state.setdefault(int(i), {}).update(values)
        # JSON turns tuples (Adam's betas) into lists: give each value the type the fresh optimizer uses.
        fresh = optimizer.state_dict()["param_groups"]
        groups = [
            {k: type(g0[k])(v) if isinstance(g0.get(k), tuple) else v for k, v in g.items()}
            for g, g0 in zip(meta["optimizer"]["param_groups"], fresh, strict=True)
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        _set_rng_states(device, shuffle, tensors, meta["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise VaekitError(f"{path} does not hold a training state of this run ({first_line(e)})") from None
    return progress
