"""The training loop: data as one tensor on the device, batches by indexing, checkpoints to resume exactly."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import likelihoods, nets
from .checkpoint import CHECKPOINTS, Progress, listing, load_checkpoint, save_checkpoint
from .config import Config, TrainConfig, make_config, override
from .data import SOURCES, Dataset, load_data
from .errors import VaekitError
from .evaluation import mean_loss
from .model import VAE, objective
from .rundir import BEST, CONFIG, DESCRIPTION, METRICS, load_config, save_model, write_text


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
    if (out / CONFIG).exists() or (out / DESCRIPTION).exists() or any(listing(out)):
        raise VaekitError(f"{out} already holds a run; pass another --out, or continue it with --resume {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VaekitError(f"cannot create the run directory {out}: {e.strerror or e}") from None
    return out


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM, normally after saving a checkpoint; exit_code is 128 + the signal."""

    def __init__(self, signum: int, run_dir: Path, checkpoint: Path | None, p: Progress) -> None:
        self.exit_code = 128 + signum
        where = f"in epoch {p.epoch + 1} after step {p.step}" if p.step else f"after epoch {p.epoch}"
        what = f"training stopped {where} and saved {checkpoint}" if checkpoint else "a second signal: stopped at once"
        super().__init__(f"{signal.Signals(signum).name}: {what}; continue with: vaekit train --resume {run_dir}")


class _Signals:
    """SIGINT and SIGTERM ask training to stop after the current step; a second one stops it at once."""

    def __init__(self, run_dir: Path, p: Progress) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._run_dir, self._progress = run_dir, p

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise Interrupted(signum, self._run_dir, None, self._progress)
        self.received = signum

    def __enter__(self) -> _Signals:
        # Handlers can only be set in the main thread; elsewhere signals keep their usual effect.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _finite(loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether the loss and every gradient are finite (one device sync per step)."""
    # A sum is finite exactly when all its terms are (or it overflows, which no sane update does); sums cost half of
    # what norms do on a CPU.
    sums = torch.stack([p.grad.sum() for p in params if p.grad is not None])
    return bool(torch.isfinite(loss.detach() + sums.sum()))


def _identity(cfg: Config, data: Dataset) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed: the settings, and a fingerprint of the data."""
    settings = cfg.to_dict()
    # These may differ: the number of epochs (--epochs), where the data are found, and the device's name.
    for section, key in (("train", "epochs"), ("data", "root"), ("data", "download"), ("train", "device")):
        del settings[section][key]
    digests = {}
    for name, split in data.splits.items():
        h = hashlib.sha256(split.x.detach().cpu().contiguous().numpy())
        if split.y is not None:
            h.update(split.y.detach().cpu().contiguous().numpy())
        digests[name] = [len(split.x), h.hexdigest()]
    return {"settings": settings, "data": digests}


def _load(cfg: Config, dataset: Dataset | None) -> Dataset:
    """The data to train on, after the checks that need none: data can take a while to load."""
    nets.activation(cfg.model.activation)
    likelihoods.get(cfg.model.likelihood)
    pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # before the data and the model, which may draw random numbers
    return dataset if dataset is not None else load_data(cfg.data)


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
    data = _load(cfg, dataset)
    # The run records absolute paths so that later commands find its data from any directory.
    if cfg.data.name not in SOURCES and Path(cfg.data.name).expanduser().exists():
        cfg.data.name = str(Path(cfg.data.name).expanduser().resolve())
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.data.channels == 0 and Path(cfg.data.name).is_dir():
        cfg.data.channels = data.shape[0]
    return _fit(cfg, data, out, None, verbose, fresh=True)


def resume(run: str | Path, *, epochs: int | None = None, dataset: Dataset | None = None, verbose: bool = True) -> Run:
    """Continue a run from its newest checkpoint (or from a checkpoint file), exactly as if it had never stopped."""
    run = Path(run)
    path = run if run.is_file() else None
    if path is not None and path.parent.name != CHECKPOINTS:
        raise VaekitError(f"{run} is not a checkpoint: pass a run directory or a file in RUN/{CHECKPOINTS}")
    run_dir = run.parent.parent if path is not None else run
    if not (run_dir / CONFIG).is_file():
        raise VaekitError(f"{run} is not a vaekit run or checkpoint: {run_dir / CONFIG} is missing")
    cfg = load_config(run_dir)
    if epochs is not None:
        cfg = override(cfg, {"train.epochs": epochs})
    if path is None:
        found = listing(run_dir)
        path = found[-1] if found else None
        # An empty checkpoints folder is a run killed before its first checkpoint: it starts again from scratch.
        if path is None and not (run_dir / CHECKPOINTS).is_dir():
            raise VaekitError(
                f"{run_dir} has no {CHECKPOINTS} folder to resume from (an older vaekit's run, or it was removed)"
            )
    return _fit(cfg, _load(cfg, dataset), run_dir, path, verbose, fresh=False)


def _fit(cfg: Config, data: Dataset, out: str | Path | None, start: Path | None, verbose: bool, fresh: bool) -> Run:
    """Build the model and optimizer, restore a checkpoint if given, and train: the training loop."""
    t, device = cfg.train, pick_device(cfg.train.device)
    if t.patience and "valid" not in data.splits:
        raise VaekitError("train.patience needs a validation split: hold one out with --set data.validation=N")
    x_train = data.split("train").x.to(device)
    held_out = {name: data.splits[name].x.to(device) for name in ("valid", "test") if name in data.splits}
    model = VAE(data.shape, cfg.model).to(device)
    optimizer, scheduler = make_optimizer(t, model, device)
    shuffle = torch.Generator(device).manual_seed(t.seed)
    n, bs = len(x_train), t.batch_size
    steps = (n + bs - 1) // bs
    identity = _identity(cfg, data)
    p = Progress()
    if start is not None:
        p = load_checkpoint(start, model, optimizer, scheduler, shuffle, identity, steps)
    if p.stopped:
        raise VaekitError(f"{out} stopped early at epoch {p.epoch}; its best model is in {Path(out) / BEST}")  # type: ignore[arg-type]
    if p.epoch >= t.epochs:
        done = f"has finished its {p.epoch} epochs" if p.epoch == t.epochs else f"has already trained {p.epoch} epochs"
        raise VaekitError(f"{out} {done}; to train it for longer, pass --epochs N with N > {p.epoch}")
    run_dir = _run_dir(out, cfg) if fresh else Path(out)  # type: ignore[arg-type]
    # The checkpoints folder first: a run with a config.toml but no checkpoint in it was stopped before its first one.
    (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
    write_text(run_dir / CONFIG, cfg.to_toml())
    say = print if verbose else (lambda *a, **k: None)
    say(f"run directory: {run_dir}" + (f" (resuming from {start.name})" if start else ""))
    params = list(model.parameters())
    report_every = max(1, t.epochs // 15)  # every epoch for short runs, about 15 lines for long ones

    def checkpoint() -> Path:
        return save_checkpoint(run_dir, model, optimizer, shuffle, p, identity, t.keep_checkpoints)

    with _Signals(run_dir, p) as signals:
        while p.epoch < t.epochs and not p.stopped:
            began = time.perf_counter() - p.seconds
            if p.step == 0:
                p.order = torch.randperm(n, device=device, generator=shuffle)
                p.total, p.used, p.skipped = torch.zeros((), device=device), 0, 0
            model.train()
            bar = tqdm(range(p.step, steps), desc=f"epoch {p.epoch + 1}/{t.epochs}", initial=p.step, total=steps,
                       leave=False, disable=not verbose or None)  # fmt: skip
            for step in bar:
                x = x_train[p.order[step * bs : (step + 1) * bs]]
                if cfg.data.binarize:
                    x = torch.bernoulli(x)
                beta = t.beta * min(1.0, (p.epoch + step / steps) / t.warmup) if t.warmup else t.beta
                loss = objective(model, x, t.objective, t.k, beta, t.free_bits).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if _finite(loss, params):
                    if t.clip_grad:
                        torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
                    optimizer.step()
                    p.total += loss.detach()
                    p.used, p.bad = p.used + len(x), 0
                else:
                    p.skipped, p.bad = p.skipped + 1, p.bad + 1
                    _skipped(p, run_dir, t.skip_limit, bar)
                p.step, p.global_step = step + 1, p.global_step + 1
                if signals.received or (t.checkpoint_every and p.global_step % t.checkpoint_every == 0 and not p.bad):
                    p.seconds = time.perf_counter() - began
                    saved = checkpoint()
                    if signals.received:
                        raise Interrupted(signals.received, run_dir, saved, p)
                if step % 50 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{loss.item() / len(x):.2f}")
            bar.close()
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            _end_epoch(cfg, model, run_dir, p, held_out, lr, time.perf_counter() - began)
            # Last, so that every file it stands for is already written. None in a streak of skipped steps, unless it
            # must record that the run has ended.
            if signals.received or not p.bad or p.epoch >= t.epochs or p.stopped:
                saved = checkpoint()
            if p.epoch % report_every == 0 or p.epoch == t.epochs or p.epoch == 1 or p.stopped:
                say(_report(p.metrics[-1]))
            if signals.received and p.epoch < t.epochs and not p.stopped:
                raise Interrupted(signals.received, run_dir, saved, p)
    if p.stopped:
        best = f"the best model, of epoch {p.best_epoch}, is in {run_dir / BEST}"
        say(f"early stop: the valid loss has not improved for {t.patience} epochs; {best}")
    return Run(run_dir, cfg, model, data, p.metrics)


def _report(row: dict[str, Any]) -> str:
    """One line on an epoch: its losses, skipped updates and seconds."""
    losses = "  ".join(
        f"{k.replace('_', ' ')} {'n/a' if v is None else f'{v:.4f}':>9}" for k, v in row.items() if k.endswith("loss")
    )
    skipped = f"  skipped {row['skipped']}" if row["skipped"] else ""
    return f"epoch {row['epoch']:3d}  {losses}{skipped}  ({row['seconds']:.2f} s)"


def _skipped(p: Progress, run_dir: Path, limit: int, bar: Any) -> None:
    """Report an update skipped for a non-finite loss or gradient; stop training after limit in a row."""
    if p.bad >= limit:
        found = listing(run_dir)
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been written yet"
        raise VaekitError(
            f"training stopped: the loss or its gradients were not finite in {limit} steps in a row (epoch "
            f"{p.epoch + 1}, step {p.step + 1}); {last}; try a lower --lr or --set train.clip_grad=..."
        )
    if p.skipped == 1:
        bar.write(
            f"epoch {p.epoch + 1}, step {p.step + 1}: non-finite loss or gradient, update skipped", file=sys.stderr
        )


def _end_epoch(
    cfg: Config, model: VAE, run_dir: Path, p: Progress, held_out: dict[str, torch.Tensor], lr: float, seconds: float
) -> None:
    """Record an epoch's metrics, save the last model, keep the best one and decide on early stopping."""
    p.epoch, p.step, p.seconds, p.order = p.epoch + 1, 0, 0.0, None
    model.eval()
    losses = {"train": p.total.item() / p.used if p.used else math.nan}
    losses.update({name: mean_loss(model, x, cfg.train.eval_batch_size) for name, x in held_out.items()})
    # A loss that is not finite (no update at all, or diverged weights) is null: metrics.jsonl stays strict JSON.
    row = {"epoch": p.epoch, **{f"{k}_loss": v if math.isfinite(v) else None for k, v in losses.items()}}
    p.metrics.append({**row, "skipped": p.skipped, "lr": lr, "seconds": seconds})
    save_model(model, run_dir)
    write_text(run_dir / METRICS, "".join(json.dumps(m, allow_nan=False) + "\n" for m in p.metrics))
    valid = row.get("valid_loss")
    if valid is not None and valid < p.best_loss:
        p.best_loss, p.best_epoch = valid, p.epoch
        save_model(model, run_dir / BEST)
        write_text(run_dir / BEST / CONFIG, cfg.to_toml())
    p.stopped = bool(cfg.train.patience) and p.epoch - p.best_epoch >= cfg.train.patience
