"""What training runs on: the device, and the optimizer and learning-rate scheduler that a configuration names."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from .config import TrainConfig
from .errors import VaekitError, first_line
from .model import VAE


def pick_device(name: str) -> torch.device:
    """The training device: 'auto' takes cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise VaekitError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaekitError("device 'cuda' requested but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise VaekitError(f"device '{name}' requested but there are {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise VaekitError("device 'mps' requested but MPS is not available")
    return device


# Classes the loop cannot drive: they need a closure, sparse gradients, a metric, functions or other schedulers.
UNSUPPORTED = {
    "LBFGS",
    "SparseAdam",
    "Muon",
    "ReduceLROnPlateau",
    "ChainedScheduler",
    "SequentialLR",
    "LambdaLR",
    "MultiplicativeLR",
}


def _by_name(module: Any, name: str, base: type, key: str) -> type:
    """The class called name (any capitalisation) in a torch module, checked to derive from base."""
    classes = {
        n: c
        for n, c in vars(module).items()
        if isinstance(c, type) and issubclass(c, base) and c is not base and n not in UNSUPPORTED and n[0] != "_"
    }
    found = {n.lower(): c for n, c in classes.items()}.get(name.lower())
    if found is None:
        raise VaekitError(f"unknown {key} '{name}' (allowed: {', '.join(sorted(classes))})")
    return found


def burda_schedule(epoch: int) -> float:
    """Burda et al.'s learning-rate factor after `epoch` passes: 10^(-i/7) during the 3^i passes of stage i."""
    stage, end = 0, 1
    while epoch >= end and stage < 7:
        stage += 1
        end += 3**stage
    return 10 ** (-stage / 7)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate scheduler cfg names, attached to optimizer."""
    schedulers = torch.optim.lr_scheduler
    if cfg.scheduler == "burda":
        return schedulers.LambdaLR(optimizer, burda_schedule, **cfg.scheduler_args)
    cls = _by_name(schedulers, cfg.scheduler, schedulers.LRScheduler, "train.scheduler")
    return cls(optimizer, **cfg.scheduler_args)


def make_optimizer(cfg: TrainConfig, model: VAE, device: torch.device):
    """The optimizer and learning-rate scheduler (or None) that cfg names, with their arguments."""
    cls = _by_name(torch.optim, cfg.optimizer, torch.optim.Optimizer, "train.optimizer")
    args = dict(cfg.optimizer_args)
    # The fused kernel is the same update in one pass over the parameters: on a CPU it halves the Adam step time.
    fusable = "fused" in inspect.signature(cls).parameters and device.type in ("cpu", "cuda")
    if fusable and not (args.get("foreach") or args.get("differentiable")):
        args.setdefault("fused", True)
    try:
        optimizer = cls(model.parameters(), lr=cfg.lr, **args)
        # Some optimizer arguments only fail at the first step (a flag of the wrong type, a malformed tuple): one
        # step on a stand-in parameter finds them before the run directory exists.
        stand_in = torch.zeros(2, device=device, requires_grad=True)
        stand_in.grad = torch.ones_like(stand_in)
        cls([stand_in], lr=cfg.lr, **args).step()
        if not cfg.scheduler:
            return optimizer, None
        # Some scheduler arguments only fail when stepped (a OneCycleLR too short for the run, a step size of the
        # wrong type): a rehearsal of the whole run on a stand-in optimizer finds them before any training.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rehearsal = _scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr), cfg)
            for _ in range(cfg.epochs):
                rehearsal.step()
        return optimizer, _scheduler(optimizer, cfg)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, ZeroDivisionError) as e:
        what, given = cfg.optimizer, f"train.optimizer_args = {cfg.optimizer_args}"
        if cfg.scheduler:
            what, given = f"{what} and {cfg.scheduler}", f"{given} and train.scheduler_args = {cfg.scheduler_args}"
        # The first line only: torch lists the signatures after it.
        raise VaekitError(f"cannot build {what} from {given}: {first_line(e)}") from None
