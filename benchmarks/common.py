"""What the MNIST training benchmarks share: their command line and a private copy of the data."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def arguments(doc: str, epochs: int) -> argparse.Namespace:
    """Parse --data-dir, --epochs and --rounds, check that MNIST is there and print the setting."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--rounds", type=int, default=2, help="each round runs both; the order alternates")
    a = p.parse_args()
    if not (Path(a.data_dir) / "MNIST" / "raw").is_dir():
        sys.exit(f"no MNIST/raw under {a.data_dir}; pass --data-dir")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.epochs} epochs, {a.rounds} rounds")
    return a


@contextlib.contextmanager
def mnist_copy(data_dir: str) -> Iterator[tuple[Path, Path]]:
    """A temporary folder and, inside it, a data root holding a copy of MNIST (torchvision unpacks beside the files)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(Path(data_dir) / "MNIST", root / "MNIST")
        yield Path(tmp), root
