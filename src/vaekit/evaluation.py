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
    # Results go into tensors made once: small tensors kept per batch would pin the heap between the large
    # transient blocks and make the process's memory grow through a long evaluation.
    n, dims = len(x), model.config.latent + model.config.latent2
    log_px, elbo = torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
    kl, mean_sum, mean_sq = (torch.zeros(dims, dtype=dtype, device=device) for _ in range(3))
    bar = tqdm(total=n, unit="img", desc=f"evaluate k={k}", disable=not progress or None, leave=False)
    for i in range(0, n, batch):
        xb = x[i : i + batch].to(device)
        log_px[i : i + len(xb)], elbo[i : i + len(xb)] = _logmeanexp_batch(model, xb, k, chunk, g, dtype)
        kl += model.terms(xb, 1, analytic=True, generator=g)[1][0].sum(0)
        means = torch.cat(model.posterior_means(xb, generator=g), -1).to(dtype)
        mean_sum += means.sum(0)
        mean_sq += means.square().sum(0)
        bar.update(len(xb))
    bar.close()
    sizes = [model.config.latent] + ([model.config.latent2] if model.config.latent2 else [])
    variance = (mean_sq / n - (mean_sum / n).square()).cpu()
    return Evaluation(
        k=k,
        seed=seed,
        elbo=elbo.cpu(),
        log_px=log_px.cpu(),
        kl_per_dim=(kl / n).cpu().tolist(),
        active_units=[int((part > 0.01).sum()) for part in variance.split(sizes)],
        dims=math.prod(model.shape),
        discrete=model.likelihood.discrete(x),
        seconds=time.perf_counter() - start_time,
    )
