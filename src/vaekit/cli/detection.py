"""The anomaly-detection commands: calibrate a threshold, score data, report against labels, and the benchmark."""

from __future__ import annotations

import argparse

from . import RUN_DATA_DIR, arg, command

DATA = arg("--data", metavar="DATA", help="a .npy/.npz/.csv file, an image folder or a built-in data set (default: "
           "the run's own data)")  # fmt: skip
SPLIT = arg("--split", help="the split of the run's data or of a built-in set (calibrate: valid, else test; else test)")
DEVICE = arg("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
# The anomaly commands' --data is the data to score; RUN_DATA_DIR says where the run's own data are now.
SCORE = "nll, elbo, recon or latent (see README: 'Anomaly detection')"


@command(
    ("vaekit anomaly calibrate runs/seed-20260101-120000 --fpr 0.01",
     "vaekit anomaly calibrate runs/sensors --data normal-days.csv --score recon --fpr 0.05"),
    DATA,
    SPLIT,
    arg("--score", default="nll", help=SCORE),
    arg("--k", type=int, default=100, help="posterior draws per example for nll and elbo"),
    arg("--fpr", type=float, default=0.01, help="the false-alarm rate to allow on normal data"),
    arg("--seed", type=int, default=0, help="random seed of the posterior draws"),
    DEVICE,
    RUN_DATA_DIR,
    name="anomaly calibrate",
)  # fmt: skip
def _calibrate(a: argparse.Namespace) -> None:
    """Choose the anomaly score's threshold on normal data and save it in the run (RUN/anomaly.json).

    The threshold flags at most the fraction --fpr of the normal data given (--data, or by default the run's
    validation split, else its test split; for a run trained on chosen classes, that split's examples of them).
    """
    from ..uses.anomaly import calibrate

    c = calibrate(a.run, data=a.data, split=a.split, score=a.score, k=a.k, fpr=a.fpr, seed=a.seed, device=a.device)
    normal = c["normal_data"]
    print(f"threshold {c['threshold']:.6g} on the {c['score']} score: {c['false_alarms']} of {normal['examples']} "
          f"normal examples ({normal['data']}) lie above it")  # fmt: skip
    print(f"wrote {a.run}/anomaly.json")


@command(
    ("vaekit anomaly score runs/seed-20260101-120000 --data new.npy -o scores.csv",),
    DATA,
    arg("--split", default="test", help="the split of the run's data or of a built-in set"),
    arg("-o", "--out", metavar="CSV", help="write one row per example: index (or file), score, anomalous (0 or 1)"),
    DEVICE,
    RUN_DATA_DIR,
    name="anomaly score",
)
def _score(a: argparse.Namespace) -> None:
    """Score data with the calibrated anomaly score and flag what lies above the threshold.

    Finding anomalies is not an error: the exit code is 0 whatever the data hold.
    """
    from ..uses.anomaly import score_run

    values, flags, _ = score_run(a.run, data=a.data, split=a.split, out=a.out, device=a.device)
    print(f"{int(flags.sum())} of {len(values)} examples flagged as anomalous")
    if a.out:
        print(f"wrote {a.out}")


@command(
    ("vaekit anomaly report runs/one-class-mnist/class-3",
     "vaekit anomaly report runs/parts --data test-parts/ --normal good"),
    DATA,
    arg("--split", default="test", help="the split of the run's data or of a built-in set"),
    arg("--normal", type=lambda t: [v.strip() for v in t.split(",")], metavar="LABELS",
        help="labels (names or numbers, comma-separated) that are normal; the rest are anomalous (default: the "
        "classes the run was trained on)"),
    arg("--score", help=f"the score to measure when it is not the calibrated one: {SCORE}"),
    arg("--k", type=int, default=100, help="posterior draws per example for nll and elbo without a calibration"),
    DEVICE,
    RUN_DATA_DIR,
    name="anomaly report",
)  # fmt: skip
def _report(a: argparse.Namespace) -> None:
    """Measure the anomaly score against labels: AUROC, AUPRC, false alarms at 95% detection, and pictures.

    Writes RUN/anomaly-report/: report.json, roc.png, scores.png and, for images, extremes.png (the most and least
    anomalous inputs beside their reconstructions and error maps).
    """
    from ..uses.anomaly import report

    r = report(a.run, data=a.data, split=a.split, normal=a.normal, score=a.score, k=a.k, device=a.device)
    print(f"{r['score']} score on {r['data']}: {r['anomalous']} anomalous of {r['examples']}")
    print(f"AUROC {r['auroc']:.4f}  AUPRC {r['auprc']:.4f}  false alarms at 95% detection {r['fpr_at_95_tpr']:.4f}")
    if "tpr" in r:
        print(
            f"at the threshold {r['threshold']:.6g}: {r['tpr']:.4f} of anomalies and {r['fpr']:.4f} of normal flagged"
        )
    for path in r["files"]:
        print(f"wrote {path}")


@command(
    ("vaekit benchmark one-class --data mnist --data-dir ~/data", "vaekit benchmark one-class --data digits"),
    arg("--data", default="mnist", help="mnist, fashion-mnist, kmnist or digits"),
    arg("--data-dir", dest="root", default="", metavar="DIR", help="where the data sets live"),
    arg("--out", metavar="DIR", help="where the models and tables go (default: runs/one-class-DATA)"),
    arg("--classes", type=lambda t: [int(v) for v in t.split(",")], metavar="C,C", help="only these normal classes"),
    arg("--epochs", type=int, metavar="N", help="training epochs per class (default: the benchmark's)"),
    DEVICE,
    takes_run=False,
    name="benchmark one-class",
)  # fmt: skip
def _one_class(a: argparse.Namespace) -> None:
    """The one-class benchmark (Ruff et al. 2018): for each class, a VAE trained on it alone detects the others.

    Prints the per-class AUROC of the VAE beside an isolation forest, a one-class SVM, k-nearest-neighbour distance
    and PCA reconstruction error on raw pixels, fitted and tested on the same images in the same run, and saves the
    table as OUT/results.csv and OUT/results.md. An interrupted benchmark continues class by class.
    """
    from ..uses.oneclass import one_class, table

    extra = {} if a.epochs is None else {"epochs": a.epochs}
    rows = one_class(a.data, root=a.root, out=a.out, classes=a.classes, device=a.device, **extra)
    print(table(rows, a.data, "the benchmark's"), end="")
