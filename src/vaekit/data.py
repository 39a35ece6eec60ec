"""Data sources, each loaded once into memory as float tensors with optional integer labels.

Images and arrays lie in [0, 1]; tables (CSV) are standardised with statistics of their training split.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .errors import VaekitError, first_line
from .files import read_arrays
from .images import read_folder
from .tables import Scaler, read_csv

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"


@dataclass
class Split:
    """One split of a data set: inputs x of shape (N, C, H, W) or (N, D), labels y of shape (N,) if known, and for
    image folders the file each example came from."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    names: list[str] | None = None

    def take(self, index: torch.Tensor | slice) -> Split:
        """The examples at index (a tensor of positions, or a slice), with their labels and names."""
        names = self.names
        if names is not None:
            names = names[index] if isinstance(index, slice) else [names[i] for i in index.tolist()]
        return Split(self.x[index], None if self.y is None else self.y[index], names)


@dataclass
class Dataset:
    """A named data set held in memory as splits ('train', 'test', sometimes 'valid')."""

    name: str
    splits: dict[str, Split]
    scaler: Scaler | None = None  # tables: the standardisation computed on the training split
    label_names: list[str] | None = None  # what each label number stands for, when the labels were text
    mapped: bool = False  # the examples are a memory-mapped file, read from disk as they are used

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example."""
        return tuple(self.splits["train"].x.shape[1:])

    def fingerprint(self) -> dict[str, list[Any]]:
        """Each split's size and a SHA-256 of its examples and labels: what tells these data from any others."""
        digests: dict[str, list[Any]] = {}
        for name, split in self.splits.items():
            h = hashlib.sha256(split.x.detach().cpu().contiguous().numpy().data)
            if split.y is not None:
                h.update(split.y.detach().cpu().contiguous().numpy().data)
            digests[name] = [len(split.x), h.hexdigest()]
        return digests

    def split(self, name: str) -> Split:
        """The split called name, with an error listing the available ones."""
        if name not in self.splits:
            raise VaekitError(f"data set '{self.name}' has no split '{name}' (available: {', '.join(self.splits)})")
        return self.splits[name]


def default_root() -> Path:
    """The directory where downloadable data sets are kept unless told otherwise."""
    if "VAEKIT_DATA" in os.environ:
        return Path(os.environ["VAEKIT_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vaekit"


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: images (1797, 8, 8) of 0 to 16, and their labels."""
    # load_digits reads this file of scikit-learn's; importing scikit-learn for it would cost every command on the
    # quick-start data about three seconds.
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target


def _digits(cfg: DataConfig, root: Path) -> dict[str, Split]:
    images, target = _digits_arrays()
    x = torch.from_numpy(images / 16.0).unsqueeze(1)
    return _split(Split(x, torch.from_numpy(target).long()), cfg.test_fraction)


def _torchvision(class_name: str, cfg: DataConfig, root: Path) -> dict[str, Split]:
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import extract_archive

    cls = getattr(tvd, class_name)
    raw = root / class_name / "raw"
    # Archives already there are unpacked here, since torchvision only unpacks as part of a download (which would
    # first fetch anew any archive whose checksum is not that of its own copy).
    for filename, _ in cls.resources:
        unpacked = raw / Path(filename).stem
        if unpacked.exists() and unpacked.stat().st_size == 0:
            unpacked.unlink()  # left by a failed unpacking: unpack again
        if (raw / filename).exists() and not unpacked.exists():
            try:
                extract_archive(str(raw / filename), str(raw))
            except (OSError, EOFError, zlib.error) as e:
                unpacked.unlink(missing_ok=True)  # a half-written file would hide the archive next time
                raise VaekitError(f"cannot unpack {raw / filename}: {e}") from None
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=cfg.download)
        except Exception as e:  # torchvision raises bare RuntimeErrors and URLErrors for missing files
            how = "the download failed" if cfg.download else "download is switched off"
            raise VaekitError(
                f"{class_name} files not found in {raw} and {how} ({_last_line(e)}); "
                f"copy the four *-ubyte.gz files there, or train with --data-dir set to a folder holding "
                f"{class_name}/raw"
            ) from None
        splits[split] = Split(ds.data.float().div_(255).unsqueeze(1), ds.targets.long())
    return splits


def _last_line(e: Exception) -> str:
    """The most specific line of a multi-line error message (torchvision lists every mirror it tried)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _read_amat(path: Path) -> torch.Tensor:
    """Read a Larochelle .amat file of 0/1 values (784 per line), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            text = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, zlib.error) as e:
        raise VaekitError(f"cannot read {path}: {e}") from None
    bits = text[(text == ord("0")) | (text == ord("1"))] - ord("0")
    lines = sum(1 for line in text.tobytes().splitlines() if line.strip())
    if lines == 0 or bits.size != lines * 784:
        raise VaekitError(f"{path} is not a binarized MNIST .amat file (784 values of 0/1 per line)")
    return torch.from_numpy(bits.reshape(-1, 1, 28, 28).astype(np.float32))


def _binarized_mnist(cfg: DataConfig, root: Path) -> dict[str, Split]:
    folder = root / "binarized_mnist"
    splits = {}
    for split in ("train", "valid", "test"):
        name = f"binarized_mnist_{split}.amat"
        found = [folder / n for n in (name, name + ".gz") if (folder / n).exists()]
        if not found and cfg.download:
            from torchvision.datasets.utils import download_url

            try:
                download_url(BINARIZED_MNIST_URL + name, str(folder), name)
                found = [folder / name]
            except Exception as e:  # urllib and torchvision raise a variety of errors when offline
                raise VaekitError(f"could not download {name} into {folder}: {_last_line(e)}") from None
        if not found:
            raise VaekitError(
                f"{name} (or {name}.gz) not found in {folder}; download is switched off, "
                "so put the Larochelle binarized MNIST files there, or train with --data-dir pointing to their parent"
            )
        splits[split] = Split(_read_amat(found[0]))
    return splits


SOURCES = {
    "digits": _digits,
    "mnist": lambda cfg, root: _torchvision("MNIST", cfg, root),
    "fashion-mnist": lambda cfg, root: _torchvision("FashionMNIST", cfg, root),
    "kmnist": lambda cfg, root: _torchvision("KMNIST", cfg, root),
    "binarized-mnist": _binarized_mnist,
}


def _partition(split: Split, n_out: int, in_order: bool = False) -> tuple[Split, Split]:
    """A fixed random division of a split, the same on every machine: the rest, and n_out examples held out; in_order
    holds out the last n_out instead (a memory-mapped file's splits stay views of it, not copies)."""
    if in_order:
        n = len(split.x)
        return split.take(slice(0, n - n_out)), split.take(slice(n - n_out, n))
    order = torch.randperm(len(split.x), generator=torch.Generator().manual_seed(0))
    return split.take(order[n_out:]), split.take(order[:n_out])


def _split(whole: Split, test_fraction: float, in_order: bool = False) -> dict[str, Split]:
    """A fixed random train/test split (or the last examples as the test split, in_order)."""
    x = whole.x
    if len(x) < 2:
        raise VaekitError(f"only {len(x)} example: at least 2 are needed for a train and a test split")
    n_test = max(1, round(len(x) * test_fraction))
    if len(x) - n_test < 1:
        raise VaekitError(
            f"{len(x)} examples with test_fraction {test_fraction} leave none for training; lower data.test_fraction"
        )
    train, test = _partition(whole, n_test, in_order)
    return {"train": train, "test": test}


def _as_float(a: np.ndarray, what: str) -> torch.Tensor:
    """Convert an array to float32, scaling 8-bit integers to [0, 1]."""
    if a.dtype == np.uint8:
        return torch.from_numpy(a.astype(np.float32) / 255.0)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating):
        return torch.from_numpy(a.astype(np.float32))
    raise VaekitError(f"{what} has dtype {a.dtype}; expected numbers")


def _as_examples(x: torch.Tensor, what: str) -> torch.Tensor:
    """Bring an array to (N, C, H, W) or (N, D): (N, H, W) gains a channel, channels-last moves first."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.permute(0, 3, 1, 2).contiguous()
    if x.ndim in (2, 4):
        return x
    raise VaekitError(f"{what} has shape {tuple(x.shape)}; expected (N, D), (N, H, W) or (N, C, H, W)")


def _labels(a: np.ndarray | None, n: int, what: str) -> torch.Tensor | None:
    if a is None:
        return None
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise VaekitError(f"{what} must be {n} integer labels, got shape {a.shape} and dtype {a.dtype}")
    return torch.from_numpy(a.astype(np.int64))


def _arrays(path: Path) -> dict[str, Split]:
    """The arrays of a .npy or .npz file: its x_train / x_test splits, or all its examples as the split 'all'."""
    loaded = read_arrays(path)
    arrays = {"x": loaded} if isinstance(loaded, np.ndarray) else loaded
    if "x_train" in arrays:
        splits = {}
        for split in ("train", "test"):
            if f"x_{split}" not in arrays:
                raise VaekitError(f"{path} has x_train but no x_{split}")
            x = _as_examples(_as_float(arrays[f"x_{split}"], f"{path}:x_{split}"), f"{path}:x_{split}")
            splits[split] = Split(x, _labels(arrays.get(f"y_{split}"), len(x), f"{path}:y_{split}"))
        return splits
    key = "x" if "x" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
    if key is None:
        raise VaekitError(f"{path} must hold an array 'x' (or x_train and x_test); found {', '.join(arrays) or 'none'}")
    x = _as_examples(_as_float(arrays[key], f"{path}:{key}"), f"{path}:{key}")
    return {"all": Split(x, _labels(arrays.get("y"), len(x), f"{path}:y"))}


def _check(splits: dict[str, Split], name: str, unit_range: bool = True) -> None:
    """Refuse data a VAE cannot learn from: empty, non-finite, or (unit_range) outside [0, 1]."""
    shape = None
    for split, s in splits.items():
        if len(s.x) == 0 or s.x[0].numel() == 0:
            raise VaekitError(f"data '{name}': split '{split}' is empty")
        # In blocks of examples (4 MiB of temporaries), each read once: a memory-mapped split is never held whole.
        rows, finite, lo, hi = max(1, 2**22 // s.x[0].numel()), True, math.inf, -math.inf
        for i in range(0, len(s.x), rows):
            block = s.x[i : i + rows]
            finite = finite and bool(torch.isfinite(block).all())
            low, high = torch.aminmax(block)
            lo, hi = min(lo, low.item()), max(hi, high.item())
        if not finite:
            raise VaekitError(f"data '{name}': split '{split}' contains NaN or infinite values")
        if unit_range and (lo < 0 or hi > 1):
            raise VaekitError(
                f"data '{name}': values must lie in [0, 1] (scale the data first), found [{lo:g}, {hi:g}]"
            )
        if shape is not None and s.x.shape[1:] != shape:
            raise VaekitError(f"data '{name}': split '{split}' has examples of shape {tuple(s.x.shape[1:])}")
        shape = s.x.shape[1:]


def _hold_out(splits: dict[str, Split], n: int, name: str, in_order: bool = False) -> dict[str, Split]:
    """Move a fixed random choice of n training examples into a 'valid' split."""
    if "valid" in splits:
        raise VaekitError(f"data '{name}' has its own validation split; leave data.validation at 0")
    if n >= len(splits["train"].x):
        raise VaekitError(
            f"data.validation = {n} leaves no training examples (the training split has {len(splits['train'].x)})"
        )
    train, valid = _partition(splits["train"], n, in_order)
    return {**splits, "train": train, "valid": valid}


def _file(cfg: DataConfig) -> tuple[dict[str, Split], list[str] | None, list[str] | None]:
    """The splits of a file or folder ('all' where it has none of its own), and a table's columns and label names."""
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        x, y, names, classes = read_folder(path, cfg.channels, cfg.image_size)
        return {"all": Split(x, y, names)}, None, classes
    if path.suffix == ".csv":
        table = read_csv(path, cfg.label_column, cfg.one_hot)
        return {"all": Split(table.x, table.y)}, table.columns, table.label_names
    if path.suffix in (".npy", ".npz") and path.is_file():
        return _arrays(path), None, None
    if path.suffix in (".npy", ".npz"):
        raise VaekitError(f"data file not found: {path}")
    raise VaekitError(
        f"unknown data '{cfg.name}': use one of {', '.join(SOURCES)}, a .npy/.npz/.csv file or an image folder"
    )


def physical_memory() -> int:
    """The machine's memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _mapped(cfg: DataConfig) -> Split | None:
    """The examples of a .npy file memory-mapped, where data.memory_map asks for it: always (on), never (off), or
    (auto) when they take more than a quarter of the machine's memory; None where they are read into memory."""
    path = Path(cfg.name).expanduser()
    if cfg.memory_map == "off" or (cfg.memory_map == "auto" and (path.suffix != ".npy" or not path.is_file())):
        return None
    if path.suffix != ".npy":
        raise VaekitError(f"data.memory_map = on maps a .npy file, and {cfg.name} is not one")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise VaekitError(f"data file not found: {path}") from None
    except (OSError, ValueError, EOFError) as e:
        if cfg.memory_map == "auto":
            return None  # reading it whole says what is wrong with it
        raise VaekitError(f"cannot read {path} as a NumPy array file: {first_line(e)}") from None
    if cfg.memory_map == "auto" and a.size * 4 <= physical_memory() // 4:
        return None
    if a.dtype != np.float32:
        raise VaekitError(
            f"{path} holds {a.dtype}: a memory-mapped file is used as it is stored, so it must be float32 in [0, 1] "
            "(convert it once, or set data.memory_map = off to read it into memory)"
        )
    if a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        raise VaekitError(f"{path} has shape {a.shape}: a memory-mapped file's images must be channels-first")
    with warnings.catch_warnings():  # read-only: nothing writes into the examples
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(a)
    return Split(_as_examples(x, str(path)))


def _keep_classes(splits: dict[str, Split], classes: list[int], name: str) -> dict[str, Split]:
    """The training split reduced to the examples of the given classes (the one-class setting); the others kept."""
    train = splits["train"]
    if train.y is None:
        raise VaekitError(f"data.classes needs labels, and data '{name}' has none")
    keep = torch.isin(train.y, torch.tensor(classes))
    if not keep.any():
        raise VaekitError(f"data '{name}' has no training examples of the classes {classes}")
    return {**splits, "train": train.take(keep.nonzero().flatten())}


def load_data(cfg: DataConfig) -> Dataset:
    """Load the data set cfg names into memory; with cfg.binarize, held-out splits are binarised once."""
    columns = label_names = None
    mapped = None if cfg.name in SOURCES else _mapped(cfg)
    if cfg.name in SOURCES:
        root = Path(cfg.root).expanduser() if cfg.root else default_root()
        splits = SOURCES[cfg.name](cfg, root)
    else:
        splits, columns, label_names = ({"all": mapped}, None, None) if mapped else _file(cfg)
        if "all" in splits:
            splits = _split(splits["all"], cfg.test_fraction, in_order=mapped is not None)
    _check(splits, cfg.name, unit_range=columns is None)
    if mapped and (cfg.classes or cfg.binarize):
        what = "data.classes" if cfg.classes else "data.binarize, which binarises the held-out examples once,"
        raise VaekitError(f"{what} would copy the memory-mapped {cfg.name} into memory; prepare the file instead")
    if cfg.classes:
        splits = _keep_classes(splits, cfg.classes, cfg.name)
    if cfg.validation:
        splits = _hold_out(splits, cfg.validation, cfg.name, in_order=mapped is not None)
    scaler = None
    if columns is not None:
        # Tables are standardised with the statistics of the examples the model trains on, kept with the run.
        scaler = Scaler.fit(splits["train"].x, columns)
        splits = {k: Split(scaler.apply(s.x, columns, cfg.name), s.y, s.names) for k, s in splits.items()}
    if cfg.binarize:
        # Held-out splits get one fixed binarisation so that their losses are comparable between runs.
        g = torch.Generator().manual_seed(0)
        for name, s in splits.items():
            if name != "train":
                splits[name] = Split(torch.bernoulli(s.x, generator=g), s.y, s.names)
    return Dataset(cfg.name, splits, scaler, label_names, mapped=mapped is not None)


def relocated(cfg: DataConfig, data_dir: str | Path) -> DataConfig:
    """cfg with its data looked for in data_dir: a built-in set under it, a file or folder by its own name in it."""
    where = Path(data_dir).expanduser().resolve()
    moved = copy.deepcopy(cfg)
    moved.root = str(where)
    if cfg.name not in SOURCES:
        moved.name = str(where / Path(cfg.name).name)
    return moved


def load_examples(cfg: DataConfig, split: str = "test", scaler: Scaler | None = None) -> tuple[Split, list[str] | None]:
    """The examples of data to be scored, and the names of their labels where those were text: a file or folder
    whole and in its order (for an .npz with x_train and x_test, the split asked for), or a split of a built-in
    data set. A table is standardised with scaler."""
    if cfg.name in SOURCES:
        return load_data(cfg).split(split), None
    splits, columns, label_names = _file(cfg)
    splits = {"all": splits["all"]} if "all" in splits else {split: Dataset(cfg.name, splits).split(split)}
    _check(splits, cfg.name, unit_range=columns is None)
    whole = next(iter(splits.values()))
    if columns is None:
        return whole, label_names
    if scaler is None:
        raise VaekitError(f"{cfg.name} is a table, but the model was not trained on one, so it has no table statistics")
    return Split(scaler.apply(whole.x, columns, cfg.name), whole.y), label_names
