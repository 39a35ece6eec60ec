"""The VAE: encoder, reparameterised Gaussian posterior, N(0, I) prior, decoder and likelihood. The ELBO lives here:
`log_weights` gives the (k, B) importance log-weights that the training objective, evaluation and every use share.

With model.latent2 > 0 the model has a second stochastic layer, as in Burda et al. (2015):
q(z1|x) q(z2|z1) for inference and p(z2) p(z1|z2) p(x|z1) for generation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import likelihoods
from .config import ModelConfig
from .likelihoods import Likelihood, log_normal
from .nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from .world import Part


def kl_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1)), in closed form."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar)


def draw(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    k: int | None = None,
    common: bool = False,
    part: Part | None = None,
) -> torch.Tensor:
    """A reparameterised draw from N(mean, exp(logvar)) of shape (..., B, dims), or k of them stacked on a new first
    axis. With common, every example of the batch gets the same standard-normal noise; with part, the noise is drawn
    for the part's whole batch and the part's rows are kept."""
    shape = list(mean.shape if k is None else (k, *mean.shape))
    if common:
        shape[-2] = 1  # the batch axis: the noise broadcasts over it
    elif part is not None:
        shape[-2] = part.size
    eps = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if part is not None and not common:
        eps = eps.index_select(-2, part.rows)
    return mean + torch.exp(0.5 * logvar) * eps


def _fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Network outputs in float32 where autocast made them bfloat16 or float16: the likelihood and KL sum in float32."""
    return tuple(t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in tensors)


class VAE(nn.Module):
    """A variational auto-encoder for examples of a fixed shape."""

    def __init__(self, shape: tuple[int, ...], config: ModelConfig):
        super().__init__()
        self.shape = tuple(shape)
        self.config = config
        c = config
        self.likelihood: Likelihood = likelihoods.build(self.shape, c)
        out_shape = self.likelihood.params_shape()
        if c.net == "conv":
            self.encoder: nn.Module = ConvEncoder(self.shape, c.channels, c.hidden, c.latent, c.activation)
            self.decoder: nn.Module = ConvDecoder(c.latent, c.hidden[::-1], c.channels, out_shape, c.activation)
        else:
            self.encoder = MLPEncoder(self.shape, c.hidden, c.latent, c.activation)
            self.decoder = MLPDecoder(c.latent, c.hidden[::-1], out_shape, c.activation)
        if c.latent2:
            self.encoder2 = MLPEncoder((c.latent,), c.hidden2, c.latent2, c.activation)  # q(z2|z1)
            self.prior1 = MLPEncoder((c.latent2,), c.hidden2[::-1], c.latent, c.activation)  # p(z1|z2)

    @property
    def latent(self) -> int:
        """The number of dimensions of z1, the codes that encode gives and decode takes."""
        return self.config.latent

    @property
    def device(self) -> torch.device:
        """The device the parameters live on."""
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z1|x), the first latent layer."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The expected x under p(x|z1) (for images: pixel intensities in [0, 1])."""
        return self.likelihood.mean(self.decoder(z))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded means of n draws from the prior."""
        z = torch.randn(n, self.config.latent2 or self.latent, generator=generator, device=self.device)
        if self.config.latent2:
            mean, logvar = self.prior1(z)
            z = draw(mean, logvar, generator)
        return self.decode(z)

    def terms(
        self,
        x: torch.Tensor,
        k: int = 1,
        analytic: bool = True,
        generator: torch.Generator | None = None,
        posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
        common: bool = False,
        part: Part | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z), (k, B), and log q(z|x) - log p(z) per latent dimension, (k, B, dims), at k draws z ~ q(z|x).

        With analytic=True the top layer's term is its closed-form KL (lower variance, for the ELBO); otherwise every
        term is evaluated at the draws, as importance weights need. posterior, if given, is encode(x) already computed.
        With common, all examples share the same standard-normal noise, so that each one's result depends on it alone;
        part says which rows of a larger batch x is (see world.Part): its noise is that batch's, row by row.
        """
        mean, logvar = _fp32(*(posterior if posterior is not None else self.encoder(x)))
        z1 = z = draw(mean, logvar, generator, k, common, part)
        kl = []
        if self.config.latent2:
            mean2, logvar2 = _fp32(*self.encoder2(z1))
            z2 = draw(mean2, logvar2, generator, common=common, part=part)
            kl.append(log_normal(z1, mean, logvar) - log_normal(z1, *_fp32(*self.prior1(z2))))
            mean, logvar, z = mean2, logvar2, z2
        kl.append(kl_normal(mean, logvar).expand_as(z) if analytic else log_normal(z, mean, logvar) - log_normal(z))
        (params,) = _fp32(self.decoder(z1))
        return self.likelihood.log_prob(x, params), torch.cat(kl, -1)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example negative ELBO in nats: reconstruction cross-entropy plus KL."""
        return objective(self, x, generator=generator)

    @torch.no_grad()
    def posterior_means(
        self, x: torch.Tensor, draws: int = 100, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """E_q[z] of every latent layer, a list of (B, dims): exact for z1, over `draws` draws of z1 for z2."""
        mean, logvar = self.encoder(x)
        means = [mean]
        if self.config.latent2:
            z1 = draw(mean, logvar, generator, draws)
            means.append(self.encoder2(z1)[0].mean(0))
        return means


def log_weights(
    model: VAE,
    x: torch.Tensor,
    k: int = 1,
    *,
    analytic: bool = False,
    beta: float = 1.0,
    free_bits: float = 0.0,
    generator: torch.Generator | None = None,
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
    common: bool = False,
    part: Part | None = None,
) -> torch.Tensor:
    """The log importance weights log p(x|z) + log p(z) - log q(z|x) at k draws z ~ q(z|x) per example: (k, B).

    Their mean over the draws is the ELBO, their log-mean-exp the k-sample bound on log p(x) (Burda et al. 2015).
    analytic=True puts the top layer's KL in closed form (lower variance, for the ELBO; not importance weights).
    For training, beta weights the KL terms and free_bits exempts each latent dimension whose KL, averaged over the
    batch, is below that many nats (Kingma et al. 2016). posterior, if given, is model.encode(x) already computed;
    common gives every example the same noise and part draws it for a larger batch (see VAE.terms).
    """
    log_px, kl = model.terms(x, k, analytic=analytic, generator=generator, posterior=posterior, common=common,
                             part=part)  # fmt: skip
    if free_bits > 0:
        kl = torch.where(kl.detach().mean((0, 1)) >= free_bits, kl, torch.full_like(kl, free_bits))
    kl_sum = kl.sum(-1)
    return log_px - (kl_sum if beta == 1.0 else beta * kl_sum)


def objective(
    model: VAE,
    x: torch.Tensor,
    kind: str = "elbo",
    k: int = 1,
    beta: float = 1.0,
    free_bits: float = 0.0,
    generator: torch.Generator | None = None,
    part: Part | None = None,
) -> torch.Tensor:
    """Per-example loss to minimise: the negative ELBO averaged over k draws, or the negative k-sample IWAE bound;
    part, if given, is the rows of a larger batch that x is (see world.Part)."""
    log_w = log_weights(model, x, k, analytic=kind == "elbo", beta=beta, free_bits=free_bits, generator=generator,
                        part=part)  # fmt: skip
    if kind == "iwae":
        return math.log(k) - torch.logsumexp(log_w, 0)
    return -log_w.mean(0)


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
