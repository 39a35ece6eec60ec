"""Lossless compression with a trained VAE by bits-back coding on an ANS stack (Townsend et al. 2019, "BB-ANS").

For each batch of examples x the coder pops a latent z from the stack with the posterior q(z|x) (getting bits
back), pushes x with p(x|z) and pushes z with the prior p(z): the stack grows by about -ELBO(x) bits. Decoding runs
the same steps backwards, last batch first. Latents are discretised into buckets of equal prior mass, so the prior
is uniform over buckets; the entropy coder is `constriction`'s AnsCoder, which turns every probability table into
integers by the same fixed-point arithmetic on both sides.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import VaekitError
from ..likelihoods import DiscreteLikelihood
from ..model import VAE

# Network outputs are rounded to multiples of 1 / GRID before any probability is computed from them, so that a
# difference in the last bits of a matrix product (another thread count, another blocking) rarely changes a table.
GRID = 4096.0
SEED_WORDS = 4096  # the stack starts on at least these pseudo-random words; the first latents are popped from them
PRECISION = 12  # bits per latent dimension: rates at 10 to 18 bits differ by less than 0.2% on MNIST, time doubles
MAX_PRECISION = 20  # constriction's probabilities have 24 bits; the uniform prior over buckets must fit in them
TABLE_ELEMENTS = 1 << 25  # distribution-function values held at once: bounds the examples coded in one step


@dataclass
class Coded:
    """A coded message: the stack's words (without the untouched part of the seed) and what decoding needs."""

    words: np.ndarray  # uint32
    count: int  # examples
    precision: int  # bits per latent dimension
    batches: list[int] = field(default_factory=list)  # examples per coding step, in encoding order
    seed: int = SEED_WORDS  # words the stack started on
    seed_skipped: int = 0  # words of the seed that stayed untouched at the bottom of the stack and are not stored

    @property
    def initial_bits(self) -> int:
        """Bits of the seed the first steps consumed: the cost of starting the chain, paid once per message."""
        return 32 * (self.seed - self.seed_skipped)


def seed_size(latent: int, precision: int) -> int:
    """Words of seed for a model: enough for the first example's latents twice over, and at least SEED_WORDS."""
    return max(SEED_WORDS, 2 * latent * precision // 32 + 64)


def seed_words(n: int) -> np.ndarray:
    """The first n of the fixed pseudo-random words the stack starts on (the same on every machine)."""
    words = np.frombuffer(hashlib.shake_256(b"vaekit bits-back seed").digest(4 * n), dtype="<u4")
    return np.maximum(words.astype(np.uint32), 1)  # the coder's top word must not be zero


def step_limit(model: VAE, requested: int | None = None) -> int:
    """The most examples coded in one step: as requested, within the memory the probability tables may take."""
    likelihood = check_model(model)
    bits = likelihood.levels.bit_length() - 1
    boundaries = (1 << (bits - bits // 2)) + 1
    limit = max(1, TABLE_ELEMENTS // (math.prod(likelihood.params_shape()) * boundaries))
    return limit if requested is None else max(1, min(requested, limit))


CDF = Callable[[torch.Tensor], torch.Tensor]  # boundaries b (..., K + 1) -> P(symbol < b), broadcast over values


class Stages:
    """Symbols of `bits` bits coded in two parts: the coarse part (the high bits), then the fine part (the low bits)
    given the coarse one. Each table has at most 2**ceil(bits / 2) entries, built from a distribution function at the
    parts' boundaries, so neither 2**precision latent buckets nor 256 pixel levels need a table of their full size."""

    def __init__(self, bits: int):
        import constriction

        self.bits, self.fine_bits = bits, bits // 2
        self.table = constriction.stream.model.Categorical(perfect=False)

    @staticmethod
    def _masses(cdf: torch.Tensor) -> np.ndarray:
        """The mass between consecutive boundaries, one row per value; uniform where the whole row underflows."""
        mass = torch.diff(cdf, dim=-1).clamp(min=0).reshape(-1, cdf.shape[-1] - 1)
        mass = torch.where(mass.sum(1, keepdim=True) > 1e-300, mass, torch.ones_like(mass))
        return np.ascontiguousarray(mass.numpy(), dtype=np.float64)  # constriction ignores other memory layouts

    def _coarse(self, cdf: CDF) -> np.ndarray:
        return self._masses(cdf(torch.arange(0, (1 << self.bits) + 1, 1 << self.fine_bits)))

    def _fine(self, cdf: CDF, coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        start = torch.from_numpy(coarse).long().reshape(*shape, 1) << self.fine_bits
        return self._masses(cdf(start + torch.arange((1 << self.fine_bits) + 1)))

    def pop(self, ans: Any, cdf: CDF, shape: tuple[int, ...]) -> np.ndarray:
        """Decode symbols of the given shape from the stack."""
        coarse = ans.decode(self.table, self._coarse(cdf)).astype(np.int64)
        if not self.fine_bits:
            return coarse.reshape(shape)
        fine = ans.decode(self.table, self._fine(cdf, coarse, shape))
        return ((coarse << self.fine_bits) | fine).reshape(shape)

    def push(self, ans: Any, cdf: CDF, symbols: np.ndarray) -> None:
        """Encode symbols onto the stack (the exact inverse of pop)."""
        coarse = (symbols >> self.fine_bits).astype(np.int32).reshape(-1)
        if self.fine_bits:
            fine = (symbols & ((1 << self.fine_bits) - 1)).astype(np.int32).reshape(-1)
            ans.encode_reverse(fine, self.table, self._fine(cdf, coarse, symbols.shape))
        ans.encode_reverse(coarse, self.table, self._coarse(cdf))


def check_model(model: VAE) -> DiscreteLikelihood:
    """The model's likelihood, if the model can code data losslessly; otherwise say why not."""
    if model.config.latent2:
        raise VaekitError("bits-back coding supports one stochastic layer; this model has two")
    if not isinstance(model.likelihood, DiscreteLikelihood):
        raise VaekitError(
            f"a {model.config.likelihood} likelihood is a density over continuous values and cannot code data "
            "losslessly: train with bernoulli (binary data) or logistic-mixture (8-bit data)"
        )
    return model.likelihood


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t * GRID) / GRID


class _Coder:
    """The steps of bits-back coding for one model: the network in float64 on the CPU, outputs rounded to the grid.

    Latents are discretised into 2**precision buckets of equal prior mass per dimension (uniform under the prior);
    a bucket stands for its prior median.
    """

    def __init__(self, model: VAE, precision: int):
        import constriction

        if not 2 <= precision <= MAX_PRECISION:
            raise VaekitError(f"the latent precision must be 2 to {MAX_PRECISION} bits, got {precision}")
        self.likelihood = check_model(model)
        self.model = copy.deepcopy(model).to("cpu", torch.float64).eval()
        self.precision, self.latent, self.shape = precision, model.config.latent, tuple(model.shape)
        self.edges = torch.special.ndtri(torch.arange((1 << precision) + 1, dtype=torch.float64) / (1 << precision))
        self.buckets, self.levels = Stages(precision), Stages(self.likelihood.levels.bit_length() - 1)
        self.prior = constriction.stream.model.Uniform(1 << precision)
        self.network_seconds = 0.0

    @torch.no_grad()
    def posterior(self, x: np.ndarray) -> CDF:
        """q(z|x)'s distribution function over the latent buckets of examples given as integer levels."""
        start = time.perf_counter()
        mean, logvar = self.model.encode(torch.from_numpy(x).double() / (self.likelihood.levels - 1))
        mean, std = _rounded(mean).unsqueeze(-1), torch.exp(0.5 * _rounded(logvar)).unsqueeze(-1)
        self.network_seconds += time.perf_counter() - start
        return lambda b: torch.special.ndtr((self.edges[b] - mean) / std)

    @torch.no_grad()
    def likelihood_given(self, index: np.ndarray) -> CDF:
        """p(x|z)'s distribution function over the levels, for latents given as bucket indices (n, latent)."""
        start = time.perf_counter()
        z = torch.special.ndtri((torch.from_numpy(index).double() + 0.5) / (1 << self.precision))
        params = _rounded(self.model.decoder(z))
        self.network_seconds += time.perf_counter() - start
        return lambda b: self.likelihood.cdf(params.float(), b)


def encode(
    model: VAE, levels: np.ndarray, precision: int = PRECISION, batch_size: int = 1000, progress: bool = False
) -> tuple[Coded, float]:
    """Code examples given as integer levels (N, *shape) losslessly; also the seconds spent in the network."""
    import constriction
    from tqdm.auto import tqdm

    coder = _Coder(model, precision)
    levels = np.ascontiguousarray(levels, dtype=np.int64)  # the layout decode produces, so the network sees the same
    if levels.shape[1:] != coder.shape:
        raise VaekitError(f"examples of shape {levels.shape[1:]} given to a model of shape {coder.shape}")
    limit = step_limit(model, batch_size)
    seed = seed_words(seed_size(coder.latent, precision))
    ans = constriction.stream.stack.AnsCoder(seed)
    start_bits = ans.num_valid_bits()
    batches: list[int] = []
    done = 0
    bar = tqdm(total=len(levels), unit="img", desc="compress", disable=not progress or None, leave=False)
    while done < len(levels):
        # A step pops about latent * precision bits per example; grow the steps only as fast as the stack can lend
        # them, so that the seed pays for little more than the first example.
        spare = ans.num_valid_bits() - start_bits
        n = min(limit, len(levels) - done, max(1, spare // (coder.latent * precision)))
        x = levels[done : done + n]
        index = coder.buckets.pop(ans, coder.posterior(x), (n, coder.latent))
        if ans.num_valid_bits() < 64:
            raise VaekitError(
                "the seed of the bits-back chain ran out (posteriors wider than the prior): lower --precision"
            )
        coder.levels.push(ans, coder.likelihood_given(index), x)
        ans.encode_reverse(index.reshape(-1).astype(np.int32), coder.prior)
        batches.append(n)
        done += n
        bar.update(n)
    bar.close()
    words = ans.get_compressed()
    differ = np.flatnonzero(words[: len(seed)] != seed[: len(words)])
    skipped = int(differ[0]) if len(differ) else min(len(seed), len(words))
    return Coded(words[skipped:].copy(), len(levels), precision, batches, len(seed), skipped), coder.network_seconds


def decode(model: VAE, coded: Coded, progress: bool = False) -> tuple[np.ndarray, float]:
    """The integer levels (N, *shape) that encode coded; also the seconds spent in the network."""
    import constriction
    from tqdm.auto import tqdm

    coder = _Coder(model, coded.precision)
    seed = seed_words(coded.seed)
    ans = constriction.stream.stack.AnsCoder(np.concatenate([seed[: coded.seed_skipped], coded.words]))
    levels = np.empty((coded.count, *coder.shape), dtype=np.int64)
    end = coded.count
    bar = tqdm(total=coded.count, unit="img", desc="decompress", disable=not progress or None, leave=False)
    for n in reversed(coded.batches):
        index = ans.decode(coder.prior, n * coder.latent).astype(np.int64).reshape(n, coder.latent)
        x = coder.levels.pop(ans, coder.likelihood_given(index), (n, *coder.shape))
        levels[end - n : end] = x
        coder.buckets.push(ans, coder.posterior(x), index)
        end -= n
        bar.update(n)
    bar.close()
    if end != 0 or not np.array_equal(ans.get_compressed(), seed):
        raise VaekitError("the compressed data do not decode to a complete message: the file is corrupt")
    return levels, coder.network_seconds
