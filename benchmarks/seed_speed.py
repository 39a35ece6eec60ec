"""Seconds per epoch of the classic tutorial VAE loop versus `vaekit train --preset seed`, side by side.

The tutorial loop is pytorch/examples vae/main.py with the seed's sizes (784-256-2): torchvision MNIST through a
DataLoader with ToTensor, batch 64, Adam 1e-3, summed sigmoid + BCE + KL. Both run on the same machine and data,
alternating (tutorial, vaekit, vaekit, tutorial, ...), and the script prints per-epoch seconds, final test losses and
the speed ratio.

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
from common import arguments, mnist_copy
from torch import nn
from torchvision import datasets, transforms


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
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"  tutorial epoch {epoch}: {rows[-1]['seconds']:.2f} s, test loss {rows[-1]['test_loss']:.2f}")
    return rows


def run_vaekit(root: Path, epochs: int, out: Path) -> list[dict]:
    """`vaekit train --preset seed` as a user runs it; returns its metrics.jsonl rows."""
    cmd = [
        sys.executable,
        "-m",
        "vaekit",
        "train",
        "--preset",
        "seed",
        "--data-dir",
        str(root),
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-plots",
        "-q",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print(f"  vaekit   epoch {r['epoch']}: {r['seconds']:.2f} s, test loss {r['test_loss']:.2f}")
    return rows


def main() -> None:
    """Run both loops alternately and print the comparison."""
    a = arguments(__doc__, epochs=10)
    with mnist_copy(a.data_dir) as (tmp, root):
        results: dict[str, list[list[dict]]] = {"tutorial": [], "vaekit": []}
        for r in range(a.rounds):
            order = ["tutorial", "vaekit"] if r % 2 == 0 else ["vaekit", "tutorial"]
            for name in order:
                print(f"round {r + 1}: {name}")
                rows = (
                    run_tutorial(root, a.epochs) if name == "tutorial" else run_vaekit(root, a.epochs, tmp / f"run{r}")
                )
                results[name].append(rows)
    seconds = {k: [row["seconds"] for rows in v for row in rows] for k, v in results.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    fastest = {k: min(v) for k, v in seconds.items()}
    final = {k: statistics.mean(rows[-1]["test_loss"] for rows in v) for k, v in results.items()}
    print()
    print(f"{'':10s} {'s/epoch median':>15s} {'s/epoch fastest':>16s} {'test loss after ' + str(a.epochs):>22s}")
    for k in results:
        print(f"{k:10s} {median[k]:15.2f} {fastest[k]:16.2f} {final[k]:22.2f}")
    # The fastest epochs are the least disturbed by other work on a shared machine; both ratios are printed.
    print(
        f"speed-up (tutorial / vaekit seconds per epoch): {median['tutorial'] / median['vaekit']:.2f}x median, "
        f"{fastest['tutorial'] / fastest['vaekit']:.2f}x fastest"
    )
    print(f"test loss difference (vaekit - tutorial): {final['vaekit'] - final['tutorial']:+.2f} nats")


if __name__ == "__main__":
    main()
