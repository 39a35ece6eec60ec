"""Data sources, each loaded once into memory as float tensors in [0, 1] with optional integer labels."""

from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import VaekitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"


@dataclass
class Split:
    """One split of a data set: inputs x of shape (N, C, H, W) or (N, D), and labels y of shape (N,) if known."""

    x: torch.Tensor
    y: torch.Tensor | None = None


@dataclass
class Dataset:
    """A named data set held in memory as splits ('train', 'test', sometimes 'valid')."""

    name: str
    splits: dict[str, Split]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example."""
        return tuple(self.splits["train"].x.shape[1:])

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


def _digits(cfg: DataConfig, root: Path) -> dict[str, Split]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return _split(x, torch.from_numpy(bunch.target).long(), cfg.test_fraction)


def _torchvision(class_name: str, cfg: DataConfig, root: Path) -> dict[str, Split]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, class_name)
    raw = root / class_name / "raw"
    if not cfg.download:
        # Archives copied in by hand are unpacked here, since torchvision only unpacks as part of a download.
        from torchvision.datasets.utils import extract_archive

        for filename, _ in cls.resources:
            if (raw / filename).exists() and not (raw / Path(filename).stem).exists():
                try:
                    extract_archive(str(raw / filename), str(raw))
                except (OSError, EOFError) as e:
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
    except (OSError, EOFError) as e:
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


def _partition(split: Split, n_out: int) -> tuple[Split, Split]:
    """A fixed random division of a split, the same on every machine: the rest, and n_out examples held out."""
    order = torch.randperm(len(split.x), generator=torch.Generator().manual_seed(0))
    rest, out = order[n_out:], order[:n_out]
    labels = (lambda idx: None) if split.y is None else (lambda idx: split.y[idx])
    return Split(split.x[rest], labels(rest)), Split(split.x[out], labels(out))


def _split(x: torch.Tensor, y: torch.Tensor | None, test_fraction: float) -> dict[str, Split]:
    """A fixed random train/test split."""
    if len(x) < 2:
        raise VaekitError(f"only {len(x)} example: at least 2 are needed for a train and a test split")
    n_test = max(1, round(len(x) * test_fraction))
    if len(x) - n_test < 1:
        raise VaekitError(
            f"{len(x)} examples with test_fraction {test_fraction} leave none for training; lower data.test_fraction"
        )
    train, test = _partition(Split(x, y), n_test)
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


def _arrays(cfg: DataConfig, path: Path) -> dict[str, Split]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise VaekitError(f"cannot read {path} as a NumPy array file: {str(e).splitlines()[0]}") from None
    if isinstance(loaded, np.ndarray):
        arrays = {"x": loaded}
    else:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
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
    return _split(x, _labels(arrays.get("y"), len(x), f"{path}:y"), cfg.test_fraction)


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _pixels(im, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """One PIL image as a (channels, H, W) float tensor in [0, 1], resized."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit and float images would be clipped to 8 bits by convert(); scale them to [0, 1] first.
        scale = 65535.0 if im.mode.startswith("I") else 1.0
        grey = Image.fromarray(np.asarray(im, dtype=np.float32) / scale, mode="F").resize(
            size, Image.Resampling.BILINEAR
        )
        return torch.from_numpy(np.array(grey, dtype=np.float32)).unsqueeze(0).repeat(channels, 1, 1)
    return (
        pil_to_tensor(im.convert("L" if channels == 1 else "RGB").resize(size, Image.Resampling.BILINEAR)).float() / 255
    )


def _image_folder(cfg: DataConfig, path: Path) -> dict[str, Split]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise VaekitError(f"no PNG or JPEG images found in {path}")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise VaekitError(f"cannot read image {f}: {e}") from None
    channels = cfg.channels or (3 if any(im.mode not in GREY_MODES for im in images) else 1)
    size = (cfg.image_size, cfg.image_size)
    x = torch.stack([_pixels(im, channels, size) for im in images])
    # Labels come from sub-folder names, as in torchvision's ImageFolder, when every image sits in one.
    parents = [f.parent for f in files]
    y = None
    if all(p != path for p in parents):
        classes = sorted({p.relative_to(path).parts[0] for p in parents})
        y = torch.tensor([classes.index(f.relative_to(path).parts[0]) for f in files])
    return _split(x, y, cfg.test_fraction)


def _check(splits: dict[str, Split], name: str) -> None:
    """Refuse data a VAE cannot learn from: empty, non-finite, or outside [0, 1]."""
    shape = None
    for split, s in splits.items():
        if len(s.x) == 0 or s.x[0].numel() == 0:
            raise VaekitError(f"data '{name}': split '{split}' is empty")
        if not torch.isfinite(s.x).all():
            raise VaekitError(f"data '{name}': split '{split}' contains NaN or infinite values")
        lo, hi = s.x.min().item(), s.x.max().item()
        if lo < 0 or hi > 1:
            raise VaekitError(
                f"data '{name}': values must lie in [0, 1] (scale the data first), found [{lo:g}, {hi:g}]"
            )
        if shape is not None and s.x.shape[1:] != shape:
            raise VaekitError(f"data '{name}': split '{split}' has examples of shape {tuple(s.x.shape[1:])}")
        shape = s.x.shape[1:]


def _hold_out(splits: dict[str, Split], n: int, name: str) -> dict[str, Split]:
    """Move a fixed random choice of n training examples into a 'valid' split."""
    if "valid" in splits:
        raise VaekitError(f"data '{name}' has its own validation split; leave data.validation at 0")
    if n >= len(splits["train"].x):
        raise VaekitError(
            f"data.validation = {n} leaves no training examples (the training split has {len(splits['train'].x)})"
        )
    train, valid = _partition(splits["train"], n)
    return {**splits, "train": train, "valid": valid}


def load_data(cfg: DataConfig) -> Dataset:
    """Load the data set cfg names into memory; with cfg.binarize, held-out splits are binarised once."""
    if cfg.name in SOURCES:
        root = Path(cfg.root).expanduser() if cfg.root else default_root()
        splits = SOURCES[cfg.name](cfg, root)
    else:
        path = Path(cfg.name).expanduser()
        if path.is_dir():
            splits = _image_folder(cfg, path)
        elif path.suffix in (".npy", ".npz") and path.is_file():
            splits = _arrays(cfg, path)
        elif path.suffix in (".npy", ".npz"):
            raise VaekitError(f"data file not found: {path}")
        else:
            raise VaekitError(
                f"unknown data '{cfg.name}': use one of {', '.join(SOURCES)}, a .npy/.npz file or an image folder"
            )
    _check(splits, cfg.name)
    if cfg.validation:
        splits = _hold_out(splits, cfg.validation, cfg.name)
    if cfg.binarize:
        # Held-out splits get one fixed binarisation so that their losses are comparable between runs.
        g = torch.Generator().manual_seed(0)
        for name, s in splits.items():
            if name != "train":
                splits[name] = Split(torch.bernoulli(s.x, generator=g), s.y)
    return Dataset(cfg.name, splits)
