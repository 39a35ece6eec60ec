"""Observation models p(x|z): each turns decoder outputs into per-example log-probabilities, means and samples.

Every likelihood is built for one data shape and satisfies the `Likelihood` protocol below; discrete ones also give
the probability of every value of every dimension (`DiscreteLikelihood`), which is what an entropy coder needs. Adding
one is a class and a registry line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import VaekitError


@runtime_checkable
class Likelihood(Protocol):
    """What the model asks of an observation model p(x|z) for examples of one shape.

    Shapes: x is (B, *shape); params, the decoder's output, is (B, *params_shape()) and may carry extra leading
    sample dimensions, (S, B, *params_shape()), which every method broadcasts over. Likelihoods with learned
    parameters are also `torch.nn.Module`s, so that the model saves them with its weights.
    """

    shape: tuple[int, ...]  # the shape of one example
    support: str | None  # where log_prob is a log-probability mass, in words; None for a density

    def params_shape(self) -> tuple[int, ...]:
        """The decoder output shape per example."""
        ...

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params) summed over the dimensions of each example: (..., B)."""
        ...

    def log_prob_dims(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x_d | params) of every dimension d, which log_prob sums: (..., B, *shape)."""
        ...

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The expected value of x: (..., B, *shape)."""
        ...

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of x: (..., B, *shape)."""
        ...

    def discrete(self, x: torch.Tensor) -> bool:
        """Whether log_prob(x) is a log-probability mass of these x (so that it counts bits)."""
        ...


@runtime_checkable
class DiscreteLikelihood(Likelihood, Protocol):
    """A likelihood over a finite set of values per dimension: the values v / (levels - 1), v = 0 .. levels - 1."""

    levels: int  # how many values each dimension takes: 2 for binary data, 256 for 8-bit data

    def value_log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """log P(x_d = v / (levels - 1) | params) for every dimension d and value v: (..., B, *shape, levels)."""
        ...

    def cdf(self, params: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
        """P(x_d < b / (levels - 1) | params) at level boundaries b = 0 .. levels, for coding: boundaries (m,) or
        (..., B, *shape, m) give (..., B, *shape, m)."""
        ...


LOG_2PI = math.log(2 * math.pi)
MIN_LOG_SIGMA = math.log(1e-3)  # a learned deviation could otherwise shrink without end on constant dimensions


def log_normal(z: torch.Tensor, mean: torch.Tensor | float = 0.0, logvar: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Elementwise log N(z; mean, exp(logvar))."""
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return -0.5 * (LOG_2PI + logvar + (z - mean).square() * torch.exp(-logvar))


def _sum_event(values: torch.Tensor, event_dims: int) -> torch.Tensor:
    """Sum the trailing event_dims dimensions of values."""
    return values.flatten(-event_dims).sum(-1)


class _BernoulliLogProb(torch.autograd.Function):
    """Elementwise log p(x | logits) = x * l - softplus(l), with softplus(l) = relu(l) - log(sigmoid(|l|)).

    The same value as -binary_cross_entropy_with_logits and as stable, but several times faster on CPUs, where the
    log1p inside PyTorch's version is not vectorised; the gradient is the closed form x - sigmoid(l).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, x)
        return x * logits - logits.relu() + logits.abs().sigmoid().log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, x = ctx.saved_tensors
        return grad * (x - logits.sigmoid()), grad * logits if ctx.needs_input_grad[1] else None


class Bernoulli(nn.Module):
    """Independent Bernoulli dimensions parameterised by logits: binary data, or grey levels read as probabilities."""

    support: str | None = "the binary values 0 and 1"
    levels = 2

    def __init__(self, shape: tuple[int, ...], config: ModelConfig):
        super().__init__()
        self.shape = tuple(shape)

    def params_shape(self) -> tuple[int, ...]:
        """The decoder output shape per example."""
        return self.shape

    def log_prob(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x | logits) summed over the dimensions of each example."""
        if torch.is_grad_enabled():
            return _sum_event(self.log_prob_dims(x, logits), len(self.shape))
        # Evaluation with many draws per example, where this sum dominates the time. The same value, rearranged:
        # sum(x*l) as a matrix product, sum(relu(l)) = (sum(l) + sum(|l|)) / 2, and sum(log(sigmoid(|l|))) as the log
        # of products of groups of factors in [1/2, 1), which cannot underflow; element-wise log is slow on CPUs.
        logits, x = logits.flatten(-len(self.shape)), x.flatten(1)
        magnitude = logits.abs()
        relu_sum = (logits.sum(-1) + magnitude.sum(-1)) / 2
        group = max(g for g in range(1, 65) if logits.shape[-1] % g == 0)
        log_sigmoid_sum = magnitude.sigmoid_().unflatten(-1, (-1, group)).prod(-1).log_().sum(-1)
        return torch.einsum("...bd,bd->...b", logits, x) - relu_sum + log_sigmoid_sum

    def log_prob_dims(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x_d | logits) of every dimension."""
        return _BernoulliLogProb.apply(logits, x)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The expected value of x."""
        return torch.sigmoid(logits)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of x."""
        return torch.bernoulli(torch.sigmoid(logits), generator=generator)

    def value_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log P(x_d = 0) and log P(x_d = 1) of every dimension: (..., B, *shape, 2)."""
        return torch.stack([-F.softplus(logits), -F.softplus(-logits)], -1)

    def cdf(self, logits: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
        """P(x_d < b) at the boundaries b = 0, 1, 2 of the two values: 0, P(x_d = 0), 1."""
        p0 = torch.sigmoid(-logits).unsqueeze(-1)
        return torch.where(boundaries == 0, 0.0, torch.where(boundaries == 1, p0, 1.0)).to(logits.dtype)

    def discrete(self, x: torch.Tensor) -> bool:
        """Whether log_prob(x) is a log-probability mass (so that it counts bits): here, when x is binary."""
        return bool(((x == 0) | (x == 1)).all())


class Gaussian(nn.Module):
    """Independent Gaussians around the decoder output, with a fixed or learned (global or per-dimension) deviation."""

    support: str | None = None  # a density: there is no set of values where log_prob is a log-probability mass

    def __init__(self, shape: tuple[int, ...], config: ModelConfig):
        super().__init__()
        self.shape = tuple(shape)
        log_sigma = torch.full(() if config.variance != "per-dim" else self.shape, math.log(config.sigma))
        if config.variance == "fixed":
            self.register_buffer("log_sigma", log_sigma)
        else:
            self.log_sigma = nn.Parameter(log_sigma)

    def params_shape(self) -> tuple[int, ...]:
        """The decoder output shape per example: one mean per dimension."""
        return self.shape

    def log_prob(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """log N(x; mean, sigma^2) summed over the dimensions of each example (a density); sigma is at least 1e-3."""
        return _sum_event(self.log_prob_dims(x, mean), len(self.shape))

    def log_prob_dims(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """log N(x_d; mean_d, sigma_d^2) of every dimension."""
        return log_normal(x, mean, 2 * self.log_sigma.clamp(min=MIN_LOG_SIGMA))

    def mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The expected value of x."""
        return mean

    def sample(self, mean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of x."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(self.log_sigma.clamp(min=MIN_LOG_SIGMA)) * noise

    def discrete(self, x: torch.Tensor) -> bool:
        """Whether log_prob(x) is a log-probability mass: never, it is a density."""
        return False


class LogisticMixture(nn.Module):
    """A mixture of discretised logistics per dimension over the 256 levels of 8-bit data (Salimans et al. 2017).

    Each sub-pixel is modelled on its own (no coupling between colour channels); x in [0, 1] is read as k/255.
    """

    BINS = 255
    support: str | None = "the 256 levels of 8-bit data"
    levels = BINS + 1

    def __init__(self, shape: tuple[int, ...], config: ModelConfig):
        super().__init__()
        self.shape = tuple(shape)
        self.k = config.mixtures

    def params_shape(self) -> tuple[int, ...]:
        """The decoder output shape per example: mixture logits, means and log-scales, stacked on the first axis."""
        return (3 * self.k * self.shape[0], *self.shape[1:])

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture log-weights, means in [-1, 1] space and log-scales, each (..., k, *shape)."""
        p = params.unflatten(-len(self.shape), (3, self.k, self.shape[0]))
        logits, means, log_scales = p.unbind(-len(self.shape) - 2)
        return F.log_softmax(logits, -len(self.shape) - 1), means, log_scales.clamp(min=-7.0)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log P(x | params) summed over the dimensions of each example (a probability mass)."""
        return _sum_event(self._log_mass(x, params), len(self.shape))

    def log_prob_dims(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log P(x_d | params) of every dimension."""
        return self._log_mass(x, params)

    def value_log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """log P(x_d = v / 255 | params) of every dimension d and level v: (..., B, *shape, 256)."""
        levels = torch.arange(self.levels, device=params.device, dtype=params.dtype) / self.BINS
        # The levels on a new first axis broadcast against every axis of an x (..., B, *shape); they end up last.
        x = levels.view(-1, *[1] * params.dim())
        return self._log_mass(x, params).movedim(0, -1)

    def cdf(self, params: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
        """P(x_d < b / 255 | params) at level boundaries b = 0 .. 256: the mixture of logistic distribution functions
        at the edges between levels, with the whole lower tail below level 0 and the upper tail above level 255."""
        log_w, means, log_scales = self._split(params)
        b = boundaries.to(params.dtype)
        edge = torch.where(b == 0, -math.inf, torch.where(b == self.levels, math.inf, (2 * b - 1) / self.BINS - 1))
        inv_s = torch.exp(-log_scales).unsqueeze(-1)
        offset, weight = -means.unsqueeze(-1) * inv_s, log_w.exp().unsqueeze(-1)
        # One component at a time: a working set of one component's values instead of all of them.
        axis = -len(self.shape) - 2  # the mixture axis, with the boundaries' axis last
        total = torch.zeros(())
        for o, s, w in zip(offset.unbind(axis), inv_s.unbind(axis), weight.unbind(axis), strict=True):
            total = torch.sigmoid_(torch.addcmul(o, edge, s)).mul_(w).add_(total)
        return total

    def _log_mass(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log P(x_d | params) of every dimension d, broadcast over x and params: (..., B, *shape)."""
        log_w, means, log_scales = self._split(params)
        x = (2 * x - 1).unsqueeze(-len(self.shape) - 1)  # [-1, 1], with a mixture axis
        inv_s = torch.exp(-log_scales)
        half_bin = 1.0 / self.BINS
        upper = inv_s * (x - means + half_bin)
        lower = inv_s * (x - means - half_bin)
        log_cdf_upper = upper - F.softplus(upper)  # log sigmoid(upper): the whole lower tail for level 0
        log_sf_lower = -F.softplus(lower)  # log (1 - sigmoid(lower)): the whole upper tail for level 255
        mass = torch.sigmoid(upper) - torch.sigmoid(lower)
        # Far in the tails the difference of two sigmoids underflows; the density at the centre times the bin width
        # is then the better approximation.
        centre = inv_s * (x - means)
        log_density = centre - log_scales - 2 * F.softplus(centre) + math.log(2 * half_bin)
        log_mass = torch.where(mass > 1e-5, mass.clamp(min=1e-12).log(), log_density)
        log_p = torch.where(x < -1 + half_bin, log_cdf_upper, torch.where(x > 1 - half_bin, log_sf_lower, log_mass))
        return torch.logsumexp(log_p + log_w, -len(self.shape) - 1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The expected value of x (the mixture mean, before discretisation)."""
        log_w, means, _ = self._split(params)
        return ((log_w.exp() * means).sum(-len(self.shape) - 1).clamp(-1, 1) + 1) / 2

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of x on the 256 levels."""
        log_w, means, log_scales = self._split(params)
        axis = -len(self.shape) - 1
        # Gumbel-max picks a component. u = 0 (torch.rand draws from [0, 1)) gives infinite noise, which argmax and
        # the clamp below turn into a valid choice and level, so u needs no clamping.
        u = torch.rand(log_w.shape, generator=generator, device=params.device)
        pick = F.one_hot((log_w - torch.log(-torch.log(u))).argmax(axis), self.k).movedim(-1, axis)
        # Only the picked component is transformed: an unpicked one with a huge scale must not turn into inf * 0.
        mean, log_scale = (means * pick).sum(axis), (log_scales * pick).sum(axis)
        u = torch.rand(mean.shape, generator=generator, device=params.device)
        values = mean + log_scale.exp() * (u.log() - (-u).log1p())
        return torch.round((values.clamp(-1, 1) + 1) / 2 * self.BINS) / self.BINS

    def discrete(self, x: torch.Tensor) -> bool:
        """Whether log_prob(x) is a log-probability mass: when x lies on the 256 levels of 8-bit data."""
        return bool(((x * self.BINS - torch.round(x * self.BINS)).abs() < 1e-3).all())


LIKELIHOODS: dict[str, Callable[[tuple[int, ...], ModelConfig], Likelihood]] = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "logistic-mixture": LogisticMixture,
}


def get(name: str) -> Callable[[tuple[int, ...], ModelConfig], Likelihood]:
    """The likelihood class called name."""
    if name not in LIKELIHOODS:
        raise VaekitError(f"unknown likelihood '{name}' (allowed: {', '.join(LIKELIHOODS)})")
    return LIKELIHOODS[name]


def build(shape: tuple[int, ...], config: ModelConfig) -> Likelihood:
    """The likelihood config.likelihood names, for examples of the given shape."""
    return get(config.likelihood)(tuple(shape), config)
