"""The one-class benchmark of Ruff et al. (2018, Deep SVDD): for each class c, a VAE trained on the training images of
class c alone scores the whole test set, c normal and every other class anomalous; its AUROC stands beside classical
detectors (scikit-learn, on raw pixels) fitted to the same images and tested on the same split, in the same run.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VaekitError
from ..files import together, write_json, write_text
from ..run import Run, open_run
from .anomaly import fit_latent, metrics, scores

# The VAE the benchmark trains for each class, and its score: chosen by measurement (README, "Anomaly detection").
# Only the newest checkpoint of each class's run is kept: the benchmark resumes class by class.
SETTINGS: dict[str, Any] = {
    "epochs": 50,
    "hidden": [512, 256],
    "latent": 16,
    "likelihood": "gaussian",
    "train.keep_checkpoints": 1,
}
SCORE, K = "nll", 30
BASELINES = ("isolation-forest", "one-class-svm", "knn", "pca")
SVM_SAMPLE = 2000  # training images the one-class SVM is fitted to: its cost grows with the square of their number


def baseline_scores(train: np.ndarray, test: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Anomaly scores (higher = more anomalous) of test rows from classical detectors fitted to train rows: an
    isolation forest, a one-class SVM (RBF kernel, gamma 'scale', nu 0.1, on at most SVM_SAMPLE rows), the mean
    distance to the 5 nearest training rows, and the reconstruction error of a PCA keeping 90% of the variance."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import NearestNeighbors
    from sklearn.svm import OneClassSVM

    rng = np.random.default_rng(seed)
    sample = train[rng.choice(len(train), min(len(train), SVM_SAMPLE), replace=False)]
    distances, _ = NearestNeighbors(n_neighbors=min(5, len(train))).fit(train).kneighbors(test)
    pca = PCA(0.9, random_state=seed).fit(train)
    return {
        "isolation-forest": -IsolationForest(random_state=seed).fit(train).score_samples(test),
        "one-class-svm": -OneClassSVM(gamma="scale", nu=0.1).fit(sample).score_samples(test),
        "knn": distances.mean(1),
        "pca": ((test - pca.inverse_transform(pca.transform(test))) ** 2).sum(1),
    }


def _train_class(data: str, c: int, folder: Path, root: str, settings: dict[str, Any], device: str) -> Run:
    """The VAE of class c: trained, or finished after an interruption, or read back when it had finished."""
    from ..training import resume, train

    if not (folder / "config.toml").exists():
        overrides = {"data": data, "root": root, "device": device, "data.classes": [c], **settings}
        return train("seed", folder, verbose=False, **overrides)
    run = open_run(folder)
    if len(run.metrics) < run.config.train.epochs:
        return resume(folder, verbose=False)
    return run


def one_class(
    data: str = "mnist",
    *,
    root: str = "",
    out: str | Path | None = None,
    classes: list[int] | None = None,
    score: str = SCORE,
    k: int = K,
    device: str = "auto",
    progress: bool = True,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Run the benchmark and return one row per class: the VAE's AUROC and each baseline's, with seconds.

    Each class's model goes to OUT/class-C (a run directory) and its result to OUT/class-C.json, so an interrupted
    benchmark continues where it stopped; OUT/results.csv and OUT/results.md hold the table with its means.
    """
    from tqdm.auto import tqdm

    from ..config import make_config
    from ..data import load_data

    out = Path(out if out is not None else f"runs/one-class-{data}")
    settings = {**SETTINGS, **settings}
    cfg = make_config("seed", overrides={"data.name": data, "data.root": root, **settings})
    test = load_data(cfg.data).split("test")  # the same test split every class's run holds
    if test.y is None:
        raise VaekitError(f"data '{data}' has no labels, so it has no classes to take in turn")
    classes = classes if classes is not None else sorted(set(test.y.tolist()))
    rows = []
    bar = tqdm(classes, desc=f"one-class {data}", unit="class", disable=not progress or None)
    for c in bar:
        done = out / f"class-{c}.json"
        if done.exists():
            rows.append(json.loads(done.read_text(encoding="utf-8")))
            continue
        began = time.perf_counter()
        run = _train_class(data, c, out / f"class-{c}", root, settings, device)
        model, train = run.model_on(run.model.device), run.examples("train").x
        anomalous = test.y != c
        latent = fit_latent(model, train) if score == "latent" else None
        vae = scores(model, test.x, score, k=k, latent=latent)
        row: dict[str, Any] = {"class": c, "normal": int((~anomalous).sum()), "vae": metrics(vae, anomalous)["auroc"]}
        trained = time.perf_counter()
        for name, values in baseline_scores(train.flatten(1).numpy(), test.x.flatten(1).numpy()).items():
            row[name] = metrics(torch.from_numpy(values), anomalous)["auroc"]
        row.update(vae_seconds=round(trained - began, 1), baseline_seconds=round(time.perf_counter() - trained, 1))
        write_json(done, row, indent=None)
        rows.append(row)
        bar.set_postfix(vae=f"{row['vae']:.3f}", knn=f"{row['knn']:.3f}")
    with together():
        write_text(out / "results.csv", _csv(rows))
        write_text(out / "results.md", table(rows, data, score))
    return rows


COLUMNS = ("vae", *BASELINES)


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS}


def _csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", *COLUMNS, "vae_seconds", "baseline_seconds"])
    for r in rows:
        writer.writerow([r["class"], *(f"{r[c]:.4f}" for c in COLUMNS), r["vae_seconds"], r["baseline_seconds"]])
    writer.writerow(["mean", *(f"{v:.4f}" for v in _means(rows).values()), "", ""])
    return text.getvalue()


def table(rows: list[dict[str, Any]], data: str, score: str) -> str:
    """The per-class AUROC table with its means, as Markdown."""
    lines = [
        f"One-class AUROC on {data} (normal class c; every other class anomalous; VAE score: {score})",
        "",
        "| class | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    lines += [f"| {r['class']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |" for r in rows]
    lines.append("| **mean** | " + " | ".join(f"**{v:.4f}**" for v in _means(rows).values()) + " |")
    seconds = sum(r["vae_seconds"] + r["baseline_seconds"] for r in rows)
    lines += ["", f"{len(rows)} classes, {seconds / 60:.1f} minutes of computation."]
    return "\n".join(lines) + "\n"
