"""Encoder and decoder networks: plain modules from tensors to tensors, shapes taken from their arguments."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import VaekitError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
}


def activation(name: str) -> type[nn.Module]:
    """The activation class called name."""
    if name not in ACTIVATIONS:
        raise VaekitError(f"unknown activation '{name}' (allowed: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def mlp(sizes: list[int], act: str) -> nn.Sequential:
    """Linear layers of the given sizes with the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation(act)())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Flattens an input and maps it to the mean and log-variance of a diagonal Gaussian."""

    def __init__(self, in_shape: tuple[int, ...], hidden: list[int], latent: int, act: str):
        super().__init__()
        self.net = mlp([math.prod(in_shape), *hidden, 2 * latent], act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance, each (batch, latent)."""
        mean, logvar = self.net(x.flatten(1)).chunk(2, dim=-1)
        return mean, logvar


class MLPDecoder(nn.Module):
    """Maps latent codes to likelihood parameters of the given shape per example."""

    def __init__(self, latent: int, hidden: list[int], out_shape: tuple[int, ...], act: str):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.net = mlp([latent, *hidden, math.prod(out_shape)], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters, (batch, *out_shape)."""
        return self.net(z).view(-1, *self.out_shape)
