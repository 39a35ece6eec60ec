"""Anomaly detection: per-example scores (higher = more anomalous), a threshold calibrated to a false-alarm rate on
normal data, and metrics where labels are known.

`scores`, `error_map`, `fit_latent`, `threshold_at` and `metrics` work on a model and tensors; `calibrate`,
`score_run` and `report` take a run, keep the calibration in it (RUN/anomaly.json) and write files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Split, load_examples
from ..errors import VaekitError
from ..files import check_writable, read_json, together, write_json, write_text
from ..importance import blocks, check_arguments
from ..model import VAE, encode_all
from ..optim import pick_device
from ..run import Run, open_run

SCORES = {
    "nll": "importance-sampled negative log-likelihood, -log p(x), from k posterior draws",
    "elbo": "negative ELBO, averaged over k posterior draws",
    "recon": "reconstruction error under the model's likelihood, -log p(x | z = posterior mean)",
    "latent": "Mahalanobis distance of the posterior mean from the training data's aggregate posterior",
}
FORMAT = "vaekit-anomaly"
EXTREMES = 8  # the most and the least anomalous examples a report names (and, for images, shows)


@dataclass
class LatentFit:
    """The aggregate posterior of the training data as one Gaussian: its mean and precision (inverse covariance)."""

    mean: torch.Tensor  # (latent,)
    precision: torch.Tensor  # (latent, latent)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for JSON."""
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatentFit:
        """The inverse of to_dict."""
        return cls(torch.tensor(raw["mean"], dtype=torch.float64), torch.tensor(raw["precision"], dtype=torch.float64))


def fit_latent(model: VAE, x: torch.Tensor) -> LatentFit:
    """Moment-match the aggregate posterior (1/N) sum_i q(z|x_i) of x with one Gaussian."""
    mean, logvar = (t.double().cpu() for t in encode_all(model, x))
    centre = mean.mean(0)
    # The mixture's covariance: the spread of the posterior means plus the mean posterior variance.
    spread = (mean - centre).T @ (mean - centre) / len(mean)
    covariance = spread + torch.diag(logvar.exp().mean(0))
    return LatentFit(centre, torch.linalg.pinv(covariance, hermitian=True))


def _check_name(score: str) -> None:
    if score not in SCORES:
        raise VaekitError(f"unknown anomaly score '{score}' (allowed: {', '.join(SCORES)})")


@torch.no_grad()
def scores(
    model: VAE,
    x: torch.Tensor,
    score: str = "nll",
    *,
    k: int = 100,
    seed: int = 0,
    latent: LatentFit | None = None,
    max_elements: int | None = None,
    batch_size: int = 1000,
    progress: bool = False,
) -> torch.Tensor:
    """One anomaly score per example (float64, on the CPU), higher = more anomalous; see SCORES.

    Every example's score depends on it alone: the posterior draws of nll and elbo are the same k for all examples.
    latent needs the fit of the training data (`fit_latent`).
    """
    _check_name(score)
    check_arguments(k, seed, max_elements)
    if score in ("nll", "elbo"):
        g = torch.Generator(model.device).manual_seed(seed)
        parts = [b.log_px if score == "nll" else b.elbo for b in blocks(model, x, k, g, max_elements, progress, True)]
        return -torch.cat(parts).cpu().double() if parts else torch.zeros(0, dtype=torch.float64)
    if score == "latent":
        if latent is None:
            raise VaekitError("the latent score needs the aggregate posterior of the training data (fit_latent)")
        mean = encode_all(model, x, batch_size)[0].double().cpu() - latent.mean
        return ((mean @ latent.precision) * mean).sum(1).clamp(min=0).sqrt()
    return error_map(model, x, batch_size).flatten(1).sum(1)


@torch.no_grad()
def reconstruct(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The decoder's expected x at each example's posterior mean, on the CPU."""
    batches = (x[i : i + batch_size].to(model.device) for i in range(0, len(x), batch_size))
    parts = [model.decode(model.encode(xb)[0]) for xb in batches]
    return torch.cat(parts).cpu() if parts else x.new_zeros(x.shape)


@torch.no_grad()
def error_map(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """-log p(x_d | z = posterior mean) of every dimension d (float64, on the CPU): where the recon score comes from."""
    parts = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(model.device)
        parts.append(-model.likelihood.log_prob_dims(xb, model.decoder(model.encode(xb)[0])).double().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, *x.shape[1:], dtype=torch.float64)


def threshold_at(normal: torch.Tensor, fpr: float) -> float:
    """A threshold above which at most a fraction fpr of the normal scores lie, halfway between the highest score
    below it and the lowest above it (or, when none may lie above, as far above the highest as half the gap below)."""
    if not 0 < fpr < 1:
        raise VaekitError(f"the false-alarm rate must lie between 0 and 1, got {fpr}")
    ordered = normal.double().sort().values
    allowed = math.floor(fpr * len(ordered) + 1e-9)  # normal examples that may score above the threshold
    kept = ordered[len(ordered) - allowed - 1]
    # Off every normal score: one on the threshold would have its side decided by rounding, which differs between
    # batch sizes, devices and machines.
    if allowed:
        beyond = ordered[len(ordered) - allowed]
    elif len(ordered) > 1:
        beyond = 2 * kept - ordered[-2]
    else:
        beyond = kept
    return float((kept + beyond) / 2)


def metrics(score: torch.Tensor, anomalous: torch.Tensor, threshold: float | None = None) -> dict[str, Any]:
    """AUROC, AUPRC (anomalies positive), the false-alarm rate at 95% detection, and rates at threshold if given."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y, s = anomalous.bool().numpy(), score.double().numpy()
    if y.all() or not y.any():
        raise VaekitError("metrics need both normal and anomalous examples among the labels")
    fpr, tpr, _ = roc_curve(y, s)
    out: dict[str, Any] = {
        "examples": len(y),
        "anomalous": int(y.sum()),
        "auroc": float(roc_auc_score(y, s)),
        "auprc": float(average_precision_score(y, s)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95)]),
    }
    if threshold is not None:
        flagged = s > threshold
        out.update(threshold=threshold, tpr=float(flagged[y].mean()), fpr=float(flagged[~y].mean()))
    return out


def fingerprint(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's values."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().data).hexdigest()


def _examples(run: Run, data: str | Path | None, split: str | None) -> tuple[Split, str, list[str] | None]:
    """The examples to score, a short description and the names of their labels: a split of the run's data, or data
    from elsewhere (a file, a folder, or a built-in set's split), checked against the model's shape."""
    if data is None:
        split = split or ("valid" if "valid" in run.data.splits else "test")
        return run.examples(split), f"the {split} split of {run.config.data.name}", run.data.label_names
    # A folder's images are read at the model's size and channels, whatever data the run was trained on.
    cfg = replace(run.config.data, name=str(data), classes=[], validation=0)
    shape = run.model.shape
    if len(shape) == 3 and shape[1] == shape[2]:
        cfg = replace(cfg, channels=shape[0], image_size=shape[1])
    examples, label_names = load_examples(cfg, split or "test", run.scaler)
    run.check_shape(examples.x, f"{data} has examples")
    return examples, str(data), label_names


def _normal_only(run: Run, s: Split, data: str | Path | None) -> Split:
    """For a one-class run's own held-out data, the examples of its normal classes."""
    if data is not None or not run.config.data.classes or s.y is None:
        return s
    return s.take(torch.isin(s.y, torch.tensor(run.config.data.classes)).nonzero().flatten())


def _weights_digest(run: Run) -> str:
    """The SHA-256 of the run's weights file, which ties a calibration to the model it was made with."""
    try:
        return hashlib.sha256(run.path("weights").read_bytes()).hexdigest()
    except OSError as e:
        raise VaekitError(f"cannot read {run.path('weights')}: {e.strerror or e}") from None


def calibrate(
    run: Run | str | Path,
    *,
    data: str | Path | None = None,
    split: str | None = None,
    score: str = "nll",
    k: int = 100,
    fpr: float = 0.01,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Find the threshold that flags a fraction fpr of normal data, and save it with the score in RUN/anomaly.json.

    The normal data are data (a file, a folder or a built-in set's split) or, by default, the run's validation split
    (its test split when it has none; for a one-class run, that split's examples of its classes).
    """
    _check_name(score)
    check_arguments(k, seed, None)
    threshold_at(torch.zeros(1), fpr)
    run = open_run(run)
    check_writable(run.path("anomaly"))
    model = run.model_on(pick_device(device))
    examples, what, _ = _examples(run, data, split)
    examples = _normal_only(run, examples, data)
    latent = fit_latent(model, run.examples("train").x) if score == "latent" else None
    normal = scores(model, examples.x, score, k=k, seed=seed, latent=latent, progress=True)
    cut = threshold_at(normal, fpr)
    calibration = {
        "format": FORMAT,
        "version": 1,
        "score": score,
        "k": k,
        "seed": seed,
        "fpr": fpr,
        "threshold": cut,
        "normal_data": {"data": what, "examples": len(normal), "sha256": fingerprint(examples.x)},
        "false_alarms": int((normal > cut).sum()),
        "model_sha256": _weights_digest(run),
        **({"latent": latent.to_dict()} if latent is not None else {}),
    }
    write_json(run.path("anomaly"), calibration)
    return calibration


def read_calibration(run: Run) -> dict[str, Any]:
    """The calibration saved in a run, checked to belong to the run's current model."""
    path = run.path("anomaly")
    raw = read_json(path, f"{run.dir} has no anomaly threshold yet: run 'vaekit anomaly calibrate {run.dir}'")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("score") not in SCORES:
        raise VaekitError(f"{path} is not a vaekit anomaly calibration")
    if raw.get("model_sha256") != _weights_digest(run):
        raise VaekitError(f"{path} was calibrated for other weights than {run.path('weights')}; calibrate again")
    return raw


def _score_with(run: Run, calibration: dict[str, Any], x: torch.Tensor, device: str) -> torch.Tensor:
    """The calibrated score of x."""
    latent = LatentFit.from_dict(calibration["latent"]) if calibration["score"] == "latent" else None
    model = run.model_on(pick_device(device))
    return scores(model, x, calibration["score"], k=calibration["k"], seed=calibration["seed"], latent=latent,
                  progress=True)  # fmt: skip


def score_run(
    run: Run | str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    device: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Scores and flags (score above the calibrated threshold) of data, or of a split of the run's data, with the
    name of each example (its file in a folder, else its index); out receives them as CSV (name, score, anomalous)."""
    run = open_run(run)
    check_writable(out)
    calibration = read_calibration(run)
    examples, _, _ = _examples(run, data, split)
    values = _score_with(run, calibration, examples.x, device)
    flags = values > calibration["threshold"]
    names = examples.names or [str(i) for i in range(len(values))]
    if out is not None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["file" if examples.names else "index", "score", "anomalous"])
        writer.writerows((n, repr(float(v)), int(f)) for n, v, f in zip(names, values, flags, strict=True))
        write_text(out, text.getvalue())
    return values, flags, names


def _anomalous(labels: torch.Tensor | None, label_names: list[str] | None, normal: list[str] | None, run: Run):
    """Which examples are anomalous: those whose label is not among the normal ones (by name or number)."""
    if labels is None:
        raise VaekitError("these data have no labels, so there is nothing to measure the scores against")
    if not normal:
        if not run.config.data.classes:
            raise VaekitError("say which labels are normal with --normal (the run was not trained on chosen classes)")
        codes = list(run.config.data.classes)
    elif label_names is not None:
        unknown = [n for n in normal if n not in label_names]
        if unknown:
            raise VaekitError(f"unknown labels {', '.join(unknown)} (the data's labels: {', '.join(label_names)})")
        codes = [label_names.index(n) for n in normal]
    else:
        try:
            codes = [int(n) for n in normal]
        except ValueError:
            raise VaekitError(f"the labels of these data are numbers, got --normal {','.join(normal)}") from None
    return ~torch.isin(labels, torch.tensor(codes))


def report(
    run: Run | str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    normal: list[str] | None = None,
    score: str | None = None,
    k: int = 100,
    device: str = "auto",
) -> dict[str, Any]:
    """Measure the anomaly score against known labels: AUROC, AUPRC, the false-alarm rate at 95% detection (and the
    rates at the calibrated threshold) and the eight most and least anomalous examples, saved with a ROC curve, score
    histograms and, for images, those inputs beside their reconstructions and error maps in RUN/anomaly-report.

    The labels in normal (names or numbers) are normal, every other label anomalous; by default the classes the run
    was trained on. The score is the calibrated one, else score (default nll) with k draws.
    """
    from ..figures import anomaly_extremes, roc_curve, score_histograms
    from ..files import is_image

    run = open_run(run)
    calibration = read_calibration(run) if run.path("anomaly").exists() and score is None else None
    if calibration is None:
        _check_name(score or "nll")
        calibration = {"score": score or "nll", "k": k, "seed": 0, "threshold": None}
        if calibration["score"] == "latent":
            calibration["latent"] = fit_latent(run.model_on(pick_device(device)), run.examples("train").x).to_dict()
    out = run.path("anomaly-report")
    check_writable(out / "report.json")
    examples, what, label_names = _examples(run, data, split)
    anomalous = _anomalous(examples.y, label_names, normal, run)
    values = _score_with(run, calibration, examples.x, device)
    summary = {"data": what, "score": calibration["score"], "k": calibration["k"]}
    summary.update(metrics(values, anomalous, calibration["threshold"]))
    order = values.argsort(descending=True)
    extremes = {"most_anomalous": order[:EXTREMES], "least_anomalous": order.flip(0)[:EXTREMES]}
    for key, rows in extremes.items():
        summary[key] = [examples.names[i] if examples.names else i for i in rows.tolist()]
    with together():
        made = [roc_curve(values, anomalous, summary["auroc"], out / "roc.png")]
        made.append(score_histograms(values, anomalous, calibration["threshold"], summary["score"], out / "scores.png"))
        model = run.model_on(torch.device("cpu"))
        if is_image(model.shape):
            x = examples.x[torch.cat(list(extremes.values()))]
            made.append(anomaly_extremes(x, reconstruct(model, x), error_map(model, x), out / "extremes.png"))
        write_json(out / "report.json", summary)
    summary["files"] = [str(p) for p in [out / "report.json", *made]]
    return summary
