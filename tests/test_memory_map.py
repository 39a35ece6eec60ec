"""Data larger than memory: a float32 .npy file three times the memory limit of the process that trains on it,
memory-mapped and read a batch at a time; and how memory mapping is chosen and what it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import vaekit
from vaekit import DataConfig
from vaekit.cli import main

# The process's limit on private memory (RLIMIT_DATA: everything but mapped files) is what it holds after a small
# warm-up run plus HEADROOM; the file it trains on is TIMES that whole limit. The warm-up loads what any run loads
# once (torch's libraries, about 0.75 GiB of VmData, the modules and the allocator's arenas), so that HEADROOM is what
# the big file may cost. The process makes the file itself, before the limit is set, to know its size.
HEADROOM, TIMES, WIDTH = 256 * 2**20, 3, 4096

CAPPED = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from vaekit.cli import main

    def private():
        return int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmData"].split()[0]) * 1024

    out, args = sys.argv[1], sys.argv[2:]
    np.save(out + "/small.npy", np.random.default_rng(1).random((2000, {width}), dtype=np.float32))
    warm = main(["train", "--data", out + "/small.npy", *args, "--out", out + "/small", "--set", "data.memory_map=on"])
    limit = private() + {headroom}
    rows = -(-{times} * limit // (4 * {width}))
    x = np.lib.format.open_memmap(out + "/big.npy", mode="w+", dtype=np.float32, shape=(rows, {width}))  # sparse
    some = x[:: rows // 1024]
    x[:: rows // 1024] = np.random.default_rng(0).random(some.shape, dtype=np.float32)  # and some examples not zero
    x.flush()
    del x, some
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    base = ["train", "--data", out + "/big.npy", *args]
    mapped = main([*base, "--out", out + "/mapped", "--set", "data.memory_map=on"])
    peak, grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, private() - limit + {headroom}
    read = main([*base, "--out", out + "/read", "--set", "data.memory_map=off"])
    print(json.dumps(dict(limit=limit, size=4 * rows * {width}, warm=warm, mapped=mapped, read=read, peak=peak,
                          grew=grew)))
""")


@pytest.mark.heavy
def test_training_from_a_memory_mapped_file_three_times_the_memory_limit(tmp_path):
    """A .npy file three times the process's memory limit (about 3.5 GiB against 1.2 GiB) trains for an epoch, with a
    held-out split; read into memory instead, the same file is refused in one line for lack of memory.

    Measured here: peak RSS 4.2 to 4.6 GiB, nearly all of it the file's pages, which the kernel keeps cached while
    memory is free and drops when it is needed. Private memory peaked 57 to 83 MiB above the warm-up's (sampled every
    2 ms in a probe run): HEADROOM is three times that."""
    args = ["--epochs", "1", "--batch-size", "256", "--hidden", "32", "--no-plots", "--no-report", "--device", "cpu",
            "-q"]  # fmt: skip
    code = CAPPED.format(headroom=HEADROOM, times=TIMES, width=WIDTH)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.splitlines()[-1])
    print(f"file {r['size'] / 2**30:.2f} GiB, limit {r['limit'] / 2**30:.2f} GiB, peak RSS {r['peak'] / 2**30:.2f} "
          f"GiB, private memory grew by {r['grew'] / 2**30:.2f} GiB")  # fmt: skip
    assert r["warm"] == 0 and r["mapped"] == 0, done.stderr
    assert r["size"] >= TIMES * r["limit"]
    metrics = (tmp_path / "mapped" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and '"test_loss": ' in metrics[0] and '"train_loss": null' not in metrics[0]
    assert r["read"] == 2 and done.stderr.startswith("vaekit: error: out of memory"), done.stderr
    assert not (tmp_path / "read").exists()


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
