"""Matplotlib figures drawn from arrays and written as PNG files; no model or run logic here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from .files import atomic_path
from .images import grid


def _save(fig: Figure, path: str | Path) -> Path:
    """Write fig as a PNG file."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def latent_scatter(
    z: np.ndarray, labels: np.ndarray | None, path: str | Path, title: str, axes: tuple[str, str] = ("z[0]", "z[1]")
) -> Path:
    """A 2-D scatter of latent codes, coloured by label with a legend when labels are known."""
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=4, alpha=0.6)
    else:
        classes = np.unique(labels)
        many = len(classes) > 10
        cmap = matplotlib.colormaps["turbo" if many else "tab10"]
        for i, c in enumerate(classes):
            pick = labels == c
            colour = cmap(i / (len(classes) - 1) if many else i)
            ax.scatter(z[pick, 0], z[pick, 1], s=4, alpha=0.6, label=str(c), color=colour)
        ax.legend(markerscale=3, fontsize="small", title="label", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    return _save(fig, path)


def image_panels(panels: Sequence[tuple[str, torch.Tensor]], path: str | Path, nrow: int) -> Path:
    """Side-by-side grids of images (N, C, H, W) in [0, 1], each with a title."""
    fig = Figure(figsize=(5 * len(panels), 5))
    for ax, (title, images) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        ax.imshow(grid(images, nrow, padding=1, pad_value=1.0), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    return _save(fig, path)


def loss_curves(metrics: list[dict[str, Any]], path: str | Path) -> Path:
    """Training, validation and test loss per epoch."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    epochs = [m["epoch"] for m in metrics]
    marker = "." if len(epochs) <= 50 else None
    for split in ("train", "valid", "test"):
        if any(f"{split}_loss" in m for m in metrics):
            # An epoch whose every update was skipped has no training loss (null): a gap in the curve.
            losses = [np.nan if m.get(f"{split}_loss") is None else m[f"{split}_loss"] for m in metrics]
            ax.plot(epochs, losses, marker=marker, label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO (nats per example)")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def roc_curve(score: torch.Tensor, anomalous: torch.Tensor, auroc: float, path: str | Path) -> Path:
    """The ROC curve of an anomaly score, anomalies as positives."""
    from sklearn.metrics import roc_curve as curve

    fpr, tpr, _ = curve(anomalous.numpy(), score.numpy())
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"AUROC {auroc:.4f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false-alarm rate (normal examples flagged)")
    ax.set_ylabel("detection rate (anomalies flagged)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_histograms(
    score: torch.Tensor, anomalous: torch.Tensor, threshold: float | None, name: str, path: str | Path
) -> Path:
    """Histograms of the score for normal and anomalous examples, with the threshold if there is one."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    values, flags = score.numpy(), anomalous.numpy().astype(bool)
    bins = np.histogram_bin_edges(values, bins=60).tolist()
    ax.hist(values[~flags], bins=bins, alpha=0.6, density=True, label=f"normal ({(~flags).sum()})")
    ax.hist(values[flags], bins=bins, alpha=0.6, density=True, label=f"anomalous ({flags.sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set_xlabel(f"anomaly score ({name}; higher = more anomalous)")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def anomaly_extremes(x: torch.Tensor, recon: torch.Tensor, errors: torch.Tensor, path: str | Path) -> Path:
    """Inputs, their reconstructions and error maps; the first half of the rows most anomalous, the rest least."""
    maps = errors.sum(1, keepdim=True).float()  # over colour channels
    # One scale for all, so that the rows can be compared; a density's -log p can be negative, hence the shift.
    maps = (maps - maps.min()) / (maps.max() - maps.min()).clamp(min=1e-12)
    half = len(x) // 2
    panels = [("inputs (top: most anomalous, bottom: least)", x), ("reconstructions", recon), ("error maps", maps)]
    return image_panels(panels, path, nrow=max(1, half))
