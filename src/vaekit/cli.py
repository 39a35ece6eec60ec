"""The `vaekit` command: argument parsing and printing only; every command calls one API function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import VaekitError

EPILOG = "Run 'vaekit COMMAND --help' for a command's options. Docs and examples: README.md."


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_list(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")
    return sizes


def _build() -> argparse.ArgumentParser:
    from .config import PRESETS

    p = _Parser(prog="vaekit", description="Train, inspect and use variational auto-encoders.", epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a VAE and save it as a run directory",
        description="Train a VAE. Settings come from a preset, then --config, then the flags.\n"
        "Checkpoints go to RUN/checkpoints; SIGINT (Ctrl-C) or SIGTERM saves one and stops,\n"
        "and --resume continues the run exactly where it stopped.",
        epilog="examples: vaekit train --preset seed --data-dir ~/data --epochs 5\n"
        "          vaekit train --resume runs/seed-20260101-120000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--preset", help=f"starting configuration: {', '.join(PRESETS)} (default: the config file's, else digits)"
    )
    t.add_argument("--config", metavar="FILE", help="a TOML file with [data], [model], [train] tables")
    # Flags whose dest is a dotted config key become overrides as they are.
    t.add_argument(
        "--data",
        dest="data.name",
        metavar="DATA",
        help="digits, mnist, fashion-mnist, kmnist, binarized-mnist, a .npy/.npz file or an image folder",
    )
    t.add_argument(
        "--data-dir",
        dest="data.root",
        metavar="DIR",
        type=lambda p: str(Path(p).expanduser().resolve()),
        help="where downloadable data sets live (default: $VAEKIT_DATA or ~/.cache/vaekit)",
    )
    t.add_argument(
        "--no-download", dest="data.download", action="store_const", const=False, help="never fetch data from the web"
    )
    t.add_argument(
        "--binarize",
        dest="data.binarize",
        action="store_const",
        const=True,
        help="dynamic binarisation of training images",
    )
    t.add_argument("--image-size", dest="data.image_size", type=int, metavar="N", help="resize folder images to N x N")
    t.add_argument("--epochs", dest="train.epochs", type=int, metavar="N")
    t.add_argument("--batch-size", dest="train.batch_size", type=int, metavar="N")
    t.add_argument("--lr", dest="train.lr", type=float, metavar="LR", help="learning rate")
    t.add_argument("--latent", dest="model.latent", type=int, metavar="N", help="latent dimensions")
    t.add_argument(
        "--hidden", dest="model.hidden", type=_int_list, metavar="N,N", help="hidden layer widths, e.g. 512,256"
    )
    t.add_argument(
        "--activation",
        dest="model.activation",
        metavar="NAME",
        help="relu, tanh, elu, gelu, silu, leaky_relu or softplus",
    )
    t.add_argument("--objective", dest="train.objective", metavar="NAME", help="elbo (default) or iwae")
    t.add_argument("--k", dest="train.k", type=int, metavar="N", help="posterior draws per example (default: 1)")
    t.add_argument("--beta", dest="train.beta", type=float, metavar="B", help="KL weight (default: 1)")
    t.add_argument("--seed", dest="train.seed", type=int, metavar="N")
    t.add_argument("--device", dest="train.device", metavar="DEVICE", help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting, e.g. --set model.net=conv or --set 'train.optimizer_args={eps=1e-4}' (repeatable)",
    )
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/PRESET-TIMESTAMP)")
    t.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a stopped run from its newest checkpoint (or from a file in RUN/checkpoints) with its saved "
        "settings; only --epochs may change them",
    )
    t.add_argument("--no-plots", action="store_true", help="skip drawing plots at the end")
    t.add_argument("-q", "--quiet", action="store_true", help="print only the run directory")

    def run_command(name: str, help: str, example: str, split: bool = False) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=f"example: {example}")
        c.add_argument("run", metavar="RUN", help="a run directory made by 'vaekit train'")
        if split:
            c.add_argument("--split", default="test", help="train, test (default), or valid where there is one")
        return c

    v = run_command(
        "evaluate",
        "estimate log-likelihood (importance sampling), ELBO, bits/dim and active units",
        "vaekit evaluate runs/seed-20260101-120000 --k 5000",
        split=True,
    )
    v.add_argument(
        "--k", type=int, default=5000, help="importance samples per example (default: 5000, as in likelihood papers)"
    )
    v.add_argument("--seed", type=int, default=0, help="random seed of the posterior draws (default: 0)")
    v.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    v.add_argument(
        "--max-elements",
        type=int,
        metavar="N",
        help="the most decoder outputs computed at once (default: 2**20 on a CPU, 2**26 on a GPU); lower it if memory "
        "runs out",
    )
    v.add_argument("--no-save", action="store_true", help="print only; do not write RUN/evaluation.json")

    s = run_command(
        "sample",
        "draw images from the prior of a trained model",
        "vaekit sample runs/digits-20260101-120000 -n 64 -o samples.png",
    )
    s.add_argument("-n", type=int, default=64, help="number of samples (default: 64)")
    s.add_argument(
        "-o", "--out", metavar="PNG", help="image grid to write (default: RUN/samples.png, none if only --npy is given)"
    )
    s.add_argument("--npy", metavar="FILE", help="also write the images as a .npy array")
    s.add_argument("--seed", type=int, default=0, help="random seed of the draws (default: 0)")

    r = run_command(
        "reconstruct",
        "show examples next to their reconstructions",
        "vaekit reconstruct runs/digits-20260101-120000 -n 32 -o recon.png",
        split=True,
    )
    r.add_argument("-n", type=int, default=32, help="number of examples (default: 32)")
    r.add_argument("-o", "--out", metavar="PNG", help="figure to write (default: RUN/reconstructions.png)")

    e = run_command(
        "encode",
        "write posterior means and log-variances of a data split",
        "vaekit encode runs/digits-20260101-120000 -o latents.npy",
        split=True,
    )
    e.add_argument(
        "-o",
        "--out",
        metavar="FILE",
        help=".npy of shape (N, 2, latent) [means, log-variances], or .npz with mean/logvar/label "
        "(default: RUN/latents.npy)",
    )

    d = run_command(
        "decode",
        "decode latent codes into images",
        "vaekit decode runs/digits-20260101-120000 latents.npy -o decoded.png",
    )
    d.add_argument("latents", metavar="LATENTS", help=".npy of shape (N, latent), or the output of 'encode'")
    d.add_argument(
        "-o", "--out", metavar="PNG", help="image grid to write (default: RUN/decoded.png, none if only --npy is given)"
    )
    d.add_argument("--npy", metavar="FILE", help="also write the decoded images as a .npy array")

    run_command("plot", "draw all plots of a run into RUN/plots", "vaekit plot runs/digits-20260101-120000")
    return p


def _train(a: argparse.Namespace) -> None:
    from .config import make_config, parse_assignment
    from .training import resume, train

    overrides: dict[str, Any] = dict(parse_assignment(text) for text in a.set)
    overrides.update({k: v for k, v in vars(a).items() if "." in k and v is not None})
    if a.resume:
        others = [k for k in overrides if k != "train.epochs"] + [f for f in ("preset", "config", "out") if vars(a)[f]]
        if others:
            what = others[0] if "." in others[0] else f"--{others[0]}"
            raise VaekitError(f"--resume continues a run with its saved settings: --epochs may change, {what} cannot")
        run = resume(a.resume, epochs=overrides.get("train.epochs"), verbose=not a.quiet)
    else:
        run = train(make_config(a.preset, a.config, overrides), a.out, verbose=not a.quiet)
    if not a.no_plots:
        from .uses import plot

        plot(run.dir, model=run.model, data=run.data)
        if not a.quiet:
            print(f"plots: {run.dir / 'plots'}")
    print(run.dir)


def _evaluate(a: argparse.Namespace) -> None:
    from .uses import evaluate, evaluation_path

    _, s = evaluate(
        a.run, split=a.split, k=a.k, seed=a.seed, device=a.device, max_elements=a.max_elements, save=not a.no_save
    )
    bpd = "n/a" if s["bits_per_dim"] is None else f"{s['bits_per_dim']:.4f}"
    rows = [
        ("split", f"{s['split']} ({s['examples']} examples)"),
        ("negative ELBO", f"{s['neg_elbo']:.4f} nats"),
        (f"NLL (IS, k={s['k']})", f"{s['nll']:.4f} nats"),
        ("bits/dim", bpd),
        ("KL", f"{s['kl']:.4f} nats"),
        ("active units", f"{s['active_units']} of {len(s['kl_per_dim'])}"),
        ("time", f"{s['seconds']:.1f} s"),
    ]
    for name, value in rows:
        print(f"{name:<20} {value}")
    if "note" in s:
        print(f"note: {s['note']}")
    if not a.no_save:
        print(f"wrote {evaluation_path(a.run, a.split)}")


def _default(a: argparse.Namespace, name: str) -> Path | None:
    """-o if given; else no picture when only --npy was asked for; else RUN/name."""
    if a.out:
        return Path(a.out)
    return None if getattr(a, "npy", None) else Path(a.run) / name


def _wrote(*paths: Path | str | None) -> str:
    return "wrote " + " and ".join(str(p) for p in paths if p)


# How torch's allocators (CPU, CUDA, MPS) say that a requested size cannot be had.
_MEMORY_ERRORS = ("out of memory", "not enough memory", "can't allocate memory", "size calculation overflowed")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vaekit` command."""
    args = _build().parse_args(argv)
    try:
        from . import uses

        if args.command == "train":
            _train(args)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "sample":
            path = _default(args, "samples.png")
            uses.sample(args.run, args.n, seed=args.seed, out=path, npy=args.npy)
            print(_wrote(path, args.npy))
        elif args.command == "reconstruct":
            path = _default(args, "reconstructions.png")
            uses.reconstruct(args.run, args.n, split=args.split, out=path)
            print(f"wrote {path}")
        elif args.command == "encode":
            path = _default(args, "latents.npy")
            mean, _, _ = uses.encode(args.run, split=args.split, out=path)
            print(f"wrote {path} ({len(mean)} examples, {mean.shape[1]} latent dimensions)")
        elif args.command == "decode":
            path = _default(args, "decoded.png")
            images = uses.decode(args.run, args.latents, out=path, npy=args.npy)
            print(f"{_wrote(path, args.npy)} ({len(images)} decoded)")
        elif args.command == "plot":
            for path in uses.plot(args.run):
                print(path)
    except VaekitError as e:
        if args.debug:
            raise
        print(f"vaekit: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # Sizes a user asked for (huge images, layers or sample counts) can exhaust memory: their error, not a bug.
        if args.debug or not (isinstance(e, MemoryError) or any(m in str(e) for m in _MEMORY_ERRORS)):
            raise
        detail = str(e).splitlines()[0] if str(e) else "allocation failed"
        print(f"vaekit: error: out of memory ({detail.split(' (Triggered internally')[0]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from .training import Interrupted

        if isinstance(e, Interrupted):
            print(f"vaekit: {e}", file=sys.stderr)
            return e.exit_code
        print("vaekit: interrupted", file=sys.stderr)
        return 130
    return 0
