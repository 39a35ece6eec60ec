"""The compression commands: compress data losslessly with a run's model, and decompress it."""

from __future__ import annotations

import argparse

from . import RUN_DATA_DIR, arg, command

QUIET = arg("-q", "--quiet", action="store_true", help="no progress bar")


@command(
    ("vaekit compress runs/bmnist test -o test.vkz --report",
     "vaekit compress runs/mnist8 digits.npy -o digits.vkz",
     "vaekit compress runs/mnist8 scans/ -o scans.vkz"),
    arg("input", metavar="INPUT", help="a .npy array, an image folder, or the run's train, valid or test split"),
    arg("-o", "--out", metavar="FILE.vkz", required=True, help="the compressed file to write"),
    arg("--precision", type=int, default=12, help="bits per latent dimension: its buckets of equal prior mass"),
    arg("--batch-size", type=int, default=1000, help="the most examples coded in one step"),
    arg("--report", action="store_true",
        help="also decode to check and time it, and compare the rate with the model's -ELBO and gzip, bzip2, xz, PNG"),
    QUIET,
    RUN_DATA_DIR,
)  # fmt: skip
def _compress(a: argparse.Namespace) -> None:
    """Compress data losslessly with the run's model (bits-back coding with ANS).

    The model must have a discrete likelihood: bernoulli for binary data (0/1), logistic-mixture for 8-bit data
    (0 to 255). 'vaekit decompress' with the same run gives the data back bit for bit.
    """
    from ..uses.compression import compress

    r = compress(a.run, a.input, a.out, precision=a.precision, batch_size=a.batch_size, report=a.report,
                 progress=not a.quiet)  # fmt: skip
    print(f"wrote {a.out}: {r['examples']} examples, {r['bytes']} bytes, {r['bits_per_dim']:.4f} bits/dim "
          f"(start of the chain: {r['initial_bits']} bits); {r['compress_per_second']:.0f} examples/s")  # fmt: skip
    if a.report:
        rows = [("vaekit (this file)", r["bits_per_dim"]), ("model -ELBO", r["neg_elbo_bits_per_dim"]),
                *r["codecs"].items()]  # fmt: skip
        print(f"\n{'codec':<22} bits/dim")
        for name, rate in rows:
            print(f"{name:<22} {rate:.4f}")
        print(f"\ndecompressed and checked: {r['decompress_per_second']:.0f} examples/s; the network took "
              f"{100 * r['network_share']:.0f}% of compression time, the coder the rest")  # fmt: skip


@command(
    ("vaekit decompress test.vkz --run runs/bmnist -o test.npy",
     "vaekit decompress scans.vkz --run runs/mnist8 -o scans/"),
    arg("file", metavar="FILE.vkz", help="a file written by 'vaekit compress'"),
    arg("--run", required=True, metavar="RUN", help="the run whose model compressed it"),
    arg("-o", "--out", metavar="OUTPUT", required=True,
        help="a .npy file, or for a compressed image folder a new folder (PNG files under the original names)"),
    QUIET,
    takes_run=False,
)  # fmt: skip
def _decompress(a: argparse.Namespace) -> None:
    """Decompress a .vkz file with the run that compressed it, checking the result against the original's checksum.

    A truncated or damaged file, or another run's model, is refused and nothing is written.
    """
    from ..uses.compression import decompress

    values = decompress(a.file, a.run, a.out, progress=not a.quiet)
    print(f"wrote {a.out}: {len(values)} examples, checked against the original's checksum")
