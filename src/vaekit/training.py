"""The training loop: the data set as one tensor on the device, batches by indexing, a checkpoint every epoch."""

from __future__ import annotations

import inspect
import json
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import likelihoods, nets
from .config import Config, TrainConfig, make_config, override
from .data import SOURCES, Dataset, load_data
from .errors import VaekitError
from .evaluation import mean_loss
from .model import VAE, objective
from .rundir import CONFIG, DESCRIPTION, METRICS, save_model, write_text


@dataclass
class Run:
    """The result of training: where it was saved, how it was configured, the model and its per-epoch metrics."""

    dir: Path
    config: Config
    model: VAE
    data: Dataset
    metrics: list[dict[str, Any]] = field(default_factory=list)


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
        raise VaekitError(f"cannot build {what} from {given}: {e}") from None


def _run_dir(out: str | Path | None, cfg: Config) -> Path:
    """A fresh directory for this run; an existing run is never overwritten."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.preset}-{stamp}"
        n = 1
        while out.exists():
            n += 1
            out = Path("runs") / f"{cfg.preset}-{stamp}-{n}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VaekitError(f"--out {out} is a file, not a directory")
    if (out / DESCRIPTION).exists():
        raise VaekitError(f"{out} already holds a run; pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VaekitError(f"cannot create the run directory {out}: {e.strerror or e}") from None
    return out


def train(
    config: Config | str = "digits",
    out: str | Path | None = None,
    *,
    dataset: Dataset | None = None,
    verbose: bool = True,
    **overrides: Any,
) -> Run:
    """Train a VAE from a preset name or a Config, with overrides such as epochs=5, and save it as a run directory."""
    cfg = make_config(config, overrides=overrides) if isinstance(config, str) else override(config, overrides)
    # Names are checked before the data is loaded, which can take a while.
    nets.activation(cfg.model.activation)
    likelihoods.get(cfg.model.likelihood)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = dataset if dataset is not None else load_data(cfg.data)
    # The run records absolute paths so that later commands find its data from any directory.
    if cfg.data.name not in SOURCES and Path(cfg.data.name).expanduser().exists():
        cfg.data.name = str(Path(cfg.data.name).expanduser().resolve())
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.data.channels == 0 and Path(cfg.data.name).is_dir():
        cfg.data.channels = data.shape[0]

    x_train = data.split("train").x.to(device)
    held_out = {name: s.x.to(device) for name, s in data.splits.items() if name in ("valid", "test")}
    model = VAE(data.shape, cfg.model).to(device)
    optimizer, scheduler = make_optimizer(cfg.train, model, device)
    run_dir = _run_dir(out, cfg)
    write_text(run_dir / CONFIG, cfg.to_toml())
    say = print if verbose else (lambda *a, **k: None)
    say(f"run directory: {run_dir}")
    t = cfg.train
    shuffle = torch.Generator(device).manual_seed(t.seed)
    n, bs = len(x_train), t.batch_size
    steps = (n + bs - 1) // bs
    metrics: list[dict[str, Any]] = []
    report_every = max(1, t.epochs // 15)  # every epoch for short runs, about 15 lines for long ones

    for epoch in range(1, t.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, device=device, generator=shuffle)
        total = torch.zeros((), device=device)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{t.epochs}", leave=False, disable=not verbose or None)
        for step in bar:
            x = x_train[order[step * bs : (step + 1) * bs]]
            if cfg.data.binarize:
                x = torch.bernoulli(x)
            beta = t.beta * min(1.0, (epoch - 1 + step / steps) / t.warmup) if t.warmup else t.beta
            loss = objective(model, x, t.objective, t.k, beta, t.free_bits).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            optimizer.step()
            total += loss.detach()
            if step % 50 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss.item() / len(x):.2f}")
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        model.eval()
        row = {"epoch": epoch, "train_loss": total.item() / n}
        row.update({f"{name}_loss": mean_loss(model, x, t.eval_batch_size) for name, x in held_out.items()})
        metrics.append({**row, "lr": lr, "seconds": time.perf_counter() - start})
        save_model(model, run_dir)
        write_text(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))
        if epoch % report_every == 0 or epoch in (1, t.epochs):
            losses = "  ".join(f"{k.replace('_', ' ')} {v:9.4f}" for k, v in row.items() if k != "epoch")
            say(f"epoch {epoch:3d}  {losses}  ({metrics[-1]['seconds']:.2f} s)")

    return Run(run_dir, cfg, model, data, metrics)
