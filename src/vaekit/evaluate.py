"""Measurements of a trained model on a tensor of examples (pure functions, batched, no files)."""

from __future__ import annotations

import torch

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
