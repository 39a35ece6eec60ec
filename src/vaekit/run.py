"""A run directory as an object: its config, model, metrics and data, and the path of every artifact by name.

Every run-level command opens a run with `open_run` and asks it for what it needs; what a run holds is named in
`ARTIFACTS` and nowhere else.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import Config, from_dict, read_toml
from .data import Dataset, Split, load_data, relocated
from .errors import VaekitError
from .files import RECORD, read_json, write_bytes, write_json
from .model import VAE
from .tables import Scaler

# The files and folders of a run, by name. {split} is "" for the test split and "-SPLIT" for the others; {first} is
# "" for a whole split and "-firstN" for its first N examples.
ARTIFACTS = {
    "config": "config.toml",  # the complete resolved configuration
    "weights": "model.safetensors",
    "description": "model.json",  # what rebuilds the model: shape, sizes, activation, likelihood
    "metrics": "metrics.jsonl",  # one JSON object per epoch
    "tensorboard": "tensorboard",  # with train.tensorboard: TensorBoard event files
    "checkpoints": "checkpoints",  # training states for --resume
    "best": "best",  # the model of the epoch with the lowest validation loss, as a run directory of its own
    "plots": "plots",  # what `plot` draws:
    "loss-plot": "plots/loss.png",
    "latent-plot": "plots/latent.png",
    "manifold-plot": "plots/manifold.png",
    "samples-plot": "plots/samples.png",
    "reconstructions-plot": "plots/reconstructions.png",
    "interpolations-plot": "plots/interpolations.png",
    "evaluation": "evaluation{split}{first}.json",  # what `evaluate` measured; per-example values in the .npz
    "scaler": "scaler.json",  # tables: the standardisation of the training split, applied to every table scored
    "anomaly": "anomaly.json",  # the calibrated anomaly score and threshold
    "anomaly-report": "anomaly-report",  # what `anomaly report` measured and drew
    "samples": "samples.png",
    "reconstructions": "reconstructions.png",
    "latents": "latents.npy",
    "decoded": "decoded.png",
    "fingerprint": "data.json",  # the data trained on: from where (its name, or memory), each split's size and SHA-256
    "record": RECORD,  # every file vaekit wrote in the run: nothing else there is replaced or removed
    "report": "report.html",  # what `report` writes: one self-contained page, opened from disk
    "compression": "compression.json",  # the rates `compress --report` measured last, with its input and file
}
CONFIG, WEIGHTS, DESCRIPTION, METRICS = (ARTIFACTS[k] for k in ("config", "weights", "description", "metrics"))
FORMAT = "vaekit-model"


def save_model(model: VAE, run_dir: str | Path) -> None:
    """Write the model's weights (safetensors) and the description that rebuilds it (JSON)."""
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(run_dir / WEIGHTS, save(state))
    description = {"format": FORMAT, "version": 1, "shape": list(model.shape), "model": asdict(model.config)}
    write_json(run_dir / DESCRIPTION, description)


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> VAE:
    """Rebuild a trained model from a run directory, without unpickling anything."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VaekitError(f"run directory not found: {run_dir}")
    desc_path, weights_path = run_dir / DESCRIPTION, run_dir / WEIGHTS
    desc = read_json(desc_path, f"{run_dir} is not a vaekit run: {DESCRIPTION} is missing")
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


class Run:
    """A run directory: its configuration, model (loaded when first used), metrics, data and artifacts by name.

    `vaekit.train` returns one with the model and data it trained in memory; `open_run(path)` opens one from disk.
    """

    def __init__(
        self,
        dir: str | Path,
        config: Config | None = None,
        model: VAE | None = None,
        data: Dataset | None = None,
        metrics: list[dict[str, Any]] | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        self.dir = Path(dir)
        self._config, self._model, self._data, self._metrics = config, model, data, metrics
        self._data_dir = data_dir

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    def __str__(self) -> str:
        return str(self.dir)

    def __fspath__(self) -> str:
        return str(self.dir)

    def path(self, name: str, split: str = "test", first: int | None = None) -> Path:
        """Where the artifact called name lives (see ARTIFACTS)."""
        if name not in ARTIFACTS:
            raise KeyError(f"unknown run artifact '{name}' (known: {', '.join(ARTIFACTS)})")
        return self.dir / ARTIFACTS[name].format(
            split="" if split == "test" else f"-{split}", first="" if first is None else f"-first{first}"
        )

    def evaluation_path(self, split: str = "test", first: int | None = None) -> Path:
        """Where evaluate writes its summary of a split, or of its first examples (the .npz of the same name holds
        the per-example values)."""
        return self.path("evaluation", split, first)

    @property
    def config(self) -> Config:
        """The resolved configuration the run was trained with."""
        if self._config is None:
            self._config = load_config(self.dir)
            if self._data_dir is not None:
                self._config.data = relocated(self._config.data, self._data_dir)
        return self._config

    @property
    def model(self) -> VAE:
        """The trained model (on the CPU when loaded from disk)."""
        if self._model is None:
            self._model = load(self.dir)
        return self._model

    def model_on(self, device: torch.device) -> VAE:
        """The trained model on device, in evaluation mode (a copy when it lives on another one)."""
        model = self.model
        # torch.device("cuda") names the current GPU, which tensors report with its index: compare the two resolved.
        if model.device != torch.empty(0, device=device).device:
            model = copy.deepcopy(model).to(device)
        return model.eval()

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch metrics (an empty list if there are none yet)."""
        return self._metrics if self._metrics is not None else read_metrics(self.dir)

    @property
    def data(self) -> Dataset:
        """The data set the run was trained on, loaded as its configuration names it."""
        if self._data is None:
            record = self._data_record()
            try:
                data = load_data(self.config.data)
            except VaekitError as e:
                if record.get("source") == "memory":
                    raise VaekitError(self._passed_in_memory()) from None
                if self._data_dir is None and "--data-dir" not in str(e):
                    hint = "if the run's data moved, say where they are now with --data-dir"
                    raise VaekitError(f"{e} ({hint})") from None
                raise
            self.check_data(data)
            self._data = data
        return self._data

    def _data_record(self) -> dict[str, Any]:
        """What the run recorded of the data it was trained on ({} for runs made before it did)."""
        path = self.path("fingerprint")
        record = read_json(path, "") if path.exists() else {}
        if not isinstance(record, dict) or not isinstance(record.get("splits", {}), dict):
            raise VaekitError(f"{path} is not a record of data")
        return record

    def _passed_in_memory(self) -> str:
        return (
            f"{self.dir} was trained on data passed in memory, not on '{self.config.data.name}' as its config names: "
            f"open it with vaekit.open_run('{self.dir}', data=DATASET)"
        )

    def check_data(self, data: Dataset, given: bool = False) -> None:
        """Refuse data other than those the run was trained on, by their record's sizes and SHA-256s; given says that
        the caller passed them (rather than the run's config naming them)."""
        record = self._data_record()
        if record.get("shape") not in (None, list(data.shape)):
            raise VaekitError(
                f"the data '{data.name}' now have examples of shape {data.shape}, but the model was trained on "
                f"{tuple(record['shape'])}"
            )
        found = data.fingerprint()
        for split, expected in record.get("splits", {}).items():
            if found.get(split) != expected:
                if given:
                    raise VaekitError(
                        f"the data given are not those {self.dir} was trained on: their {split} split is not the one "
                        f"{self.path('fingerprint').name} records ({expected[0]} examples)"
                    )
                if record.get("source") == "memory":
                    raise VaekitError(self._passed_in_memory())
                size = f"{found[split][0]} examples" if split in found else "none"
                raise VaekitError(
                    f"the data '{data.name}' found now are not what {self.dir} was trained on: its {split} split has "
                    f"{size}, where {self.path('fingerprint').name} records {expected[0]} examples of another content; "
                    "point --data-dir at the data it was trained on"
                )

    def examples(self, split: str = "test", limit: int | None = None) -> Split:
        """A split of the run's data (its first limit examples, in stored order), checked against the model's shape."""
        if limit is not None and limit < 1:
            raise VaekitError(f"the limit must be at least 1 example, got {limit}")
        shape = self.model.shape  # a broken model is reported before the data are loaded
        s = self.data.split(split)
        self.check_shape(s.x, f"the data '{self.config.data.name}' now has examples", shape)
        return s if limit is None else Split(s.x[:limit], None if s.y is None else s.y[:limit])

    def check_shape(
        self, x: torch.Tensor, what: str = "the examples are", shape: tuple[int, ...] | None = None
    ) -> None:
        """Refuse examples of another shape than the model (whose example shape is shape) was trained on."""
        shape = shape or self.model.shape
        if tuple(x.shape[1:]) != shape:
            raise VaekitError(f"{what} of shape {tuple(x.shape[1:])}, but the model was trained on {shape}")

    @property
    def scaler(self) -> Scaler | None:
        """The standardisation of a run trained on a table (None for other data)."""
        if self._data is not None:
            return self._data.scaler
        return Scaler.load(self.path("scaler")) if self.path("scaler").exists() else None

    def loaded_data(self) -> Dataset | None:
        """The data set held in memory, if it has been loaded or was given (None otherwise)."""
        return self._data


def open_run(run: Run | str | Path, *, data_dir: str | Path | None = None, data: Dataset | None = None) -> Run:
    """The run in a directory (or run itself, if it is already a Run); its files are read when first needed.

    data_dir is where its data are now, if they moved (see `data.relocated`); data are the data it was trained on, for
    a run trained on data passed in memory. Either is checked against the run's record of its data when used.
    """
    if isinstance(run, Run) and data_dir is None and data is None:
        return run
    where = run.dir if isinstance(run, Run) else Path(run)
    if not where.is_dir():
        raise VaekitError(f"run directory not found: {run}")
    opened = Run(where, data_dir=data_dir)
    if data is not None:
        opened.check_data(data, given=True)
        opened._data = data
    return opened
