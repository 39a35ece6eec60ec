"""A VAE anomaly detector in scikit-learn's style, for arrays of images or of table rows."""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ..config import make_config
from ..data import Dataset, Split
from ..errors import VaekitError
from ..files import write_json, write_text
from ..model import VAE
from ..run import Run, open_run, save_model
from ..tables import Scaler
from .anomaly import FORMAT, LatentFit, fingerprint, fit_latent, read_calibration, scores, threshold_at


class AnomalyDetector(OutlierMixin, BaseEstimator):
    """Fit a VAE on normal data, then score new data with one of the anomaly scores, `method` (see
    `vaekit.uses.anomaly.SCORES`; the parameter is not called `score`, which scikit-learn reserves for a method).

    X is an array of table rows (N, D), which are standardised with the statistics of the training rows, or of images
    (N, H, W) or (N, C, H, W) with values in [0, 1] (or uint8); both are modelled with a Gaussian likelihood with a
    learned deviation, which detected anomalies better than a Bernoulli on grey images in our measurements. The
    conventions are scikit-learn's: `score_samples` is higher for normal examples, `decision_function` is negative for
    anomalies, `predict` gives -1 for anomalies and 1 for normal examples, and a fraction `contamination` of the
    training data lies beyond the threshold. `threshold_` is that threshold on the anomaly score itself (higher = more
    anomalous), and `offset_` = -threshold_. `device` is where the VAE trains; scores are computed on the CPU in
    float64, so that a fitted model gives an example the same score in any batch and wherever it is loaded.
    `save(path)` writes a run directory that `AnomalyDetector.load(path)` and every `vaekit` command read.
    """

    def __init__(
        self,
        method: str = "nll",
        contamination: float = 0.01,
        *,
        k: int = 100,
        epochs: int = 50,
        latent: int = 8,
        hidden: tuple[int, ...] = (512, 256),
        net: str = "mlp",
        batch_size: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
        device: str = "auto",
        verbose: bool = False,
    ) -> None:
        self.scaler_: Scaler | None
        self.method = method
        self.contamination = contamination
        self.k = k
        self.epochs = epochs
        self.latent = latent
        self.hidden = hidden
        self.net = net
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device
        self.verbose = verbose

    def _examples(self, X: Any, reset: bool) -> torch.Tensor:
        """X as a float tensor the model takes: standardised rows, or images in [0, 1] with a channel axis."""
        integers = getattr(X, "dtype", None) == np.uint8
        a = check_array(X, allow_nd=True, dtype=None if integers else np.float64)
        if a.ndim == 2:  # tables: scikit-learn's checks of the number of features
            a = validate_data(self, a, reset=reset, dtype=np.float64)
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / (255.0 if integers else 1.0))
        if not reset and tuple(x.shape[1:]) != self.model_.shape and x.ndim > 2:
            x = x.unsqueeze(1)  # (N, H, W) images for a model of (1, H, W)
        if not reset and tuple(x.shape[1:]) != self.model_.shape:
            raise ValueError(
                f"X has examples of shape {tuple(a.shape[1:])}; the detector was fitted on {self.model_.shape}"
            )
        if x.ndim == 2:
            if reset:
                self.scaler_ = Scaler.fit(x, [f"x{i}" for i in range(x.shape[1])])
            assert self.scaler_ is not None  # fitted above, or when the detector was
            return self.scaler_.apply(x, self.scaler_.columns, "X")
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4:
            raise ValueError(f"expected table rows (N, D) or images (N, H, W) / (N, C, H, W), got shape {a.shape}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError("images must have values in [0, 1] (or be uint8)")
        return x

    def fit(self, X: Any, y: Any = None) -> AnomalyDetector:
        """Train the VAE on X (normal data; y is ignored) and set the threshold from the training scores."""
        from ..training import train

        if not 0 < self.contamination <= 0.5:
            raise ValueError(f"contamination must be in (0, 0.5], got {self.contamination}")
        self.scaler_ = None
        x = self._examples(X, reset=True)
        settings: dict[str, Any] = {
            "epochs": self.epochs, "latent": self.latent, "hidden": list(self.hidden), "net": self.net,
            "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed, "device": self.device,
            "likelihood": "gaussian", "data.name": "in-memory",
        }  # fmt: skip
        config = make_config("digits", overrides=settings)
        with tempfile.TemporaryDirectory(prefix="vaekit-detector-") as tmp:
            run = train(config, Path(tmp) / "run", dataset=Dataset("array", {"train": Split(x)}, self.scaler_),
                        verbose=self.verbose)  # fmt: skip
            self.model_: VAE = run.model.eval()
            self.config_ = run.config
            self.metrics_ = run.metrics
        self.latent_ = fit_latent(self.model_, x) if self.method == "latent" else None
        self.threshold_ = threshold_at(self._scores(x), self.contamination)
        self.offset_ = -self.threshold_
        self.fingerprint_ = fingerprint(x)
        return self

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        # In float64 on the CPU, so that an example's score does not depend on the batch it comes in, as scikit-learn
        # expects, nor on where the detector was fitted or loaded: float32 products, and GPU kernels (chosen by batch
        # shape) even in float64, round differently for different batch sizes.
        model = copy.deepcopy(self.model_).to("cpu", torch.float64)
        return scores(model, x.double(), self.method, k=self.k, seed=self.seed, latent=self.latent_)

    def score_samples(self, X: Any) -> np.ndarray:
        """The opposite of the anomaly score: the lower, the more anomalous."""
        check_is_fitted(self)
        return -self._scores(self._examples(X, reset=False)).numpy()

    def decision_function(self, X: Any) -> np.ndarray:
        """score_samples - offset_: negative for anomalies, positive for normal examples."""
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """-1 for anomalies (anomaly score above threshold_), 1 for normal examples."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def save(self, path: str | Path) -> Run:
        """Write the fitted detector as a run directory: model, configuration, metrics, scaler and calibration."""
        check_is_fitted(self)
        run = Run(path)
        if run.path("description").exists() or run.path("config").exists():
            raise VaekitError(f"{path} already holds a run; save the detector elsewhere")
        save_model(self.model_, run.dir)
        write_text(run.path("config"), self.config_.to_toml())
        write_text(run.path("metrics"), "".join(json.dumps(m) + "\n" for m in self.metrics_))
        if self.scaler_ is not None:
            self.scaler_.save(run.path("scaler"))
        calibration = {
            "format": FORMAT, "version": 1, "score": self.method, "k": self.k, "seed": self.seed,
            "fpr": self.contamination, "threshold": self.threshold_,
            "normal_data": {"data": "the training data", "sha256": self.fingerprint_},
            "model_sha256": hashlib.sha256(run.path("weights").read_bytes()).hexdigest(),
            **({"latent": self.latent_.to_dict()} if self.latent_ is not None else {}),
        }  # fmt: skip
        write_json(run.path("anomaly"), calibration)
        return run

    @classmethod
    def load(cls, path: str | Path) -> AnomalyDetector:
        """A detector saved with save, or any run calibrated with `vaekit anomaly calibrate`."""
        run = open_run(path)
        calibration = read_calibration(run)
        t = run.config.train
        detector = cls(calibration["score"], calibration["fpr"], k=calibration["k"], epochs=t.epochs,
                       latent=run.config.model.latent, hidden=tuple(run.config.model.hidden), net=run.config.model.net,
                       batch_size=t.batch_size, lr=t.lr, seed=calibration["seed"])  # fmt: skip
        detector.model_, detector.config_, detector.metrics_ = run.model, run.config, run.metrics
        detector.scaler_ = run.scaler
        detector.latent_ = LatentFit.from_dict(calibration["latent"]) if "latent" in calibration else None
        detector.threshold_ = calibration["threshold"]
        detector.offset_ = -detector.threshold_
        detector.fingerprint_ = calibration["normal_data"].get("sha256", "")
        if len(run.model.shape) == 1:
            detector.n_features_in_ = run.model.shape[0]
        return detector
