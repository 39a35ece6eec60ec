"""The training loop: data as one tensor on the device, batches by indexing, checkpoints to resume exactly."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import likelihoods, nets
from .board import Board, check_installed, opened
from .checkpoint import Progress, listing, load_checkpoint, path_for, save_checkpoint
from .config import Config, make_config, override, run_name
from .data import SOURCES, Dataset, load_data
from .errors import VaekitError
from .files import check_writable, start_record, write_json, write_text
from .model import VAE, mean_loss
from .optim import make_optimizer, pick_device
from .run import ARTIFACTS, Run, save_model
from .step import Step
from .world import World, binarize


def _run_dir(out: str | Path | None, cfg: Config) -> Path:
    """A fresh directory for this run; an existing run is never overwritten."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{run_name(cfg)}-{stamp}"
        n = 1
        while out.exists():
            n += 1
            out = Path("runs") / f"{run_name(cfg)}-{stamp}-{n}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VaekitError(f"--out {out} is a file, not a directory")
    if any((out / ARTIFACTS[name]).exists() for name in ("config", "description")) or any(listing(out)):
        raise VaekitError(f"{out} already holds a run; pass another --out, or continue it with --resume {out}")
    # Its record and an empty checkpoints folder alone are a run stopped while it was being set up.
    if out.is_dir() and any(
        p != out / ARTIFACTS["record"] and (p != out / ARTIFACTS["checkpoints"] or not p.is_dir() or any(p.iterdir()))
        for p in out.iterdir()
    ):
        raise VaekitError(f"{out} is not empty and is not a vaekit run; pass a new or empty folder as --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        start_record(out)
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

    def __init__(self, run_dir: Path, p: Progress, world: World | None = None) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._run_dir, self._progress, self._world = run_dir, p, world or World()

    def poll(self, agree: bool) -> int | None:
        """The signal received, if any; several processes learn of one only together, where the loop tells them to
        agree (one process told by the scheduler stops them all)."""
        if self._world.size == 1:
            return self.received
        if not agree:
            return None
        return self._world.most(self.received or 0) or None

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


def _identity(cfg: Config, data: Dataset) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed: the settings, and a fingerprint of the data."""
    settings = cfg.to_dict()
    # These may differ: the number of epochs (--epochs), where the data are found, the device's name, whether the
    # step is compiled (the same updates, made faster), whether the data are memory-mapped (the same examples; the
    # fingerprint tells if the splits differ) and whether TensorBoard logs are written.
    for section, key in (("train", "epochs"), ("data", "root"), ("data", "download"), ("train", "device"),
                         ("train", "compile"), ("data", "memory_map"), ("train", "tensorboard")):  # fmt: skip
        del settings[section][key]
    # Settings added since 0.1.0 are recorded only where they differ from their defaults, so that checkpoints made
    # before they existed still resume.
    added: list[tuple[str, str, Any]] = [("data", "classes", []), ("data", "label_column", ""),
                                         ("data", "one_hot", False), ("train", "precision", "fp32")]  # fmt: skip
    for section, key, default in added:
        if settings[section][key] == default:
            del settings[section][key]
    return {"settings": settings, "data": data.fingerprint()}


def _load(cfg: Config, dataset: Dataset | None) -> Dataset:
    """The data to train on, after the checks that need none: data can take a while to load."""
    nets.activation(cfg.model.activation)
    likelihoods.get(cfg.model.likelihood)
    pick_device(cfg.train.device)
    if cfg.train.tensorboard:
        check_installed()
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
    state = _prepare(cfg, data, None)
    state.source = "memory" if dataset is not None else "config"
    world = state.world
    out = world.share(_run_dir(out, cfg) if world.is_main else None)
    return _loop(Run(out, cfg, state.model, data, state.progress.metrics), state, None, verbose)


def resume(
    run: Run | str | Path,
    *,
    epochs: int | None = None,
    dataset: Dataset | None = None,
    data_dir: str | Path | None = None,
    verbose: bool = True,
) -> Run:
    """Continue a run from its newest checkpoint (or from a checkpoint file), exactly as if it had never stopped;
    data_dir is where its data are now, if they moved."""
    if isinstance(run, Run):
        dataset = dataset if dataset is not None else run.loaded_data()
    given = run.dir if isinstance(run, Run) else Path(run)
    checkpoints = ARTIFACTS["checkpoints"]
    path = given if given.is_file() else None
    if path is not None and path.parent.name != checkpoints:
        raise VaekitError(f"{given} is not a checkpoint: pass a run directory or a file in RUN/{checkpoints}")
    run = Run(given.parent.parent if path is not None else given, data_dir=data_dir)
    if not run.path("config").is_file():
        raise VaekitError(f"{given} is not a vaekit run or checkpoint: {run.path('config')} is missing")
    cfg = run.config
    if epochs is not None:
        cfg = override(cfg, {"train.epochs": epochs})
    if path is None:
        found = listing(run.dir)
        path = found[-1] if found else None
        # An empty checkpoints folder is a run killed before its first checkpoint: it starts again from scratch.
        if path is None and not run.path("checkpoints").is_dir():
            raise VaekitError(
                f"{run.dir} has no {checkpoints} folder to resume from (an older vaekit's run, or it was removed)"
            )
    data = _load(cfg, dataset)
    run.check_data(data, given=dataset is not None)  # names the data; the checkpoint's check names only a SHA-256
    state = _prepare(cfg, data, path)
    p = state.progress
    if p.stopped:
        raise VaekitError(f"{run.dir} stopped early at epoch {p.epoch}; its best model is in {run.path('best')}")
    if p.epoch >= cfg.train.epochs:
        done = (
            f"has finished its {p.epoch} epochs"
            if p.epoch == cfg.train.epochs
            else f"has already trained {p.epoch} epochs"
        )
        raise VaekitError(f"{run.dir} {done}; to train it for longer, pass --epochs N with N > {p.epoch}")
    # Everything the loop will write must be writable before it writes anything: a run is never left half-updated.
    if state.world.is_main:
        check_writable(*(run.path(name) for name in ("config", "weights", "description", "metrics")))
    return _loop(Run(run.dir, cfg, state.model, data, p.metrics), state, path, verbose)


@dataclass
class _State:
    """What the loop trains: the model, its optimizer and scheduler, the data-order generator, where training stands,
    and the identity (settings, data fingerprint) that every checkpoint records."""

    model: VAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    shuffle: torch.Generator
    progress: Progress
    identity: dict[str, Any]
    x_train: torch.Tensor  # the training examples this process holds, on the device (unless memory-mapped)
    held_out: dict[str, torch.Tensor]  # the valid and test examples there are, for the main process to evaluate
    world: World  # the processes training together
    source: str = "config"  # where the data came from: as the configuration names them, or passed in memory


def _prepare(cfg: Config, data: Dataset, start: Path | None) -> _State:
    """Build the model, optimizer and scheduler, and restore the training state of the checkpoint start, if given."""
    world = World()
    t, device = cfg.train, world.start(pick_device(cfg.train.device))
    if t.patience and "valid" not in data.splits:
        raise VaekitError("train.patience needs a validation split: hold one out with --set data.validation=N")
    if data.scaler is not None and cfg.model.likelihood != "gaussian":
        raise VaekitError(
            f"tables are standardised, so their values are not in [0, 1] as the {cfg.model.likelihood} likelihood "
            "needs: use --set model.likelihood=gaussian"
        )

    # On the device before anything is written: data too large for it must not leave an empty run directory.
    # Memory-mapped data stay where they are: batches are read from them and moved to the device one at a time.
    def place(x: torch.Tensor) -> torch.Tensor:
        return x if data.mapped else x.to(device)

    x_train = place(world.shard(data.split("train").x))
    # Only the main process evaluates.
    held_out: dict[str, torch.Tensor] = {
        n: place(data.split(n).x) for n in ("valid", "test") if n in data.splits and world.is_main
    }
    model = VAE(data.shape, cfg.model).to(device)
    optimizer, scheduler = make_optimizer(t, model, device)
    shuffle = torch.Generator(device).manual_seed(t.seed)
    identity = _identity(cfg, data)
    p = Progress()
    if start is not None:
        steps = (len(data.split("train").x) + t.batch_size - 1) // t.batch_size
        p = load_checkpoint(start, model, optimizer, scheduler, shuffle, identity, steps)
    return _State(model, optimizer, scheduler, shuffle, p, identity, x_train, held_out, world)


def _loop(run: Run, s: _State, start: Path | None, verbose: bool) -> Run:
    """Train run's model from where s.progress stands to the last epoch: the training loop."""
    cfg, t, p, model, device = run.config, run.config.train, s.progress, s.model, s.model.device
    x_train, n, bs, world = s.x_train, len(run.data.split("train").x), t.batch_size, s.world
    steps = (n + bs - 1) // bs
    verbose = verbose and world.is_main  # only the main process writes and speaks
    if world.is_main:
        _start_writing(run, s)
    say = print if verbose else (lambda *a, **k: None)
    say(f"run directory: {run.dir}" + (f" (resuming from {start.name})" if start else ""))
    say(_settings(cfg, run.data))
    report_every = max(1, t.epochs // 15)  # every epoch for short runs, about 15 lines for long ones
    update = Step(cfg, model, s.optimizer, steps * t.epochs, say, world)

    def checkpoint() -> Path:
        if not world.is_main:
            return path_for(run.dir, p.global_step)
        return save_checkpoint(run.dir, model, s.optimizer, s.shuffle, p, s.identity, t.keep_checkpoints)

    shown = next(iter(s.held_out.values()), x_train)  # to TensorBoard: the valid or test examples, if there are any
    logs = opened(run.path("tensorboard"), p.epoch, shown, t.tensorboard and world.is_main)
    with _Signals(run.dir, p, world) as signals, logs as board:
        while p.epoch < t.epochs and not p.stopped:
            began = time.perf_counter() - p.seconds
            if p.step == 0:
                p.order = torch.randperm(n, device=device, generator=s.shuffle)
                p.total, p.used, p.skipped = torch.zeros((), device=device), 0, 0
            order, total = p.order, p.total
            assert order is not None and total is not None  # drawn above, or restored from a mid-epoch checkpoint
            model.train()
            bar = tqdm(range(p.step, steps), desc=f"epoch {p.epoch + 1}/{t.epochs}", initial=p.step, total=steps,
                       leave=False, disable=not verbose or None)  # fmt: skip
            flags: list[torch.Tensor] = []  # whether each step since the flags were last read made its update
            for step in bar:
                batch = order[step * bs : (step + 1) * bs]
                mine, part = world.part(batch)  # the whole batch, in one process
                x = x_train[mine.to(x_train.device)].to(device)  # both no-ops, unless the data are memory-mapped
                if cfg.data.binarize:
                    x = binarize(x, part)
                beta = t.beta * min(1.0, (p.epoch + step / steps) / t.warmup) if t.warmup else t.beta
                loss, made = update(x, beta, part)
                total += torch.where(made, loss, 0.0)
                flags.append(made)
                p.global_step += 1
                due = t.checkpoint_every and p.global_step % t.checkpoint_every == 0
                agree = len(flags) == update.window or due or step == steps - 1
                received = signals.poll(agree)  # read once: a signal arriving later is seen after the next step
                if agree or received:
                    _account(p, flags, step + 1, n, bs, run.dir, t.skip_limit, bar if world.is_main else None)
                    flags = []
                if received or (due and not p.bad):
                    p.seconds = time.perf_counter() - began
                    saved = checkpoint()
                    if received:
                        world.wait()  # for the checkpoint: a process that stops first gets the others stopped
                        raise Interrupted(received, run.dir, saved, p)
                if step % 50 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{loss.item() / len(batch):.2f}")
            bar.close()
            lr = s.optimizer.param_groups[0]["lr"]
            if s.scheduler is not None:
                s.scheduler.step()
            _end_epoch(run, p, s.held_out, lr, time.perf_counter() - began, world, board)
            # Last, so that every file it stands for is already written. None in a streak of skipped steps, unless it
            # must record that the run has ended.
            received = signals.poll(True)
            if received or not p.bad or p.epoch >= t.epochs or p.stopped:
                saved = checkpoint()
            if p.epoch % report_every == 0 or p.epoch == t.epochs or p.epoch == 1 or p.stopped:
                say(_report(p.metrics[-1]))
            if received and p.epoch < t.epochs and not p.stopped:
                world.wait()
                raise Interrupted(received, run.dir, saved, p)
    if p.stopped:
        best = f"the best model, of epoch {p.best_epoch}, is in {run.path('best')}"
        say(f"early stop: the valid loss has not improved for {t.patience} epochs; {best}")
    return run


def _start_writing(run: Run, s: _State) -> None:
    """Write what a run holds before its first step: its settings, what it is trained on, a table's scaler."""
    # The checkpoints folder first: a run with a config.toml but no checkpoint in it was stopped before its first one.
    run.path("checkpoints").mkdir(exist_ok=True)
    config, cfg = run.path("config"), run.config
    if not config.is_file() or config.read_text(encoding="utf-8") != cfg.to_toml():  # a resumed run's stays as it is
        write_text(config, cfg.to_toml())
    if not run.path("fingerprint").exists():  # a resumed run keeps its record: checkpoints hold the same fingerprint
        _record_data(run, s)
    if run.data.scaler is not None:
        run.data.scaler.save(run.path("scaler"))


def _record_data(run: Run, s: _State) -> None:
    """Write what the run is trained on: where the data came from, their shape and each split's SHA-256."""
    record = {"source": s.source, "name": run.config.data.name, "shape": list(run.data.shape)}
    write_json(run.path("fingerprint"), {**record, "splits": s.identity["data"]})


def _settings(cfg: Config, data: Dataset) -> str:
    """One line on what is trained: the data, the model and the schedule."""
    m, t = cfg.model, cfg.train
    sizes = {name: len(data.split(name).x) for name in ("train", "valid", "test") if name in data.splits}
    layers = f"{m.net} {m.channels} + {m.hidden}" if m.net == "conv" else f"{m.net} {m.hidden}"
    epochs = f"{t.epochs} epoch{'s' * (t.epochs != 1)}"
    return (
        f"data {Path(cfg.data.name).name} {data.shape}: {', '.join(f'{n} {k}' for k, n in sizes.items())}; model "
        f"{layers}, latent {m.latent}, {m.likelihood}; {epochs} of batch {t.batch_size}, {t.optimizer} lr "
        f"{t.lr:g} (preset {cfg.preset})"
    )


def _report(row: dict[str, Any]) -> str:
    """One line on an epoch: its losses, skipped updates and seconds."""
    losses = "  ".join(
        f"{k.replace('_', ' ')} {'n/a' if v is None else f'{v:.4f}':>9}" for k, v in row.items() if k.endswith("loss")
    )
    skipped = f"  skipped {row['skipped']}" if row["skipped"] else ""
    return f"epoch {row['epoch']:3d}  {losses}{skipped}  ({row['seconds']:.2f} s)"


def _account(p: Progress, flags: list[torch.Tensor], end: int, n: int, bs: int, run_dir: Path, limit: int, bar: Any
             ) -> None:  # fmt: skip
    """Count the steps before step `end` whose finite flags are given: examples used, updates skipped (reported at
    the first, on bar unless it is None), and a stop after `limit` skipped in a row."""
    made = torch.stack(flags).tolist() if len(flags) > 1 else [bool(flags[0])]
    for step, ok in enumerate(made, end - len(made)):
        p.step = step + 1
        if ok:
            p.used, p.bad = p.used + min(bs, n - step * bs), 0
            continue
        p.skipped, p.bad = p.skipped + 1, p.bad + 1
        if p.bad >= limit:
            found = listing(run_dir)
            last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been written yet"
            raise VaekitError(
                f"training stopped: the loss or its gradients were not finite in {limit} steps in a row (epoch "
                f"{p.epoch + 1}, step {p.step}); {last}; try a lower --lr or --set train.clip_grad=..."
            )
        if p.skipped == 1 and bar is not None:
            bar.write(
                f"epoch {p.epoch + 1}, step {p.step}: non-finite loss or gradient, update skipped", file=sys.stderr
            )
    p.step = end


def _end_epoch(run: Run, p: Progress, held_out: dict[str, torch.Tensor], lr: float, seconds: float, world: World,
               board: Board | None) -> None:  # fmt: skip
    """Record an epoch's metrics (also to TensorBoard), save the last model, keep the best one and decide on early
    stopping: the main process does, and tells the others."""
    cfg, model = run.config, run.model
    p.epoch, p.step, p.seconds, p.order = p.epoch + 1, 0, 0.0, None
    if not world.is_main:
        p.metrics, p.best_loss, p.best_epoch, p.stopped = world.share(None)
        return
    model.eval()
    losses = {"train": p.total.item() / p.used if p.total is not None and p.used else math.nan}
    losses.update({name: mean_loss(model, x, cfg.train.eval_batch_size) for name, x in held_out.items()})
    # A loss that is not finite (no update at all, or diverged weights) is null: metrics.jsonl stays strict JSON.
    row = {"epoch": p.epoch, **{f"{k}_loss": v if math.isfinite(v) else None for k, v in losses.items()}}
    p.metrics.append({**row, "skipped": p.skipped, "lr": lr, "seconds": seconds})
    save_model(model, run.dir)
    write_text(run.path("metrics"), "".join(json.dumps(m, allow_nan=False) + "\n" for m in p.metrics))
    if board is not None:
        board.epoch(p.metrics[-1], model)
    valid = row.get("valid_loss")
    if valid is not None and valid < p.best_loss:
        p.best_loss, p.best_epoch = valid, p.epoch
        save_model(model, run.path("best"))
        write_text(Run(run.path("best")).path("config"), cfg.to_toml())
    p.stopped = bool(cfg.train.patience) and p.epoch - p.best_epoch >= cfg.train.patience
    world.share((p.metrics, p.best_loss, p.best_epoch, p.stopped))
