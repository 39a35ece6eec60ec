"""Generation: samples from the prior, reconstructions, latent codes, decodings, interpolations, manifolds.

The pure functions (`interpolate`, `manifold`) take a model and tensors; the others take a run and may
write their results as PNG grids or NumPy arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import VaekitError
from ..figures import image_panels
from ..files import check_writable, read_arrays, require_images, save_array, save_grid, together
from ..model import VAE, encode_all
from ..run import Run, open_run


def _seed(seed: int) -> torch.Generator:
    """A CPU generator seeded with seed, checked to be a valid seed."""
    if not 0 <= seed < 2**63:
        raise VaekitError(f"the seed must be an integer from 0 to 2**63 - 1, got {seed}")
    return torch.Generator().manual_seed(seed)


def _written(images: torch.Tensor, out: str | Path | None, npy: str | Path | None) -> torch.Tensor:
    """Write images as a PNG grid to out and as an array to npy, where given (both or neither); return them."""
    with together():
        if out is not None:
            save_grid(images, out)
        if npy is not None:
            save_array(npy, images)
    return images


@torch.no_grad()
def sample(
    run: Run | str | Path,
    n: int = 64,
    *,
    seed: int = 0,
    out: str | Path | None = None,
    npy: str | Path | None = None,
) -> torch.Tensor:
    """Decoded draws from the prior of a trained run, optionally written as a PNG grid and/or .npy."""
    if n < 1:
        raise VaekitError(f"the number of samples must be at least 1, got {n}")
    generator = _seed(seed)
    check_writable(out, npy)
    images = open_run(run).model_on(torch.device("cpu")).sample(n, generator)
    return _written(images, out, npy)


@torch.no_grad()
def reconstruct(
    run: Run | str | Path, n: int = 32, *, split: str = "test", out: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a split and their reconstructions from the posterior means."""
    if n < 1:
        raise VaekitError(f"the number of examples must be at least 1, got {n}")
    run = open_run(run)
    model = run.model_on(torch.device("cpu"))
    x = run.examples(split, n).x
    recon = model.decode(model.encode(x)[0])
    if out is not None:
        require_images(model.shape, "vaekit.reconstruct(RUN) in Python returns the examples and reconstructions")
        image_panels([("originals", x), ("reconstructions", recon)], out, nrow=8)
    return x, recon


@torch.no_grad()
def encode(
    run: Run | str | Path, *, split: str = "test", out: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Posterior means, log-variances and labels for a whole split; out receives an (N, 2, latent) .npy array."""
    run = open_run(run)
    s = run.examples(split)
    x, y = s.x, s.y
    mean, logvar = encode_all(run.model_on(torch.device("cpu")), x, run.config.train.eval_batch_size)
    if out is not None:
        if str(out).endswith(".npz"):
            save_array(out, mean=mean, logvar=logvar, **({} if y is None else {"label": y}))
        else:
            save_array(out, torch.stack([mean, logvar], dim=1))
    return mean, logvar, y


def read_latents(path: str | Path, latent: int) -> torch.Tensor:
    """Latent codes from (N, latent) codes in a .npy file, or from encode's output (.npy or .npz), using its means."""
    loaded = read_arrays(path)
    z = loaded if isinstance(loaded, np.ndarray) else loaded.get("mean")
    if z is None or not (np.issubdtype(z.dtype, np.floating) or np.issubdtype(z.dtype, np.integer)):
        raise VaekitError(f"{path} must hold one array of real numbers (or an .npz with 'mean')")
    if z.ndim == 3 and z.shape[1:] == (2, latent):
        z = z[:, 0]
    if z.ndim != 2 or z.shape[1] != latent or len(z) == 0:
        raise VaekitError(f"{path} has shape {z.shape}; this model needs (N, {latent}) or (N, 2, {latent})")
    if not np.isfinite(z).all():
        raise VaekitError(f"{path} contains NaN or infinite values")
    return torch.from_numpy(z.astype(np.float32))


@torch.no_grad()
def decode(
    run: Run | str | Path,
    latents: str | Path | torch.Tensor,
    *,
    out: str | Path | None = None,
    npy: str | Path | None = None,
) -> torch.Tensor:
    """Decode latent codes (a tensor or a .npy file) of a trained run, optionally writing a PNG grid and/or .npy."""
    check_writable(out, npy)
    model = open_run(run).model_on(torch.device("cpu"))
    z = latents if isinstance(latents, torch.Tensor) else read_latents(latents, model.latent)
    images = model.decode(z)
    return _written(images, out, npy)


@torch.no_grad()
def interpolate(model: VAE, a: torch.Tensor, b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decodings along the straight line between the posterior means of a and b: (len(a), steps, *shape)."""
    za, zb = model.encode(a)[0], model.encode(b)[0]
    t = torch.linspace(0, 1, steps, device=za.device).view(1, -1, 1)
    z = za.unsqueeze(1) * (1 - t) + zb.unsqueeze(1) * t
    return model.decode(z.flatten(0, 1)).view(len(a), steps, *model.shape)


@torch.no_grad()
def manifold(model: VAE, size: int = 20) -> torch.Tensor:
    """Decodings of a regular grid over latent dimensions 0 and 1 through the inverse normal CDF (others at 0)."""
    q = torch.special.ndtri(torch.linspace(0.05, 0.95, size))
    z = torch.zeros(size * size, model.latent)
    z[:, 0] = q.repeat(size)
    z[:, 1] = q.flip(0).repeat_interleave(size)
    return model.decode(z.to(model.device))
