"""`plot`: every figure of a run, drawn into RUN/plots."""

from __future__ import annotations

from pathlib import Path

import torch

from .figures import image_panels, latent_scatter, loss_curves
from .files import is_image, together
from .model import encode_all
from .run import Run, open_run
from .uses.generation import interpolate, manifold


@torch.no_grad()
def plot(run: Run | str | Path) -> list[Path]:
    """Draw every plot of a run into RUN/plots and return their paths (all of them appear together, or none)."""
    with together():
        return _draw(open_run(run))


def _draw(run: Run) -> list[Path]:
    model = run.model_on(torch.device("cpu"))
    test = run.examples("test")
    x, y = test.x, test.y
    made = []
    metrics = run.metrics
    if metrics:
        made.append(loss_curves(metrics, run.path("loss-plot")))
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
    made.append(latent_scatter(z2, labels, run.path("latent-plot"), title, axes))
    if is_image(model.shape):
        g = torch.Generator().manual_seed(0)
        made.append(image_panels([("samples from the prior", model.sample(64, g))], run.path("samples-plot"), 8))
        grid_title = "latent manifold" + (" (dims 0 and 1, others 0)" if model.latent > 2 else "")
        if model.latent >= 2:
            made.append(image_panels([(grid_title, manifold(model))], run.path("manifold-plot"), 20))
        n = min(32, len(x))
        recon = model.decode(model.encode(x[:n])[0])
        made.append(
            image_panels([("originals", x[:n]), ("reconstructions", recon)], run.path("reconstructions-plot"), 8)
        )
        pairs = min(8, len(x) // 2)
        if pairs:
            path = interpolate(model, x[:pairs], x[pairs : 2 * pairs], 10).flatten(0, 1)
            made.append(
                image_panels([("interpolations between test pairs", path)], run.path("interpolations-plot"), 10)
            )
    return made
