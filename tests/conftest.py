"""Shared fixtures: the bundled digits data and the optional MNIST copy beside the project."""

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import vaekit
from vaekit.cli import main

SHARED = Path(os.environ.get("VAEKIT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# Every device the tests can run on here: code that places tensors is checked on a GPU where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

# Fixtures that run vaekit in child processes: the tests on their results are `heavy`, left out of mutation runs,
# where a child process would run the unmutated code and cost every mutant its start-up.
PROCESS_FIXTURES = {"trained", "used"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use a process fixture as heavy."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def digits() -> vaekit.Dataset:
    """scikit-learn's 8x8 digits as a vaekit data set."""
    return vaekit.load_data(vaekit.DataConfig(name="digits"))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the shared MNIST archives in torchvision's layout, or a skip when they are absent."""
    raw = SHARED / "MNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"MNIST archives not found in {raw} (set VAEKIT_TEST_DATA to a folder holding MNIST/raw)")
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(raw, root / "MNIST" / "raw")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: for them more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Terminal:
    """A stand-in for stderr on a terminal, where tqdm shows its bars unless told not to."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def run_cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the vaekit command in this process: its exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> None:
    """The command failed as a user error must: exit code 2 and one line on stderr, no traceback."""
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("vaekit: error:") and "Traceback" not in err, err


def _idx(array: np.ndarray, magic: int) -> bytes:
    """An MNIST archive: the IDX header and the unsigned bytes, gzipped."""
    return gzip.compress(struct.pack(f">{array.ndim + 1}i", magic, *array.shape) + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, seed: int = 0, train: int = 100, test: int = 40) -> Path:
    """Random images and labels in MNIST's four archives under root/MNIST/raw, as torchvision's layout has them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28)), 2051))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(_idx(rng.integers(0, 10, n), 2049))
    return root
