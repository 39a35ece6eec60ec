"""Evaluation: importance-sampled log-likelihood, ELBO, bits/dim, KL per dimension and active units.

`estimate` measures a model on a tensor of examples; `evaluate` does it for a run and saves the results in it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import VaekitError
from ..files import check_writable, save_array, together, write_json
from ..importance import accumulation_dtype, blocks, check_arguments
from ..model import VAE
from ..optim import pick_device
from ..run import Run, open_run

ACTIVE = 0.01  # a unit is active when its posterior mean varies more than this over the data (Burda et al. 2015)


@dataclass
class Evaluation:
    """Log-likelihood estimates of a model on a set of examples, per example and summarised."""

    k: int  # importance samples per example
    seed: int
    elbo: torch.Tensor  # (N,) per-example ELBO, averaged over the k draws
    log_px: torch.Tensor  # (N,) per-example importance-weighted estimate of log p(x)
    kl_per_dim: list[float]  # mean KL (nats) per latent dimension, z1's (one-draw estimates if z2 exists), then z2's
    active_units: list[int]  # per latent layer: dimensions whose posterior mean varies over x (Cov > ACTIVE)
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

    def summary(self) -> dict[str, Any]:
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

    The log-likelihood is `vaekit.log_likelihood`'s, batched under max_elements; the result is deterministic for a
    given seed, device and max_elements.
    """
    check_arguments(k, seed, max_elements)
    start_time = time.perf_counter()
    device, dtype = model.device, accumulation_dtype(model.device)
    g = torch.Generator(device).manual_seed(seed)
    # Results go into tensors made once: small tensors kept per batch would pin the heap between the large
    # transient blocks and make the process's memory grow through a long evaluation.
    n, dims = len(x), model.config.latent + model.config.latent2
    log_px, elbo = torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
    kl, mean_sum, mean_sq = (torch.zeros(dims, dtype=dtype, device=device) for _ in range(3))
    for b in blocks(model, x, k, g, max_elements, progress):
        log_px[b.start : b.start + len(b.x)], elbo[b.start : b.start + len(b.x)] = b.log_px, b.elbo
        # The diagnostics draw from the same generator between blocks, so the whole result follows from the seed.
        kl += model.terms(b.x, 1, analytic=True, generator=g)[1][0].sum(0)
        means = torch.cat(model.posterior_means(b.x, generator=g), -1).to(dtype)
        mean_sum += means.sum(0)
        mean_sq += means.square().sum(0)
    sizes = [model.config.latent] + ([model.config.latent2] if model.config.latent2 else [])
    variance = (mean_sq / n - (mean_sum / n).square()).cpu()
    return Evaluation(
        k=k,
        seed=seed,
        elbo=elbo.cpu(),
        log_px=log_px.cpu(),
        kl_per_dim=(kl / n).cpu().tolist(),
        active_units=[int((part > ACTIVE).sum()) for part in variance.split(sizes)],
        dims=math.prod(model.shape),
        discrete=model.likelihood.discrete(x),
        seconds=time.perf_counter() - start_time,
    )


def evaluate(
    run: Run | str | Path,
    *,
    split: str = "test",
    k: int = 5000,
    seed: int = 0,
    device: str = "auto",
    max_elements: int | None = None,
    limit: int | None = None,
    save: bool = True,
    progress: bool = True,
) -> tuple[Evaluation, dict[str, Any]]:
    """Importance-sampled log-likelihood, ELBO, bits/dim, KL per dimension and active units of a run on a split.

    limit evaluates only the split's first examples, in their stored order (the order `encode` writes). With save,
    the summary goes to the run's evaluation file (`Run.evaluation_path`) and the per-example values to the .npz of
    the same name.
    """
    check_arguments(k, seed, max_elements)
    if limit is not None and limit < 1:
        raise VaekitError(f"the limit must be at least 1 example, got {limit}")
    run = open_run(run)
    if save:  # before the data are loaded, which can take a while: both files a limit may lead to
        paths = {run.evaluation_path(split), run.evaluation_path(split, limit)}
        check_writable(*paths, *(p.with_suffix(".npz") for p in paths))
    on = pick_device(device)
    x = run.examples(split).x
    # A limit at or above the split's size is the whole split, saved as such.
    first = limit if limit is not None and limit < len(x) else None
    x = x[:first]
    path = run.evaluation_path(split, first)
    model = run.model_on(on)
    result = estimate(model, x, k, seed, max_elements, progress)
    likelihood = run.config.model.likelihood
    summary = {"split": split, **({} if first is None else {"first": first}), "likelihood": likelihood}
    summary.update(result.summary())
    support = model.likelihood.support
    if support is None:
        summary["note"] = "the likelihood is a density, so the NLL is not a code length and bits/dim is omitted"
    elif not result.discrete:
        summary["note"] = (
            f"the data do not all lie on {support}, so the {likelihood} 'likelihood' is not a probability of "
            "them: the NLL is not comparable with published log-likelihoods, and bits/dim is omitted"
        )
    if save:
        with together():
            save_array(path.with_suffix(".npz"), neg_elbo=-result.elbo, nll=-result.log_px)
            write_json(path, summary)
    return result, summary


def table(summary: dict[str, Any]) -> str:
    """An evaluation summary as the lines `vaekit evaluate` prints."""
    s = summary
    first = f"first {s['first']} of " if "first" in s else ""
    rows = [
        ("split", f"{first}{s['split']} ({s['examples']} examples)"),
        ("negative ELBO", f"{s['neg_elbo']:.4f} nats"),
        (f"NLL (IS, k={s['k']})", f"{s['nll']:.4f} nats"),
        ("bits/dim", "n/a" if s["bits_per_dim"] is None else f"{s['bits_per_dim']:.4f}"),
        ("KL", f"{s['kl']:.4f} nats"),
        ("active units", f"{s['active_units']} of {len(s['kl_per_dim'])}"),
        ("time", f"{s['seconds']:.1f} s"),
    ]
    note = [f"note: {s['note']}"] if "note" in s else []
    return "\n".join([*(f"{name:<20} {value}" for name, value in rows), *note])
