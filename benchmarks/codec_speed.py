"""Images per second of bits-back compression and decompression, and the share of the time spent in the network.

For each case (static binarised MNIST through a Bernoulli model, 8-bit MNIST through a logistic mixture) the script
compresses the 10,000 test images with `vaekit.uses.codec.encode`, decompresses them with `decode`, checks the round
trip, and prints images/s both ways, the fraction of each spent in the network (the rest is the probability tables and
constriction's coder) and the rate in bits/dim. With --run-binary / --run-8bit it uses trained runs (the rates are then
meaningful); without, models of the `compression` and `compression-8bit` presets with their initial weights (the work
done does not depend on the weights, apart from the first few batch sizes).

    python benchmarks/codec_speed.py [--data ../shared/data] [--images 10000] [--run-binary RUN] [--run-8bit RUN]
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch

from vaekit.config import preset
from vaekit.model import VAE
from vaekit.run import open_run
from vaekit.uses import codec

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def images(data: Path, binary: bool, n: int) -> np.ndarray:
    """The first n test images: static binarised MNIST (0/1) or MNIST (0 to 255), as (n, 1, 28, 28) integers."""
    if binary:
        with gzip.open(data / "binarized_mnist" / "binarized_mnist_test.amat.gz") as f:
            x = np.loadtxt(f, dtype=np.int64)
    else:
        with gzip.open(data / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read()[16:], dtype=np.uint8).astype(np.int64)
    return x.reshape(-1, 1, 28, 28)[:n]


def model(run: str | None, name: str) -> VAE:
    """A trained run's model, or the preset's architecture with its initial weights."""
    if run:
        return open_run(run).model
    torch.manual_seed(0)
    return VAE((1, 28, 28), preset(name).model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--run-binary")
    p.add_argument("--run-8bit")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.images} images per case\n")
    print(f"{'case':<34} {'compress/s':>10} {'network':>8} {'decompress/s':>12} {'network':>8} {'bits/dim':>9}")
    total = 0.0
    for label, binary, run, name in (
        ("binarised MNIST, Bernoulli", True, a.run_binary, "compression"),
        ("8-bit MNIST, logistic mixture", False, a.run_8bit, "compression-8bit"),
    ):
        x, m = images(a.data, binary, a.images), model(run, name)
        start = time.perf_counter()
        coded, net_in = codec.encode(m, x, progress=True)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        back, net_out = codec.decode(m, coded, progress=True)
        decode_s = time.perf_counter() - start
        assert np.array_equal(back, x), "round trip failed"
        total += encode_s + decode_s
        rate = 32 * len(coded.words) / x.size
        print(f"{label:<34} {len(x) / encode_s:>10.0f} {net_in / encode_s:>8.0%} {len(x) / decode_s:>12.0f} "
              f"{net_out / decode_s:>8.0%} {rate:>9.4f}   ({encode_s + decode_s:.1f} s both ways)")  # fmt: skip
    print(f"\nall cases, both ways: {total:.1f} s")


if __name__ == "__main__":
    main()
