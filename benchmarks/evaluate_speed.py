"""Images per second of `vaekit evaluate --k 5000`, and the fraction of this machine's matrix-multiply bound it reaches.

For each architecture (the seed preset's 784-256-2 ReLU MLP and iwae-1l's 784-200-200-50 tanh MLP, both with a
Bernoulli decoder on binary 28x28 images) the script:
  1. measures the matmul bound: the best FLOP/s of a large float32 matrix product on the same device and threads;
  2. times vaekit's estimator, vaekit.estimate, at k = 5000 on a set of images;
  3. counts the matrix-multiply FLOPs that estimate executes (torch.utils.flop_counter) and divides their rate by
     the bound;
  4. times a plain reference implementation side by side (per image: k draws in one batch,
     binary_cross_entropy_with_logits, torch.distributions.Normal, nn.Tanh) and reports the speed ratio.
Runs alternate (reference, vaekit, vaekit, reference, ...) so that load on a shared machine hits both alike.

    python benchmarks/evaluate_speed.py [--images 32] [--k 5000] [--rounds 2] [--device cpu]

Timings are for randomly initialised weights: the work done does not depend on their values.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from common import matmul_bound, sync
from torch.distributions import Normal
from torch.utils.flop_counter import FlopCounterMode

from vaekit.config import ModelConfig
from vaekit.model import VAE
from vaekit.uses.evaluation import estimate

ARCHITECTURES = {
    "seed (784-256-2 relu)": ModelConfig(hidden=[256], latent=2, activation="relu"),
    "iwae-1l (784-200-200-50 tanh)": ModelConfig(hidden=[200, 200], latent=50, activation="tanh"),
}


@torch.no_grad()
def reference_log_px(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """A plain importance-sampled log p(x), one image at a time, written the way reference code usually is."""
    out = []
    for xi in x:
        mean, logvar = model.encode(xi.unsqueeze(0))
        std = torch.exp(0.5 * logvar)
        z = mean + std * torch.randn(k, mean.shape[1], device=x.device)
        h = z
        for layer in model.decoder.net:
            h = torch.tanh(h) if type(layer).__name__ == "Tanh" else layer(h)
        log_px = -F.binary_cross_entropy_with_logits(h, xi.flatten().expand(k, -1), reduction="none").sum(1)
        log_pz = Normal(0.0, 1.0).log_prob(z).sum(1)
        log_qz = Normal(mean, std).log_prob(z).sum(1)
        out.append(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(k))
    return torch.stack(out)


def timed(fn, device: torch.device) -> float:
    """Seconds fn() takes."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    """Measure and print, architecture by architecture."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32, help="images per timed run (default: 32)")
    p.add_argument("--k", type=int, default=5000, help="importance samples per image (default: 5000)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per architecture (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((a.images, 1, 28, 28), 0.15)).to(device)
    bound = matmul_bound(device)
    threads = torch.get_num_threads()
    print(f"device {device}, {threads} threads; matmul bound {bound / 1e9:.1f} GFLOP/s (4096^3 float32)")
    for name, cfg in ARCHITECTURES.items():
        model = VAE((1, 28, 28), cfg).to(device).eval()
        with FlopCounterMode(display=False) as counter:
            estimate(model, x[:1], a.k, progress=False)
        flops_per_image = counter.get_total_flops()
        estimate(model, x[:2], a.k, progress=False)  # warm-up
        runs = {
            "vaekit": (lambda m=model: estimate(m, x, a.k, progress=False)),
            "reference": (lambda m=model: reference_log_px(m, x, a.k)),
        }
        times: dict[str, list[float]] = {label: [] for label in runs}
        for r in range(a.rounds):
            for label in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                times[label].append(timed(runs[label], device))
        ours, theirs = statistics.median(times["vaekit"]), statistics.median(times["reference"])
        rate = a.images / ours
        print(
            f"{name}: vaekit {rate:.1f} images/s, reference {a.images / theirs:.1f} images/s (medians of {a.rounds}),"
            f" speed-up {theirs / ours:.2f}x; {flops_per_image / 1e9:.2f} GFLOP of matmul per image ->"
            f" {flops_per_image * rate / bound:.0%} of the matmul bound (median run),"
            f" {flops_per_image * a.images / min(times['vaekit']) / bound:.0%} (fastest)"
        )


if __name__ == "__main__":
    main()
