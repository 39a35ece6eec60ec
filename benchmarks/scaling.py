"""Training examples per second with one process and with several (torchrun, DistributedDataParallel), side by side.

Each configuration trains the seed preset's model on MNIST (or on the bundled digits when MNIST is not found) for a
few epochs as a user would, `torchrun --nproc-per-node N -m vaekit train ...` (and plain `vaekit train` for one
process), and reads the seconds of every epoch but the first from the run's metrics.jsonl. On CPUs the processes
share the machine's cores: N processes get cores/N threads each, so the table compares ways of using the same cores.
On a machine with GPUs, `--device cuda` runs one process per GPU.

    python benchmarks/scaling.py [--data-dir ../shared/data] [--processes 1,2] [--batch-sizes 64,512] [--epochs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import mnist_copy


def epoch_seconds(processes: int, batch: int, epochs: int, data: list[str], device: str, threads: int) -> list[float]:
    """Seconds of each epoch after the first, for one training run."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        launch = torchrun if processes > 1 else []
        command = [sys.executable, *launch, "-m", "vaekit", "train", "--preset", "seed", *data, "--epochs", str(epochs),
                   "--batch-size", str(batch), "--device", device, "--out", str(run), "--no-plots", "--no-report", "-q",
                   "--set", "train.checkpoint_every=0"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["seconds"] for r in rows[1:]]


def main() -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--batch-sizes", default="64,512")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    found = (a.data_dir / "MNIST" / "raw").is_dir()
    with mnist_copy(a.data_dir) if found else contextlib.nullcontext((None, None)) as (_, root):
        if found:
            data, name, n = ["--data", "mnist", "--data-dir", str(root), "--no-download"], "MNIST", 60_000
        else:
            data, name, n = ["--data", "digits"], "digits (MNIST not found)", 1437
        cores = os.cpu_count() or 1
        print(f"seed model on {name}, device {a.device}, {cores} cores; median of epochs 2..{a.epochs}\n")
        print("| batch | processes | threads each | s/epoch | examples/s | vs 1 process |")
        print("|---|---|---|---|---|---|")
        for batch in map(int, a.batch_sizes.split(",")):
            base = None
            for processes in map(int, a.processes.split(",")):
                threads = max(1, cores // processes) if a.device == "cpu" else 1
                seconds = statistics.median(epoch_seconds(processes, batch, a.epochs, data, a.device, threads))
                rate = n / seconds
                base = base or rate
                print(f"| {batch} | {processes} | {threads} | {seconds:.2f} | {rate:,.0f} | {rate / base:.2f} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
