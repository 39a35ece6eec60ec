"""What the MNIST training benchmarks share: their command line and a private copy of the data."""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def arguments(doc: str, epochs: int) -> argparse.Namespace:
    """Parse --data-dir, --epochs and --rounds, check that MNIST is there and print the setting."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--rounds", type=int, default=2, help="each round runs all; the order alternates")
    p.add_argument("--target", type=float, default=154.8, help="seed_speed: the test loss the fast preset must reach")
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


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_bound(device: torch.device, n: int = 4096, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n float32 matrix product."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
