"""What a trained run is for: evaluation, samples, reconstructions, latent codes, decodings, interpolations, plots."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import plots as figures
from .config import Config
from .data import Dataset, load_data
from .errors import VaekitError
from .evaluation import Evaluation, encode_all, estimate
from .model import VAE
from .rundir import PLOTS, atomic_path, check_writable, load, load_config, read_metrics, write_bytes, write_text


def _require_images(shape: tuple[int, ...]) -> None:
    """Refuse to draw examples that are not grey or RGB images."""
    if not _is_image(shape):
        raise VaekitError("this model's data are not grey or RGB images, so there is no picture to draw; use --npy")


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid."""
    _require_images(tuple(images.shape[1:]))
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(images.detach().cpu(), tmp, nrow=nrow, padding=2, format="png")
    return Path(path)


def save_array(path: str | Path, array: torch.Tensor | None = None, **named: torch.Tensor) -> Path:
    """Write one array as .npy, or named arrays as .npz."""
    buffer = io.BytesIO()
    if array is not None:
        np.save(buffer, array.detach().cpu().numpy())
    else:
        np.savez(buffer, **{k: v.detach().cpu().numpy() for k, v in named.items()})
    write_bytes(path, buffer.getvalue())
    return Path(path)


def _examples(
    model: VAE, cfg: Config, split: str, data: Dataset | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A split of the run's data set, checked against the shape the model was trained on."""
    s = (data if data is not None else load_data(cfg.data)).split(split)
    if tuple(s.x.shape[1:]) != model.shape:
        raise VaekitError(
            f"the data '{cfg.data.name}' now has examples of shape {tuple(s.x.shape[1:])}, "
            f"but the model was trained on {model.shape}"
        )
    return s.x, s.y


def evaluation_path(run: str | Path, split: str) -> Path:
    """Where evaluate writes its summary: RUN/evaluation.json for the test split, RUN/evaluation-SPLIT.json else."""
    return Path(run) / ("evaluation.json" if split == "test" else f"evaluation-{split}.json")


def evaluate(
    run: str | Path,
    *,
    split: str = "test",
    k: int = 5000,
    seed: int = 0,
    device: str = "auto",
    max_elements: int | None = None,
    save: bool = True,
    progress: bool = True,
) -> tuple[Evaluation, dict]:
    """Importance-sampled log-likelihood, ELBO, bits/dim, KL per dimension and active units of a run on a split.

    With save, the summary goes to evaluation.json (evaluation-SPLIT.json for other splits) and the per-example
    values to the .npz of the same name.
    """
    from .training import pick_device

    if not 1 <= k <= 10**7:
        raise VaekitError(f"k must be an integer from 1 to 10,000,000, got {k}")
    if not 0 <= seed < 2**63:
        raise VaekitError(f"the seed must be an integer from 0 to 2**63 - 1, got {seed}")
    if max_elements is not None and max_elements < 1:
        raise VaekitError(f"max_elements must be at least 1, got {max_elements}")
    path = evaluation_path(run, split)
    if save:
        check_writable(path, path.with_suffix(".npz"))
    model, cfg = load(run, pick_device(device)), load_config(run)
    x = _examples(model, cfg, split)[0]
    result = estimate(model, x, k, seed, max_elements, progress)
    summary = {"split": split, "likelihood": cfg.model.likelihood, **result.summary()}
    support = model.likelihood.support
    if support is None:
        summary["note"] = "the likelihood is a density, so the NLL is not a code length and bits/dim is omitted"
    elif not result.discrete:
        summary["note"] = (
            f"the data do not all lie on {support}, so the {cfg.model.likelihood} 'likelihood' is not a probability of "
            "them: the NLL is not comparable with published log-likelihoods, and bits/dim is omitted"
        )
    if save:
        save_array(path.with_suffix(".npz"), neg_elbo=-result.elbo, nll=-result.log_px)
        write_text(path, json.dumps(summary, indent=2) + "\n")
    return result, summary


@torch.no_grad()
def sample(
    run: str | Path, n: int = 64, *, seed: int = 0, out: str | Path | None = None, npy: str | Path | None = None
) -> torch.Tensor:
    """Decoded draws from the prior of a trained run, optionally written as a PNG grid and/or .npy."""
    if n < 1:
        raise VaekitError(f"the number of samples must be at least 1, got {n}")
    if not 0 <= seed < 2**63:
        raise VaekitError(f"the seed must be an integer from 0 to 2**63 - 1, got {seed}")
    check_writable(out, npy)
    model = load(run)
    images = model.sample(n, torch.Generator().manual_seed(seed))
    if out is not None:
        save_grid(images, out)
    if npy is not None:
        save_array(npy, images)
    return images


@torch.no_grad()
def reconstruct(
    run: str | Path, n: int = 32, *, split: str = "test", out: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a split and their reconstructions from the posterior means."""
    if n < 1:
        raise VaekitError(f"the number of examples must be at least 1, got {n}")
    model, cfg = load(run), load_config(run)
    x = _examples(model, cfg, split)[0][:n]
    recon = model.decode(model.encode(x)[0])
    if out is not None:
        _require_images(model.shape)
        figures.image_panels([("originals", x), ("reconstructions", recon)], out, nrow=8)
    return x, recon


@torch.no_grad()
def encode(
    run: str | Path, *, split: str = "test", out: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Posterior means, log-variances and labels for a whole split; out receives an (N, 2, latent) .npy array."""
    model, cfg = load(run), load_config(run)
    x, y = _examples(model, cfg, split)
    mean, logvar = encode_all(model, x, cfg.train.eval_batch_size)
    if out is not None:
        if str(out).endswith(".npz"):
            save_array(out, mean=mean, logvar=logvar, **({} if y is None else {"label": y}))
        else:
            save_array(out, torch.stack([mean, logvar], dim=1))
    return mean, logvar, y


def read_latents(path: str | Path, latent: int) -> torch.Tensor:
    """Latent codes from (N, latent) codes in a .npy file, or from encode's output (.npy or .npz), using its means."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.ndarray):
            with z:
                z = z["mean"] if "mean" in z.files else None
    except FileNotFoundError:
        raise VaekitError(f"latents file not found: {path}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise VaekitError(f"cannot read {path} as a .npy array: {str(e).splitlines()[0]}") from None
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
    run: str | Path,
    latents: str | Path | torch.Tensor,
    *,
    out: str | Path | None = None,
    npy: str | Path | None = None,
) -> torch.Tensor:
    """Decode latent codes (a tensor or a .npy file) of a trained run, optionally writing a PNG grid and/or .npy."""
    check_writable(out, npy)
    model = load(run)
    z = latents if isinstance(latents, torch.Tensor) else read_latents(latents, model.latent)
    images = model.decode(z)
    if out is not None:
        save_grid(images, out)
    if npy is not None:
        save_array(npy, images)
    return images


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


@torch.no_grad()
def plot(run: str | Path, *, model: VAE | None = None, data: Dataset | None = None) -> list[Path]:
    """Draw every plot of a run into RUN/plots and return their paths."""
    run = Path(run)
    cfg = load_config(run)
    model = model if model is not None else load(run)
    if model.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    model.eval()
    x, y = _examples(model, cfg, "test", data)
    out = run / PLOTS
    made = []
    metrics = read_metrics(run)
    if metrics:
        made.append(figures.loss_curves(metrics, out / "loss.png"))
    mean, _ = encode_all(model, x)
    axes = ("z[0]", "z[1]")
    if model.latent == 1:
        z2, title = torch.cat([mean, torch.zeros_like(mean)], 1).numpy(), "test set in latent space (1-D)"
    elif model.latent == 2 or len(mean) < 2:
        z2, title = mean[:, :2].numpy(), "test set in latent space"
    else:
        from sklearn.decomposition import PCA

        z2, title = PCA(2).fit_transform(mean.numpy()), f"test set in latent space (PCA of {model.latent} dims)"
        axes = ("principal component 1", "principal component 2")
    labels = None if y is None else y.numpy()
    made.append(figures.latent_scatter(z2, labels, out / "latent.png", title, axes))
    if _is_image(model.shape):
        g = torch.Generator().manual_seed(0)
        made.append(figures.image_panels([("samples from the prior", model.sample(64, g))], out / "samples.png", 8))
        grid_title = "latent manifold" + (" (dims 0 and 1, others 0)" if model.latent > 2 else "")
        if model.latent >= 2:
            made.append(figures.image_panels([(grid_title, manifold(model))], out / "manifold.png", 20))
        n = min(32, len(x))
        recon = model.decode(model.encode(x[:n])[0])
        made.append(
            figures.image_panels([("originals", x[:n]), ("reconstructions", recon)], out / "reconstructions.png", 8)
        )
        pairs = min(8, len(x) // 2)
        if pairs:
            path = interpolate(model, x[:pairs], x[pairs : 2 * pairs], 10).flatten(0, 1)
            made.append(
                figures.image_panels([("interpolations between test pairs", path)], out / "interpolations.png", 10)
            )
    return made
