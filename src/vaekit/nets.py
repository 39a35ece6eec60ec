"""Encoder and decoder networks: plain modules from tensors to tensors, shapes taken from their arguments.

Every network accepts extra leading dimensions (several posterior draws per example), so (S, B, ...) inputs give
(S, B, ...) outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import VaekitError


class _TanhFunction(torch.autograd.Function):
    """tanh(x) computed as 2 sigmoid(2x) - 1, with the usual gradient 1 - tanh(x)^2."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # No in-place op here: torch.compile 2.11 sends the gradient of a Function whose forward mutates its output to
        # the wrong place (pytorch/pytorch#180642), and training goes wrong without an error.
        y = torch.sigmoid(2 * x) * 2 - 1
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y.square())


class Tanh(nn.Module):
    """The hyperbolic tangent. PyTorch's CPU kernel for it is several times slower than its sigmoid, which is
    vectorised; the identity tanh(x) = 2 sigmoid(2x) - 1 agrees with it to within 2e-7 (absolute) in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tanh(x), elementwise."""
        return _TanhFunction.apply(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": Tanh,
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
        self.in_dims = len(in_shape)
        self.net = mlp([math.prod(in_shape), *hidden, 2 * latent], act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance, each (..., latent)."""
        mean, logvar = self.net(x.flatten(-self.in_dims)).chunk(2, dim=-1)
        return mean, logvar


class MLPDecoder(nn.Module):
    """Maps latent codes to likelihood parameters of the given shape per example."""

    def __init__(self, latent: int, hidden: list[int], out_shape: tuple[int, ...], act: str):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.net = mlp([latent, *hidden, math.prod(out_shape)], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters, (..., *out_shape)."""
        return self.net(z).unflatten(-1, self.out_shape)


def conv_sizes(in_shape: tuple[int, ...], layers: int) -> list[tuple[int, int]]:
    """The (H, W) after each of `layers` stride-2 convolutions (kernel 4, padding 1), starting with the input's."""
    if len(in_shape) != 3:
        raise VaekitError(f"net 'conv' needs images of shape (C, H, W), got examples of shape {tuple(in_shape)}")
    sizes = [tuple(in_shape[1:])]
    for _ in range(layers):
        h, w = sizes[-1]
        if min(h, w) < 2:
            raise VaekitError(
                f"images of {in_shape[1]}x{in_shape[2]} are too small for {layers} stride-2 convolutions; "
                "use fewer model.channels"
            )
        sizes.append((h // 2, w // 2))
    return sizes  # type: ignore[return-value]


class ConvEncoder(nn.Module):
    """Stride-2 convolutions, then dense layers to the mean and log-variance of a diagonal Gaussian."""

    def __init__(self, in_shape: tuple[int, ...], channels: list[int], hidden: list[int], latent: int, act: str):
        super().__init__()
        h, w = conv_sizes(in_shape, len(channels))[-1]
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_shape[0], *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(act)()]
        self.in_shape = tuple(in_shape)
        self.conv = nn.Sequential(*layers)
        self.head = MLPEncoder((channels[-1] * h * w,), hidden, latent, act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance, each (..., latent)."""
        features = self.conv(x.reshape(-1, *self.in_shape))
        return self.head(features.view(*x.shape[:-3], -1))


class ConvDecoder(nn.Module):
    """Dense layers, then stride-2 transposed convolutions that retrace the encoder's sizes exactly, odd ones too."""

    def __init__(self, latent: int, hidden: list[int], channels: list[int], out_shape: tuple[int, ...], act: str):
        super().__init__()
        sizes = conv_sizes(out_shape, len(channels))
        self.start = (channels[-1], *sizes[-1])
        self.dense = nn.Sequential(MLPDecoder(latent, hidden, (math.prod(self.start),), act), activation(act)())
        layers: list[nn.Module] = []
        outs = [*channels[::-1][1:], out_shape[0]]
        for i, (c_in, c_out) in enumerate(zip(channels[::-1], outs, strict=True)):
            (h_in, w_in), (h_out, w_out) = sizes[-1 - i], sizes[-2 - i]
            # A stride-2 transposed convolution doubles the size; output_padding adds the row or column that the
            # encoder's floor division dropped from an odd size.
            pad = (h_out - 2 * h_in, w_out - 2 * w_in)
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=pad))
            if i < len(channels) - 1:
                layers.append(activation(act)())
        self.deconv = nn.Sequential(*layers)
        self.out_shape = tuple(out_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters, (..., *out_shape)."""
        lead = z.shape[:-1]
        maps = self.deconv(self.dense(z.reshape(-1, z.shape[-1])).view(-1, *self.start))
        return maps.view(*lead, *self.out_shape)
