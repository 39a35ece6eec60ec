"""Seconds per epoch of the classic tutorial VAE loop versus `vaekit train --preset seed`, the seed's matrix-multiply
floor, and how much sooner the `fast` preset reaches the tutorial's 10-epoch test loss, side by side.

The tutorial loop is pytorch/examples vae/main.py with the seed's sizes (784-256-2): torchvision MNIST through a
DataLoader with ToTensor, batch 64, Adam 1e-3, summed sigmoid + BCE + KL. Every round runs, in alternating order, the
tutorial, `vaekit train --preset seed`, `vaekit train --preset fast` and the floor measurement, on the same machine
and data. Seconds are training seconds on both sides: the test-set pass after each epoch is not counted.

- Floor: the matrix-multiply FLOPs of one seed epoch (forward and backward of every step, counted by
  torch.utils.flop_counter) at the best float32 rate of a 4096 x 4096 product measured in the same round. The seed's
  epoch is reported as a multiple of it, round by round.
- Time to quality: the `fast` preset's training seconds up to the first epoch whose test loss is at or below the
  tutorial's own 10-epoch test loss (154.8 nats; --target), against the tutorial's 10 epochs.

    python benchmarks/seed_speed.py --data-dir ../shared/data [--epochs 10] [--rounds 2]

--data-dir must hold MNIST/raw in torchvision's layout; it is copied to a temporary folder first because torchvision
unpacks the archives next to them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import arguments, matmul_bound, mnist_copy
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from vaekit.config import make_config
from vaekit.model import VAE, objective


class TutorialVAE(nn.Module):
    """The tutorial's model, with hidden 256 and latent 2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc21 = nn.Linear(256, 2)
        self.fc22 = nn.Linear(256, 2)
        self.fc3 = nn.Linear(2, 256)
        self.fc4 = nn.Linear(256, 784)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def tutorial_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The tutorial's loss: summed BCE plus KL to N(0, I)."""
    bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def run_tutorial(root: Path, epochs: int) -> list[dict]:
    """The tutorial's train/test loop; returns per-epoch seconds and losses."""
    torch.manual_seed(1)
    train_loader = torch.utils.data.DataLoader(
        datasets.MNIST(root, train=True, download=True, transform=transforms.ToTensor()), batch_size=64, shuffle=True
    )
    test_loader = torch.utils.data.DataLoader(
        datasets.MNIST(root, train=False, transform=transforms.ToTensor()), batch_size=64, shuffle=False
    )
    model = TutorialVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        train_loss = 0.0
        for data, _ in train_loader:
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            loss = tutorial_loss(recon, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        seconds = time.perf_counter() - start
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for data, _ in test_loader:
                recon, mu, logvar = model(data)
                test_loss += tutorial_loss(recon, data, mu, logvar).item()
        rows.append(
            {
                "epoch": epoch,
                "train_loss": train_loss / len(train_loader.dataset),
                "test_loss": test_loss / len(test_loader.dataset),
                "seconds": seconds,
            }
        )
        print(f"  tutorial epoch {epoch}: {rows[-1]['seconds']:.2f} s, test loss {rows[-1]['test_loss']:.2f}")
    return rows


def run_vaekit(root: Path, out: Path, preset: str, epochs: int | None = None) -> list[dict]:
    """`vaekit train --preset PRESET` as a user runs it; returns its metrics.jsonl rows (training seconds)."""
    cmd = [sys.executable, "-m", "vaekit", "train", "--preset", preset, "--data-dir", str(root), "--device", "cpu",
           "--out", str(out), "--no-plots", "-q"]  # fmt: skip
    subprocess.run(cmd + (["--epochs", str(epochs)] if epochs else []), check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print(f"  {preset:8s} epoch {r['epoch']}: {r['seconds']:.2f} s, test loss {r['test_loss']:.2f}")
    return rows


def seed_epoch_flops(n: int = 60000) -> float:
    """Matrix-multiply FLOPs of one seed epoch: forward and backward of every step, the last, short batch included."""
    cfg = make_config("seed")
    model = VAE((1, 28, 28), cfg.model)
    bs = cfg.train.batch_size

    def step(b: int) -> float:
        with FlopCounterMode(display=False) as counter:
            objective(model, torch.rand(b, 1, 28, 28)).sum().backward()
        return counter.get_total_flops()

    return (n // bs) * step(bs) + (step(n % bs) if n % bs else 0)


def floor(flops: float) -> dict:
    """The seed epoch's matrix-multiply floor: its FLOPs at this round's best float32 product rate."""
    rate = matmul_bound(torch.device("cpu"))
    print(f"  floor: {flops / 1e9:.0f} GFLOP at {rate / 1e9:.0f} GFLOP/s = {flops / rate:.2f} s/epoch")
    return {"seconds": flops / rate, "rate": rate}


def reached(rows: list[dict], target: float) -> tuple[int | None, float]:
    """The first epoch at or below target and the training seconds up to it (all epochs' if none is)."""
    seconds = 0.0
    for r in rows:
        seconds += r["seconds"]
        if r["test_loss"] <= target:
            return r["epoch"], seconds
    return None, seconds


def main() -> None:
    """Run the tutorial, both presets and the floor alternately, and print the comparison."""
    a = arguments(__doc__, epochs=10)
    flops = seed_epoch_flops()
    names = ["tutorial", "seed", "fast", "floor"]
    results: dict[str, list] = {k: [] for k in names}
    with mnist_copy(a.data_dir) as (tmp, root):
        for r in range(a.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                print(f"round {r + 1}: {name}")
                if name == "tutorial":
                    results[name].append(run_tutorial(root, a.epochs))
                elif name == "floor":
                    results[name].append(floor(flops))
                else:
                    epochs = a.epochs if name == "seed" else None
                    results[name].append(run_vaekit(root, tmp / f"{name}{r}", name, epochs))
    per_epoch = {k: [statistics.median(row["seconds"] for row in rows) for rows in results[k]] for k in names[:2]}
    final = {k: statistics.mean(rows[-1]["test_loss"] for rows in results[k]) for k in names[:2]}
    floors = [f["seconds"] for f in results["floor"]]
    print()
    print(f"{'':10s} {'s/epoch (median of each round)':>32s} {'test loss after ' + str(a.epochs):>22s}")
    for k in names[:2]:
        print(f"{k:10s} {'  '.join(f'{v:.2f}' for v in per_epoch[k]):>32s} {final[k]:22.2f}")
    rates = "  ".join(f"{f['rate'] / 1e9:.0f}" for f in results["floor"])
    print(f"{'floor':10s} {'  '.join(f'{v:.2f}' for v in floors):>32s}   ({flops / 1e9:.0f} GFLOP at {rates} GFLOP/s)")
    speed_up = statistics.median(t / v for t, v in zip(*per_epoch.values(), strict=True))
    over_floor = ", ".join(f"{v / f:.2f}x" for v, f in zip(per_epoch["seed"], floors, strict=True))
    print(f"seed speed-up over the tutorial: {speed_up:.2f}x; seed epoch / floor: {over_floor} (by round)")
    print(f"test loss difference (seed - tutorial): {final['seed'] - final['tutorial']:+.2f} nats")
    for r, (tutorial, fast) in enumerate(zip(results["tutorial"], results["fast"], strict=True)):
        tutorial_seconds = sum(row["seconds"] for row in tutorial)
        epoch, seconds = reached(fast, a.target)
        where = f"epoch {epoch}" if epoch else f"not within its {len(fast)} epochs"
        print(
            f"round {r + 1}: fast reached {a.target} at {where} after {seconds:.1f} s of training; the tutorial's "
            f"{len(tutorial)} epochs took {tutorial_seconds:.1f} s (test loss {tutorial[-1]['test_loss']:.2f}): "
            f"{tutorial_seconds / seconds:.1f}x sooner"
        )


if __name__ == "__main__":
    main()
