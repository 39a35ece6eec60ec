"""Data larger than memory: a float32 .npy file memory-mapped and trained on a batch at a time, in a process whose
memory is capped at a third of the file's size; and how memory mapping is chosen and what it refuses."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import vaekit
from vaekit import DataConfig
from vaekit.cli import main

MiB = 2**20
# What the process may allocate beyond what it holds once torch is imported (about 0.75 GiB, most of it reserved
# address space): the file is four times that.
HEADROOM = 256 * MiB
ROWS, WIDTH = 4 * HEADROOM // (4 * 1024), 1024  # a 1 GiB float32 file: 262,144 examples of 1,024 values

CAPPED = textwrap.dedent("""
    import resource, sys
    import vaekit.training
    from vaekit.cli import main
    def private():
        return int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmData"].split()[0]) * 1024
    start = private()
    resource.setrlimit(resource.RLIMIT_DATA, (start + {headroom}, start + {headroom}))
    code = main(sys.argv[1:])
    print("peak rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "grew", private() - start)
    sys.exit(code)
""")


def capped(*args: str) -> subprocess.CompletedProcess[str]:
    """`vaekit ARGS` in a process that may allocate at most HEADROOM bytes of private memory once torch is loaded."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", CAPPED.format(headroom=HEADROOM), *args], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip


@pytest.mark.heavy
def test_training_from_a_memory_mapped_file_four_times_the_memory_limit(tmp_path):
    """A 1 GiB .npy file trains for an epoch, with a held-out split, in a process that may allocate no more than
    256 MiB of private memory (everything but mapped files) beyond what importing torch takes; read into memory
    instead, the same file is refused for lack of memory.

    Measured here: peak RSS about 1.8 GiB, of which the file's pages are 1 GiB (the kernel keeps them cached while
    memory is free and drops them when it is needed), and private memory grew by about 0.1 GiB."""
    path = tmp_path / "big.npy"
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(ROWS, WIDTH))  # sparse: zeros cost nothing
    x[:: ROWS // 1024] = np.random.default_rng(0).random((1024, WIDTH), dtype=np.float32)  # some examples not zero
    x.flush()
    del x
    assert path.stat().st_size > 4 * HEADROOM
    run = tmp_path / "run"
    common = ["train", "--data", str(path), "--epochs", "1", "--batch-size", "256", "--hidden", "32",
              "--no-plots", "--no-report", "--device", "cpu", "-q"]  # fmt: skip
    done = capped(*common, "--out", str(run), "--set", "data.memory_map=on")
    assert done.returncode == 0, done.stderr
    peak, grew = (int(v) for v in done.stdout.split()[-3::2])
    print(f"peak RSS {peak / 2**30:.2f} GiB, private memory grew by {grew / 2**30:.2f} GiB")
    assert grew <= HEADROOM
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and '"test_loss": ' in metrics[0] and '"train_loss": null' not in metrics[0]
    refused = capped(*common, "--out", str(tmp_path / "in-memory"), "--set", "data.memory_map=off")
    assert refused.returncode == 2 and refused.stderr.startswith("vaekit: error: out of memory"), refused.stderr


def test_auto_maps_only_files_larger_than_a_quarter_of_memory(tmp_path, monkeypatch):
    """data.memory_map = auto reads a small file into memory and maps one over a quarter of the machine's memory;
    mapped, a file's held-out examples are its last rows (views of the file), in memory a fixed random choice."""
    path = tmp_path / "x.npy"
    x = np.random.default_rng(1).random((100, 6), dtype=np.float32)
    np.save(path, x)
    data = vaekit.load_data(DataConfig(name=str(path)))
    assert not data.mapped and not torch.equal(data.split("test").x, torch.from_numpy(x[80:]))
    monkeypatch.setattr("vaekit.data.physical_memory", lambda: 4 * x.nbytes - 4)
    data = vaekit.load_data(DataConfig(name=str(path), validation=10))
    assert data.mapped
    assert torch.equal(data.split("test").x, torch.from_numpy(x[80:]))
    assert torch.equal(data.split("valid").x, torch.from_numpy(x[70:80]))
    assert torch.equal(data.split("train").x, torch.from_numpy(x[:70]))
    monkeypatch.setattr("vaekit.data.physical_memory", lambda: 4 * x.nbytes)
    assert not vaekit.load_data(DataConfig(name=str(path))).mapped


@pytest.mark.parametrize(
    ("array", "setting", "message"),
    [
        (np.zeros((10, 4), np.uint8), "data.memory_map=on", "holds uint8: a memory-mapped file is used as it is "
         "stored, so it must be float32 in [0, 1] (convert it once, or set data.memory_map = off to read it into "
         "memory)"),
        (np.zeros((10, 8, 8, 3), np.float32), "data.memory_map=on", "has shape (10, 8, 8, 3): a memory-mapped "
         "file's images must be channels-first"),
        (np.zeros((10, 4), np.float32), "data.binarize=true", "data.binarize, which binarises the held-out examples "
         "once, would copy the memory-mapped {path} into memory; prepare the file instead"),
    ],
)  # fmt: skip
def test_what_a_memory_mapped_file_cannot_be_is_one_line(tmp_path, capsys, array, setting, message):
    """A file that cannot be used mapped is refused in one line, before a run directory is made."""
    path = tmp_path / "x.npy"
    np.save(path, array)
    code = main(["train", "--data", str(path), "--out", str(tmp_path / "run"), "--set", "data.memory_map=on",
                 "--set", setting, "--no-plots"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run").exists()
    text = message.format(path=path)
    assert err == f"vaekit: error: {path} {text}\n" or err == f"vaekit: error: {text}\n"
