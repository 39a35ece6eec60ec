"""The importance-sampled log-likelihood of a model on a tensor of examples: batched under a memory cap, deterministic.

log p(x) is estimated as log (1/k) sum_i w_i with the importance weights w_i = p(x, z_i) / q(z_i|x), z_i ~ q(z|x)
(Burda et al. 2015), from `model.log_weights`. Evaluation, anomaly scores and a codec's expected rate all start here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import VaekitError
from .model import VAE, log_weights


@dataclass
class Block:
    """The estimates for examples start .. start + len(x) - 1 of a tensor, in the given dtype."""

    start: int
    x: torch.Tensor  # the block's examples, on the model's device
    log_px: torch.Tensor  # (B,) log of the mean importance weight over the k draws
    elbo: torch.Tensor  # (B,) the mean log-weight over the k draws


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums over thousands of draws: float64, except on Apple GPUs, which have none."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_arguments(k: int, seed: int, max_elements: int | None) -> None:
    """Refuse a number of draws, a seed or a memory cap that cannot work, naming what is allowed."""
    if not 1 <= k <= 10**7:
        raise VaekitError(f"k must be an integer from 1 to 10,000,000, got {k}")
    if not 0 <= seed < 2**63:
        raise VaekitError(f"the seed must be an integer from 0 to 2**63 - 1, got {seed}")
    if max_elements is not None and max_elements < 1:
        raise VaekitError(f"max_elements must be at least 1, got {max_elements}")


def _block(model: VAE, x: torch.Tensor, k: int, chunk: int, g: torch.Generator, dtype: torch.dtype, common: bool):
    """For each example of x: log of the mean over k draws of the importance weight, and the mean log-weight."""
    lse = torch.full((len(x),), -math.inf, dtype=dtype, device=x.device)
    total = torch.zeros(len(x), dtype=dtype, device=x.device)
    posterior = model.encode(x)
    for start in range(0, k, chunk):
        log_w = log_weights(model, x, min(chunk, k - start), generator=g, posterior=posterior, common=common).to(dtype)
        lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
        total += log_w.sum(0)
    return lse - math.log(k), total / k


@torch.no_grad()
def blocks(
    model: VAE,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    max_elements: int | None = None,
    progress: bool = True,
    common: bool = False,
) -> Iterator[Block]:
    """The estimates of log p(x) and the ELBO from k draws per example, block by block of examples, in order.

    No decoder output holds more than max_elements numbers (default: 2**20 on a CPU, which balances cache misses
    against per-operation overhead, 2**26 on a GPU). The draws come from generator, which the caller may also use
    between blocks: the results are deterministic for a given generator state, device and max_elements. With
    common, every example gets the same k draws of noise (each block starts again from the generator's state), so
    that an example's estimate does not depend on which others are evaluated with it.
    """
    device, dtype = model.device, accumulation_dtype(model.device)
    cap = max_elements or (2**20 if device.type == "cpu" else 2**26)
    per_draw = math.prod(model.likelihood.params_shape())
    chunk = max(1, min(k, cap // per_draw))
    batch = max(1, cap // (chunk * per_draw)) if chunk == k else 1
    bar = tqdm(total=len(x), unit="img", desc=f"evaluate k={k}", disable=not progress or None, leave=False)
    start = generator.get_state()
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(device)
        if common:
            generator.set_state(start)
        log_px, elbo = _block(model, xb, k, chunk, generator, dtype, common)
        yield Block(i, xb, log_px, elbo)
        bar.update(len(xb))
    bar.close()


@torch.no_grad()
def log_likelihood(
    model: VAE,
    x: torch.Tensor,
    k: int = 5000,
    seed: int = 0,
    max_elements: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Importance-sampled estimates of log p(x) in nats, one per example, from k draws each.

    A stochastic lower bound on log p(x) that tightens as k grows (k = 5000 is the standard of likelihood papers);
    deterministic for a given seed, device and max_elements (see `blocks`). The result is on the CPU, in float64
    (float32 on Apple GPUs, which have no float64).
    """
    check_arguments(k, seed, max_elements)
    g = torch.Generator(model.device).manual_seed(seed)
    out = torch.empty(len(x), dtype=accumulation_dtype(model.device), device=model.device)
    for b in blocks(model, x, k, g, max_elements, progress):
        out[b.start : b.start + len(b.x)] = b.log_px
    return out.cpu()
