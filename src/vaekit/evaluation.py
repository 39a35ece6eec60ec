"""Measurements of a trained model on a tensor of examples (pure functions, batched, no files)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .model import VAE


@torch.no_grad()
def mean_loss(model: VAE, x: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> float:
    """Average single-sample negative ELBO per example in nats, with a fixed seed for the posterior draws."""
    g = torch.Generator(model.device).manual_seed(seed)
    total = torch.zeros((), device=model.device)
    for i in range(0, len(x), batch_size):
        total += model.loss(x[i : i + batch_size].to(model.device), g).sum()
    return total.item() / len(x)


@torch.no_grad()
def encode_all(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and log-variances for every example, computed in batches."""
    parts = [model.encode(x[i : i + batch_size].to(model.device)) for i in range(0, len(x), batch_size)]
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])


@dataclass
class Evaluation:
    """Log-likelihood estimates of a model on a set of examples, per example and summarised."""

    k: int  # importance samples per example
    seed: int
    elbo: torch.Tensor  # (N,) per-example ELBO, averaged over the k draws
    log_px: torch.Tensor  # (N,) per-example importance-weighted estimate of log p(x)
    kl_per_dim: list[float]  # mean KL (nats) per latent dimension, z1's (one-draw estimates if z2 exists), then z2's
    active_units: list[int]  # per latent layer: dimensions whose posterior mean varies over x (Cov > 0.01)
    dims: int  # dimensions of one example
    discrete: bool  # whether log p(x) is a log-probability mass, so that bits/dim is meaningful
    seconds: float

    @property
    def neg_elbo(self) -> float:
        """Mean negative ELBO in nats per example."""
        return -self.elbo.mean().item()

    @property
    def nll(self) -> float:
        """Mean importance-sampled negative log-likelihood in nats per example."""
        return -self.log_px.mean().item()

    @property
    def bits_per_dim(self) -> float | None:
        """The negative log-likelihood in bits per data dimension, for discrete data only."""
        return self.nll / (self.dims * math.log(2)) if self.discrete else None

    def summary(self) -> dict:
        """The summary numbers as plain JSON-ready data."""
        return {
            "k": self.k,
            "seed": self.seed,
            "examples": len(self.elbo),
            "neg_elbo": self.neg_elbo,
            "nll": self.nll,
            "bits_per_dim": self.bits_per_dim,
            "kl": sum(self.kl_per_dim),
            "active_units": sum(self.active_units),
            "active_units_per_layer": self.active_units,
            "kl_per_dim": self.kl_per_dim,
            "seconds": self.seconds,
        }


def _logmeanexp_batch(model: VAE, x: torch.Tensor, k: int, chunk: int, g: torch.Generator, dtype: torch.dtype):
    """For each example of x: log of the mean over k draws of the importance weight, and the mean log-weight."""
    lse = torch.full((len(x),), -math.inf, dtype=dtype, device=x.device)
    total = torch.zeros(len(x), dtype=dtype, device=x.device)
    posterior = model.encode(x)
    for start in range(0, k, chunk):
        log_px, kl = model.terms(x, min(chunk, k - start), analytic=False, generator=g, posterior=posterior)
        log_w = (log_px - kl.sum(-1)).to(dtype)
        lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
        total += log_w.sum(0)
    return lse - math.log(k), total / k


@torch.no_grad()
def estimate(
    model: VAE,
    x: torch.Tensor,
    k: int = 5000,
    seed: int = 0,
    max_elements: int | None = None,
    progress: bool = True,
) -> Evaluation:
    """ELBO, importance-weighted log p(x) with k samples (Burda et al. 2015), KL per dimension and active units.

    Examples and draws are batched so that no decoder output holds more than max_elements numbers (default: 2**20 on
    a CPU, which balances cache misses against per-operation overhead, 2**26 on a GPU); the result is deterministic
    for a given seed, device and max_elements.
    """
    start_time = time.perf_counter()
    device = model.device
    # Sums over thousands of draws are kept in float64, except on Apple GPUs, which have no float64.
    dtype = torch.float32 if device.type == "mps" else torch.float64
    g = torch.Generator(device).manual_seed(seed)
    cap = max_elements or (2**20 if device.type == "cpu" else 2**26)
    per_draw = math.prod(model.likelihood.params_shape())
    chunk = max(1, min(k, cap // per_draw))
    batch = max(1, cap // (chunk * per_draw)) if chunk == k else 1
    log_px, elbo, kl, means = [], [], [], []
    bar = tqdm(total=len(x), unit="img", desc=f"evaluate k={k}", disable=not progress or None, leave=False)
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(device)
        lp, eb = _logmeanexp_batch(model, xb, k, chunk, g, dtype)
        log_px.append(lp)
        elbo.append(eb)
        kl.append(model.terms(xb, 1, analytic=True, generator=g)[1][0].to(dtype).sum(0))
        means.append(torch.cat(model.posterior_means(xb, generator=g), -1).to(dtype))
        bar.update(len(xb))
    bar.close()
    sizes = [model.config.latent] + ([model.config.latent2] if model.config.latent2 else [])
    variance = torch.cat(means).var(0, correction=0).cpu()
    return Evaluation(
        k=k,
        seed=seed,
        elbo=torch.cat(elbo).cpu(),
        log_px=torch.cat(log_px).cpu(),
        kl_per_dim=(torch.stack(kl).sum(0) / len(x)).cpu().tolist(),
        active_units=[int((part > 0.01).sum()) for part in variance.split(sizes)],
        dims=math.prod(model.shape),
        discrete=model.likelihood.discrete(x),
        seconds=time.perf_counter() - start_time,
    )
