"""The commands that train a model and use a run: train, evaluate, sample, reconstruct, encode, decode, plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import PRESETS
from ..errors import VaekitError
from . import RUN_DATA_DIR, Arg, arg, command


def _int_list(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")
    return sizes


SPLIT = arg("--split", default="test", help="train, test or valid (where there is one)")
RESUME = (
    "continue a stopped run from its newest checkpoint (or a file in RUN/checkpoints); only --epochs and --data-dir "
    "(where its data are now) may change"
)
SET = "any other setting, e.g. --set model.net=conv or --set 'train.optimizer_args={eps=1e-4}' (repeatable)"
BINARIZE = "dynamic binarisation: training images are binarised anew each epoch"
ACTIVATIONS = "relu, tanh, elu, gelu, silu, leaky_relu or softplus"
DATA = "digits, mnist, fashion-mnist, kmnist, binarized-mnist, a .npy/.npz file or an image folder"
LIMIT = "evaluate only the first N examples of the split, in stored order (as encode writes them): evaluation-firstN"
ELEMENTS = "the most decoder outputs computed at once (default: 2**20 on a CPU, 2**26 on a GPU); lower it on OOM"
DATA_DIR = "where downloadable data sets live (default: $VAEKIT_DATA or ~/.cache/vaekit)"
ENCODE_OUT = ".npy (N, 2, latent) of means and log-variances, or .npz with mean/logvar/label (default: RUN/latents.npy)"


def out(default: str, npy: str = "") -> tuple[Arg, ...]:
    """-o/--out with its default in the run, and with npy also --npy."""
    only = ", none if only --npy is given" if npy else ""
    picture = arg("-o", "--out", metavar="PNG", help=f"image to write (default: RUN/{default}{only})")
    return (picture, arg("--npy", metavar="FILE", help=f"also write the {npy} as a .npy array")) if npy else (picture,)


@command(
    ("vaekit train --preset seed --data-dir ~/data --epochs 5", "vaekit train --resume runs/seed-20260101-120000"),
    arg("--preset", help=f"starting configuration: {', '.join(PRESETS)} (default: the config file's, else digits)"),
    arg("--config", metavar="FILE", help="a TOML file with [data], [model], [train] tables"),
    # Flags whose dest is a dotted config key become overrides as they are.
    arg("--data", dest="data.name", metavar="DATA", help=DATA),
    arg("--data-dir", dest="data.root", metavar="DIR", help=DATA_DIR),  # made absolute by train
    arg("--no-download", dest="data.download", action="store_const", const=False, help="never fetch data from the web"),
    arg("--binarize", dest="data.binarize", action="store_const", const=True, help=BINARIZE),
    arg("--image-size", dest="data.image_size", type=int, metavar="N", help="resize folder images to N x N"),
    arg("--epochs", dest="train.epochs", type=int, metavar="N"),
    arg("--batch-size", dest="train.batch_size", type=int, metavar="N"),
    arg("--lr", dest="train.lr", type=float, metavar="LR", help="learning rate"),
    arg("--latent", dest="model.latent", type=int, metavar="N", help="latent dimensions"),
    arg("--hidden", dest="model.hidden", type=_int_list, metavar="N,N", help="hidden layer widths, e.g. 512,256"),
    arg("--activation", dest="model.activation", metavar="NAME", help=ACTIVATIONS),
    arg("--objective", dest="train.objective", metavar="NAME", help="elbo (default) or iwae"),
    arg("--k", dest="train.k", type=int, metavar="N", help="posterior draws per example (default: 1)"),
    arg("--beta", dest="train.beta", type=float, metavar="B", help="KL weight (default: 1)"),
    arg("--seed", dest="train.seed", type=int, metavar="N"),
    arg("--device", dest="train.device", metavar="DEVICE", help="auto (default), cpu, cuda, cuda:N or mps"),
    arg("--set", action="append", default=[], metavar="KEY=VALUE", help=SET),
    arg("--out", metavar="DIR", help="run directory (default: runs/PRESET-TIMESTAMP)"),
    arg("--resume", metavar="RUN", help=RESUME),
    arg("--no-plots", action="store_true", help="skip drawing plots at the end"),
    arg("--no-report", action="store_true", help="skip writing RUN/report.html at the end"),
    arg("-q", "--quiet", action="store_true", help="print only the run directory"),
    takes_run=False,
)
def _train(a: argparse.Namespace) -> None:
    """Train a VAE and save it as a run directory.

    Settings come from a preset, then --config, then the flags. Checkpoints go to RUN/checkpoints; SIGINT (Ctrl-C) or
    SIGTERM saves one and stops, and --resume continues the run exactly where it stopped.
    """
    from ..config import make_config, parse_assignment
    from ..files import check_writable, together
    from ..plots import plot
    from ..run import ARTIFACTS, Run
    from ..training import resume, train
    from ..world import World

    overrides: dict[str, Any] = dict(parse_assignment(text) for text in a.set)
    overrides.update({k: v for k, v in vars(a).items() if "." in k and v is not None})
    if a.resume:
        moving = ("train.epochs", "data.root")
        others = [k for k in overrides if k not in moving] + [f for f in ("preset", "config", "out") if vars(a)[f]]
        if others:
            what = others[0] if "." in others[0] else f"--{others[0]}"
            raise VaekitError(
                f"--resume continues a run with its saved settings: --epochs and --data-dir may change, {what} cannot"
            )
        # What the command writes after training must be writable before it trains: a run is never half-updated.
        given = Path(a.resume)
        ended = Run(given.parent.parent if given.is_file() else given)
        check_writable(*(ended.path(name) for name in ARTIFACTS if name.endswith("-plot") and not a.no_plots),
                       None if a.no_report else ended.path("report"))  # fmt: skip
        run = resume(a.resume, epochs=overrides.get("train.epochs"), data_dir=overrides.get("data.root"),
                     verbose=not a.quiet)  # fmt: skip
    else:
        run = train(make_config(a.preset, a.config, overrides), a.out, verbose=not a.quiet)
    if not World().is_main:  # under torchrun, the main process draws and says what was made
        return
    with together():  # the plots and the report appear together, or neither does
        if not a.no_plots:
            plot(run)
        if not a.no_report:
            from ..uses.report import report

            report(run)
    if not a.quiet:
        for made, name in ((not a.no_plots, "plots"), (not a.no_report, "report")):
            if made:
                print(f"{name}: {run.path(name)}")
    print(run.dir)


@command(
    ("vaekit evaluate runs/seed-20260101-120000 --k 5000", "vaekit evaluate runs/seed-20260101-120000 --limit 500"),
    SPLIT,
    arg("--k", type=int, default=5000, help="importance samples per example; likelihood papers use 5000"),
    arg("--seed", type=int, default=0, help="random seed of the posterior draws"),
    arg("--limit", type=int, metavar="N", help=LIMIT),
    arg("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps"),
    arg("--max-elements", type=int, metavar="N", help=ELEMENTS),
    arg("--no-save", action="store_true", help="print only; write no evaluation file"),
    RUN_DATA_DIR,
)
def _evaluate(a: argparse.Namespace) -> None:
    """Estimate log-likelihood (importance sampling), ELBO, bits/dim and active units."""
    from ..run import open_run
    from ..uses.evaluation import evaluate, table

    options = {"split": a.split, "k": a.k, "seed": a.seed, "device": a.device, "max_elements": a.max_elements}
    _, s = evaluate(a.run, limit=a.limit, save=not a.no_save, **options)
    print(table(s))
    if not a.no_save:
        print(f"wrote {open_run(a.run).evaluation_path(a.split, s.get('first'))}")


@command(
    ("vaekit report runs/digits-20260101-120000", "vaekit report runs/a runs/b -o compare.html"),
    arg("runs", nargs="+", metavar="RUN", help="one run, or several to compare side by side"),
    arg("-o", "--out", metavar="HTML", help="the page to write (default: RUN/report.html; needed for several runs)"),
    arg("--points", type=int, default=1500, help="test examples in the latent explorer"),
    arg("--data-dir", metavar="DIR", help="where the runs' data are now, if they moved"),
    takes_run=False,
)
def _report(a: argparse.Namespace) -> None:
    """Write one self-contained HTML page of runs: settings, curves, evaluation, images and a latent explorer.

    The page needs no server and makes no network request: open it from disk, mail it. MLP decoders run in the page,
    so dragging on the latent map decodes the point under the cursor.
    """
    from ..run import open_run
    from ..uses.report import report

    print(f"wrote {report([open_run(r, data_dir=a.data_dir) for r in a.runs], a.out, points=a.points)}")


def _default(a: argparse.Namespace, name: str) -> Path | None:
    """-o if given; else no picture when only --npy was asked for; else the run's artifact called name."""
    from ..run import open_run

    if a.out:
        return Path(a.out)
    return None if getattr(a, "npy", None) else open_run(a.run).path(name)


def _wrote(*paths: Path | str | None) -> str:
    return "wrote " + " and ".join(str(p) for p in paths if p)


@command(
    ("vaekit sample runs/digits-20260101-120000 -n 64 -o samples.png",),
    arg("-n", type=int, default=64, help="number of samples"),
    *out("samples.png", npy="images"),
    arg("--seed", type=int, default=0, help="random seed of the draws"),
)
def _sample(a: argparse.Namespace) -> None:
    """Draw images from the prior of a trained model."""
    from ..uses.generation import sample

    path = _default(a, "samples")
    sample(a.run, a.n, seed=a.seed, out=path, npy=a.npy)
    print(_wrote(path, a.npy))


@command(
    ("vaekit reconstruct runs/digits-20260101-120000 -n 32 -o recon.png",),
    SPLIT,
    arg("-n", type=int, default=32, help="number of examples"),
    *out("reconstructions.png"),
    RUN_DATA_DIR,
)
def _reconstruct(a: argparse.Namespace) -> None:
    """Show examples next to their reconstructions."""
    from ..uses.generation import reconstruct

    path = _default(a, "reconstructions")
    reconstruct(a.run, a.n, split=a.split, out=path)
    print(_wrote(path))


@command(
    ("vaekit encode runs/digits-20260101-120000 -o latents.npy",),
    SPLIT,
    arg("-o", "--out", metavar="FILE", help=ENCODE_OUT),
    RUN_DATA_DIR,
)
def _encode(a: argparse.Namespace) -> None:
    """Write posterior means and log-variances of a data split."""
    from ..uses.generation import encode

    path = _default(a, "latents")
    mean, _, _ = encode(a.run, split=a.split, out=path)
    print(f"{_wrote(path)} ({len(mean)} examples, {mean.shape[1]} latent dimensions)")


@command(
    ("vaekit decode runs/digits-20260101-120000 latents.npy -o decoded.png",),
    arg("latents", metavar="LATENTS", help=".npy of shape (N, latent), or the output of 'encode'"),
    *out("decoded.png", npy="decoded images"),
)
def _decode(a: argparse.Namespace) -> None:
    """Decode latent codes into images."""
    from ..uses.generation import decode

    path = _default(a, "decoded")
    images = decode(a.run, a.latents, out=path, npy=a.npy)
    print(f"{_wrote(path, a.npy)} ({len(images)} decoded)")


@command(
    ("vaekit plot runs/digits-20260101-120000", "vaekit plot runs/fashion-mnist-20260101-120000 --data-dir /mnt/data"),
    RUN_DATA_DIR,
)
def _plot(a: argparse.Namespace) -> None:
    """Draw all plots of a run into RUN/plots."""
    from ..plots import plot

    for path in plot(a.run):
        print(path)
