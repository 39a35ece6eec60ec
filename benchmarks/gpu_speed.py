"""Seconds per epoch on a GPU of the seed and iwae-1l configurations, eager against the compiled step, side by side,
with a bare CUDA-graph loop of the seed's step as the reference.

For each configuration the script trains the same data with `train.compile = off` and `on` in alternating order
(rounds), through vaekit's API with the data on the device, and reports the median training seconds per epoch (the
first epoch, which compiles, reported apart), the test loss of each, and for iwae-1l the seconds per pass over the
data, which is what Burda et al.'s 3,280-pass schedule multiplies. The reference is the seed's step written bare
(fused capturable Adam, BCE with logits, the data order drawn on the device) captured once with torch.cuda.graph and
replayed: the speed a step without launch overhead reaches. A configuration whose step is not compiled on the device
(`vaekit.step.compile_reason`, MPS for one) runs eagerly only, and the script says why.

    python benchmarks/gpu_speed.py --data-dir ../shared/data [--epochs 5] [--rounds 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import mnist_copy, sync
from torch import nn

import vaekit
from vaekit.config import make_config
from vaekit.data import load_data
from vaekit.step import compile_reason

PRESETS = ("seed", "iwae-1l")


def trained(preset: str, root: Path, out: Path, epochs: int, device: str, mode: str) -> list[dict]:
    """Train preset for `epochs` epochs with train.compile = mode; its metrics rows."""
    settings = {"data.root": str(root), "data.download": False}
    data = load_data(make_config(preset, overrides=settings).data)
    over = {"epochs": epochs, "device": device, "compile": mode, "checkpoint_every": 0}
    return vaekit.train(preset, out, dataset=data, verbose=False, **settings, **over).metrics


def graph_reference(x: torch.Tensor, epochs: int, batch: int = 64) -> list[float]:
    """Seconds per epoch of the seed step (784-256-2) written bare and replayed as one captured CUDA graph."""
    device = x.device
    enc = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 4)).to(device)
    dec = nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 784)).to(device)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True, capturable=True)
    flat = x.reshape(len(x), -1)
    steps = len(flat) // batch
    index = torch.zeros(batch, dtype=torch.long, device=device)
    static = flat[:batch].clone()

    def step() -> None:
        static.copy_(flat[index])
        mean, logvar = enc(static).chunk(2, -1)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        rec = F.binary_cross_entropy_with_logits(dec(z), static, reduction="sum")
        loss = rec + 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up on a side stream, as capture requires
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    seconds = []
    for _ in range(epochs):
        order = torch.randperm(len(flat), device=device)
        sync(device)
        start = time.perf_counter()
        for s in range(steps):
            index.copy_(order[s * batch : (s + 1) * batch])
            graph.replay()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    """Measure and print, configuration by configuration."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=5, help="epochs per run; the first, which compiles, is apart")
    p.add_argument("--rounds", type=int, default=2, help="each round runs eager and compiled; the order alternates")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this benchmark measures the GPU step (pass --device cpu to try it on a CPU)")
    print(f"torch {torch.__version__}, device {a.device}, {a.epochs} epochs, {a.rounds} rounds")
    with mnist_copy(a.data_dir) as (tmp, root), tempfile.TemporaryDirectory() as runs:
        for preset in PRESETS:
            cfg = make_config(preset, overrides={"train.compile": "on"})
            reason = compile_reason(cfg, torch.device(a.device), cfg.train.epochs * 10**4)
            modes = ("off",) if reason else ("off", "on")
            if reason:
                print(f"{preset:8s} compiled  not run: {reason}")
            rows: dict[str, list[list[dict]]] = {mode: [] for mode in modes}
            for r in range(a.rounds):
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    out = Path(runs) / f"{preset}-{mode}-{r}"
                    rows[mode].append(trained(preset, root, out, a.epochs, a.device, mode))
            for mode, label in (("off", "eager"), ("on", "compiled"))[: len(modes)]:
                later = [row["seconds"] for run in rows[mode] for row in run[1:]]
                first = statistics.median(run[0]["seconds"] for run in rows[mode])
                loss = statistics.mean(run[-1]["test_loss"] for run in rows[mode])
                print(
                    f"{preset:8s} {label:9s} {statistics.median(later):7.3f} s/epoch (epochs 2+), first epoch "
                    f"{first:6.2f} s, test loss after {a.epochs}: {loss:.2f}"
                )
            if preset == "iwae-1l":
                fastest = modes[-1]
                per_pass = statistics.median(row["seconds"] for run in rows[fastest] for row in run[1:])
                hours = per_pass * 3280 / 3600
                label = {"off": "eager", "on": "compiled"}[fastest]
                print(f"iwae-1l: {per_pass:.2f} s per pass {label}; Burda et al.'s 3,280 passes: {hours:.1f} h")
        if a.device.startswith("cuda"):
            x = load_data(make_config("seed", overrides={"data.root": str(root)}).data).split("train").x
            seconds = graph_reference(x.to(a.device), a.epochs)
            print(f"seed     bare graph {statistics.median(seconds[1:]):7.3f} s/epoch (the reference)")


if __name__ == "__main__":
    main()
