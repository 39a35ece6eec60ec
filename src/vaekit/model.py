"""The VAE: encoder, reparameterised Gaussian posterior, N(0, I) prior, decoder and likelihood. The ELBO lives here."""

from __future__ import annotations

import torch
from torch import nn

from . import likelihoods
from .config import ModelConfig
from .nets import MLPDecoder, MLPEncoder


class VAE(nn.Module):
    """A variational auto-encoder for examples of a fixed shape."""

    def __init__(self, shape: tuple[int, ...], config: ModelConfig):
        super().__init__()
        self.shape = tuple(shape)
        self.config = config
        self.likelihood = likelihoods.get(config.likelihood)
        self.encoder = MLPEncoder(self.shape, config.hidden, config.latent, config.activation)
        out_shape = self.likelihood.params_shape(self.shape)
        self.decoder = MLPDecoder(config.latent, config.hidden[::-1], out_shape, config.activation)

    @property
    def latent(self) -> int:
        """The number of latent dimensions."""
        return self.config.latent

    @property
    def device(self) -> torch.device:
        """The device the parameters live on."""
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The expected x under p(x|z) (for images: pixel intensities in [0, 1])."""
        return self.likelihood.mean(self.decoder(z))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded means of n draws from the prior."""
        z = torch.randn(n, self.latent, generator=generator, device=self.device)
        return self.decode(z)

    def elbo_terms(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example log p(x|z) at one reparameterised z ~ q(z|x), and the analytic KL(q(z|x) || N(0, I))."""
        mean, logvar = self.encoder(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        log_px = self.likelihood.log_prob(x, self.decoder(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return log_px, kl

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example negative ELBO in nats: reconstruction cross-entropy plus KL."""
        log_px, kl = self.elbo_terms(x, generator)
        return kl - log_px
