"""Observation models p(x|z): each turns decoder outputs into per-example log-probabilities and samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import VaekitError


class Bernoulli:
    """Independent Bernoulli pixels parameterised by logits: binary data, or grey levels read as probabilities."""

    def params_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The decoder output shape needed for one example of data_shape."""
        return tuple(data_shape)

    def log_prob(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x | logits) summed over all dimensions of each example."""
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The expected value of x."""
        return torch.sigmoid(logits)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of x."""
        return torch.bernoulli(torch.sigmoid(logits), generator=generator)


LIKELIHOODS = {"bernoulli": Bernoulli}


def get(name: str) -> Bernoulli:
    """A likelihood instance by name."""
    if name not in LIKELIHOODS:
        raise VaekitError(f"unknown likelihood '{name}' (allowed: {', '.join(LIKELIHOODS)})")
    return LIKELIHOODS[name]()
