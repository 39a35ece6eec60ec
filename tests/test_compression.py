"""Lossless compression: round trips on digits, random arrays, image folders, splits and MNIST; rates against the
model's -ELBO; the file format's checks; models that cannot code."""

import errno
import gzip
import hashlib
import importlib.metadata
import json
import lzma
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICES, SHARED, Terminal, assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits

import vaekit
from vaekit.config import ModelConfig
from vaekit.likelihoods import Bernoulli
from vaekit.model import VAE
from vaekit.run import save_model
from vaekit.uses import codec, compression

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = load_digits().images.astype(np.uint8)  # 1797 images of 8x8, values 0 to 16


def _untrained(path: Path, shape: tuple[int, ...], likelihood: str, **settings) -> Path:
    """A run directory holding a freshly initialised model: enough for round trips, which hold for any weights."""
    model = VAE(shape, ModelConfig(hidden=[16], latent=3, likelihood=likelihood, **settings))
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Black-and-white digits (pixels >= 8) as a .npy of booleans, and a Bernoulli VAE trained on them."""
    folder = tmp_path_factory.mktemp("binary")
    np.save(folder / "digits.npy", DIGITS >= 8)
    run = vaekit.train("digits", folder / "run", data=str(folder / "digits.npy"), epochs=40, latent=8,
                       likelihood="bernoulli", verbose=False)  # fmt: skip
    return folder / "digits.npy", run.dir


@pytest.fixture(scope="module")
def grey(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Digits as 8-bit images (values 0 to 240) in a .npy of uint8, and a logistic-mixture VAE trained on them."""
    folder = tmp_path_factory.mktemp("grey")
    np.save(folder / "digits.npy", DIGITS * 15)
    run = vaekit.train("digits", folder / "run", data=str(folder / "digits.npy"), epochs=20, latent=8,
                       likelihood="logistic-mixture", verbose=False)  # fmt: skip
    return folder / "digits.npy", run.dir


def _same_file_contents(a: Path, b: Path) -> None:
    x, y = np.load(a), np.load(b)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_all_of_digits_round_trip_binary_and_8bit(binary, grey, tmp_path, capsys):
    """Every digit, black-and-white through a Bernoulli model and 8-bit through a logistic mixture, comes back bit for
    bit, at a rate near the model's -ELBO (which bits-back coding approaches) and below the input's 8 bits/pixel."""
    for name, (data, run) in {"binary": binary, "grey": grey}.items():
        code, out, err = run_cli(["compress", run, data, "-o", tmp_path / f"{name}.vkz", "--report", "-q"], capsys)
        assert code == 0, err
        code, _, err = run_cli(["decompress", tmp_path / f"{name}.vkz", "--run", run, "-o", tmp_path / f"{name}.npy"],
                               capsys)  # fmt: skip
        assert code == 0, err
        _same_file_contents(data, tmp_path / f"{name}.npy")
        rates = {line.rsplit(" ", 1)[0].strip(): float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                 if line[:1].isalpha() and line.rsplit(" ", 1)[-1].replace(".", "").isdigit()}  # fmt: skip
        # Besides the payload, the file holds a header (with the batch sizes) and a checksum.
        size = (tmp_path / f"{name}.vkz").stat().st_size
        _, words = compression.read_file(tmp_path / f"{name}.vkz")
        payload = 32 * len(words) / DIGITS.size
        assert math.isclose(rates["vaekit (this file)"], 8 * size / DIGITS.size, rel_tol=1e-3)
        assert payload < 1.02 * rates["model -ELBO"] + 300 / DIGITS.size, (name, rates)
        assert rates["vaekit (this file)"] < (1 if name == "binary" else 8)
        assert {"gzip -9", "bzip2 -9", "xz -9e (LZMA)", "PNG (optimised)"} <= set(rates)


def test_rate_follows_the_elbo_and_the_initial_bits_are_reported(binary, tmp_path):
    """The payload is within 1% of the model's -ELBO plus the initial bits, and starting the chain costs about one
    example's latents (at most precision bits per latent dimension, with room for a few wide posteriors)."""
    data, run = binary
    torch.manual_seed(1)
    r = vaekit.compress(run, data, tmp_path / "d.vkz", precision=12, report=True)
    assert r["examples"] == len(DIGITS) and r["dims"] == DIGITS.size
    torch.manual_seed(2)  # the -ELBO draws from its own seed: the same figure whatever the global random state
    levels = (DIGITS >= 8).astype(np.int64)[:, None]
    assert compression._neg_elbo(vaekit.open_run(run).model, levels, 2) == r["neg_elbo_bits_per_dim"]
    # xz at its strongest setting, credited with the smaller of one byte per pixel and eight pixels per byte.
    pixels = (DIGITS >= 8).astype(np.uint8)
    xz = min(len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)) for b in (pixels.tobytes(), np.packbits(pixels)))
    assert r["codecs"]["xz -9e (LZMA)"] == 8 * xz / DIGITS.size
    expected = r["neg_elbo_bits_per_dim"] + r["initial_bits"] / r["dims"]
    assert abs(r["payload_bits_per_dim"] - expected) < 0.01 * expected, r
    assert 0 < r["initial_bits"] <= 2 * 12 * 8 + 64
    assert r["compress_per_second"] == r["examples"] / r["compress_seconds"]
    assert r["decompress_per_second"] == r["examples"] / r["decompress_seconds"]
    # The header says which model the file needs: its weights' digest, likelihood, latent size and example shape.
    raw = (tmp_path / "d.vkz").read_bytes()
    model = json.loads(raw[14 : 14 + int.from_bytes(raw[10:14], "little")])["model"]
    opened = vaekit.open_run(run)
    assert set(model) == {"sha256", "likelihood", "latent", "shape"} and re.fullmatch("[0-9a-f]{64}", model["sha256"])
    # And what computed its probability tables, as the README lists it.
    environment = json.loads(raw[14 : 14 + int.from_bytes(raw[10:14], "little")])["environment"]
    assert environment == {"torch": torch.__version__, "constriction": importlib.metadata.version("constriction"),
                           "cpu": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    assert (model["likelihood"], model["latent"], model["shape"]) == (
        "bernoulli",
        opened.config.model.latent,
        [1, 8, 8],
    )
    # The run records the rates it measured, and its report shows them.
    recorded = json.loads((run / "compression.json").read_text())
    assert recorded["bits_per_dim"] == r["bits_per_dim"] and recorded["input"] == str(data)
    page = vaekit.report(run, tmp_path / "report.html").read_text()
    assert "compression (the last compress --report)" in page and '"codecs.gzip -9"' in page


@pytest.mark.parametrize("likelihood,levels,dtype", [("bernoulli", 2, np.bool_), ("bernoulli", 2, np.float32),
                                                     ("logistic-mixture", 256, np.uint8),
                                                     ("logistic-mixture", 256, np.int64),
                                                     ("logistic-mixture", 256, np.float64)])  # fmt: skip
def test_random_arrays_round_trip_in_their_dtype_and_shape(likelihood, levels, dtype, tmp_path):
    """Noise, the hardest case for a model, still comes back exactly, in the array's own dtype and layout (floats
    holding whole levels 0 to 255 included)."""
    run = _untrained(tmp_path / "run", (1, 5, 4), likelihood)
    values = np.random.default_rng(0).integers(0, levels, size=(257, 5, 4)).astype(dtype)
    np.save(tmp_path / "x.npy", values)
    vaekit.compress(run, tmp_path / "x.npy", tmp_path / "x.vkz", batch_size=10)
    back = vaekit.decompress(tmp_path / "x.vkz", run, tmp_path / "y.npy")
    assert back.dtype == values.dtype and back.shape == values.shape and np.array_equal(back, values)
    _same_file_contents(tmp_path / "x.npy", tmp_path / "y.npy")


def test_channels_last_and_scaled_floats_come_back_exactly(tmp_path):
    """Colour images stored channels-last, and 8-bit values stored as float32 k/255, keep their layout and bits."""
    run = _untrained(tmp_path / "run", (3, 4, 4), "logistic-mixture")
    levels = np.random.default_rng(1).integers(0, 256, size=(20, 4, 4, 3))
    for values in (levels.astype(np.uint8), levels.astype(np.float32) / np.float32(255)):
        vaekit.compress(run, values, tmp_path / "x.vkz")
        back = vaekit.decompress(tmp_path / "x.vkz", run)
        assert back.dtype == values.dtype and back.tobytes() == values.tobytes()


_MODELS: dict = {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    likelihood=st.sampled_from(["bernoulli", "logistic-mixture"]),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    count=st.integers(1, 40),
    batch=st.integers(1, 12),
    precision=st.integers(2, codec.MAX_PRECISION),
    seed=st.integers(0, 2**31),
)
def test_property_round_trip_over_images_batches_and_precisions(likelihood, height, width, count, batch, precision,
                                                                 seed):  # fmt: skip
    """Any small images, batch size and latent precision: decode(encode(x)) == x."""
    key = (likelihood, height, width)
    if key not in _MODELS:
        torch.manual_seed(seed)
        _MODELS[key] = VAE((1, height, width), ModelConfig(hidden=[8], latent=2, likelihood=likelihood))
    model = _MODELS[key]
    levels = model.likelihood.levels
    x = np.random.default_rng(seed).integers(0, levels, size=(count, 1, height, width))
    coded, _ = codec.encode(model, x, precision, batch)
    assert sum(coded.batches) == count and max(coded.batches) <= batch
    back, _ = codec.decode(model, coded)
    assert np.array_equal(back, x)


def test_decoding_does_not_depend_on_the_thread_count(grey, tmp_path):
    """Compressed with several threads, decompressed with one: the same data."""
    data, run = grey
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        vaekit.compress(run, data, tmp_path / "d.vkz")
        torch.set_num_threads(1)
        back = vaekit.decompress(tmp_path / "d.vkz", run)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(back, np.load(data))


def test_image_folder_round_trip_keeps_names_and_pixels(grey, tmp_path, capsys):
    """A folder with sub-folders comes back with the same file names (JPEG ones as PNG) and the same pixels."""
    _, run = grey
    source = tmp_path / "scans"
    names = []
    for i, image in enumerate(DIGITS[:30] * 15):
        name = f"{'ab'[i % 2]}/digit-{i:02d}.png"
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(source / name)
        names.append(name)
    code, _, err = run_cli(["compress", run, source, "-o", tmp_path / "scans.vkz", "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "new" / "folders" / "out"  # made with the folders above it
    code, _, err = run_cli(["decompress", tmp_path / "scans.vkz", "--run", run, "-o", out, "-q"], capsys)
    assert code == 0, err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(names)
    for name in names:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(source / name)))
    # Decompressing again into the now full folder is refused rather than mixing two outputs.
    code, _, err = run_cli(["decompress", tmp_path / "scans.vkz", "--run", run, "-o", out], capsys)
    assert_one_line_error(code, err)


def test_colour_images_round_trip_into_an_existing_empty_folder(tmp_path, capsys):
    """RGB PNGs come back with the same pixels in their channel order, written into a folder that exists but is
    empty (a file, or a folder with anything in it, is refused)."""
    rng = np.random.default_rng(0)
    source = tmp_path / "colour"
    source.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(source / f"{i}.png")
    run = vaekit.train("digits", tmp_path / "run", data=str(source), epochs=1, latent=2, hidden=[8], verbose=False,
                       likelihood="logistic-mixture", **{"data.image_size": 8})  # fmt: skip
    assert run_cli(["compress", run.dir, source, "-o", tmp_path / "c.vkz", "-q"], capsys)[0] == 0
    (tmp_path / "file").write_text("")
    for taken in (tmp_path / "file", source):
        code, _, err = run_cli(["decompress", tmp_path / "c.vkz", "--run", run.dir, "-o", taken, "-q"], capsys)
        assert_one_line_error(code, err)
        assert "is not an empty folder" in err
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(["decompress", tmp_path / "c.vkz", "--run", run.dir, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    for i in range(8):
        back = np.asarray(Image.open(tmp_path / "out" / f"{i}.png"))
        assert back.shape == (8, 8, 3) and np.array_equal(back, np.asarray(Image.open(source / f"{i}.png")))


def test_a_split_of_the_runs_data_round_trips(binary, tmp_path, capsys):
    """`vaekit compress RUN test` codes the run's own test split; it decompresses to that split as an array."""
    _, run = binary
    code, _, err = run_cli(["compress", run, "test", "-o", tmp_path / "t.vkz", "-q"], capsys)
    assert code == 0, err
    back = vaekit.decompress(tmp_path / "t.vkz", run)
    assert np.array_equal(back, vaekit.open_run(run).examples("test").x.numpy())


def _corrupted(path: Path, tmp_path: Path) -> dict[str, Path]:
    raw = path.read_bytes()
    header = json.loads(raw[14 : 14 + int.from_bytes(raw[10:14], "little")])
    middle = len(raw) - 32 - 4 * header["codec"]["words"] // 2
    versions = {
        "truncated": raw[: len(raw) // 2],
        "truncated in its header": raw[:20],
        "truncated by a byte": raw[:-1],
        "flipped payload byte": raw[:middle] + bytes([raw[middle] ^ 0x10]) + raw[middle + 1 :],
        "flipped header byte": raw[:40] + bytes([raw[40] ^ 0x01]) + raw[41:],
        "not a vkz file": b"PK\x03\x04" + raw[4:],
        "empty": b"",
    }
    for name, data in versions.items():
        (tmp_path / f"{name}.vkz").write_bytes(data)
    return {name: tmp_path / f"{name}.vkz" for name in versions}


def test_damaged_files_and_the_wrong_model_are_one_line_errors_with_no_output(binary, grey, tmp_path, capsys):
    """A truncated file, one flipped byte, something else entirely, or another run's model: one line, exit 2, and no
    output file."""
    data, run = binary
    assert run_cli(["compress", run, data, "-o", tmp_path / "good.vkz", "-q"], capsys)[0] == 0
    says = {"truncated in its header": "is truncated: 20 bytes, shorter than its", "not a vkz file": "is not a vaekit "
            "compressed file (.vkz)", "empty": "is not a vaekit compressed file (.vkz)"}  # fmt: skip
    checksum = "is corrupt or truncated: its checksum does not match its contents"
    cases = {name: ([path, "--run", run], says.get(name, checksum))
             for name, path in _corrupted(tmp_path / "good.vkz", tmp_path).items()}  # fmt: skip
    cases["another model"] = ([tmp_path / "good.vkz", "--run", grey[1]], "another model")
    for name, (argv, says) in cases.items():
        out = tmp_path / f"out-{name}.npy"
        code, _, err = run_cli(["decompress", *argv, "-o", out, "-q"], capsys)
        assert_one_line_error(code, err)
        assert says in err and not out.exists(), (name, err)


def test_models_and_data_that_cannot_be_coded_are_refused(binary, tmp_path, capsys):
    """A Gaussian likelihood, two stochastic layers, grey data for a binary model, another shape, NaN, a missing
    input: one line, exit 2, no file."""
    data, run = binary
    gaussian = _untrained(tmp_path / "gaussian", (1, 8, 8), "gaussian")
    two = tmp_path / "two"
    two.mkdir()
    save_model(VAE((1, 8, 8), ModelConfig(hidden=[16], latent=3, hidden2=[8], latent2=2)), two)
    np.save(tmp_path / "grey.npy", DIGITS)
    np.save(tmp_path / "grey-floats.npy", DIGITS / np.float32(16))
    np.save(tmp_path / "wide.npy", np.zeros((4, 9, 9), np.uint8))
    np.save(tmp_path / "nan.npy", np.full((4, 8, 8), np.nan, np.float32))
    cases = {
        "gaussian": (
            [gaussian, data],
            ": a gaussian likelihood is a density over continuous values and cannot code "
            "data losslessly: train with bernoulli (binary data) or logistic-mixture (8-bit data)\n",
        ),
        "two layers": ([two, data], "one stochastic layer"),
        "grey for binary": ([run, tmp_path / "grey.npy"], "0 or 1"),
        "grey floats for binary": ([run, tmp_path / "grey-floats.npy"], "other than 0 and 1"),
        "another shape": ([run, tmp_path / "wide.npy"], "(9, 9)"),
        "nan": ([run, tmp_path / "nan.npy"], "NaN"),
        "missing": ([run, tmp_path / "none.npy"], "not found"),
        "precision": ([run, data, "--precision", "30"], "precision"),
    }
    for name, (argv, says) in cases.items():
        code, _, err = run_cli(["compress", *argv, "-o", tmp_path / "x.vkz", "-q"], capsys)
        assert_one_line_error(code, err)
        assert says in err and not (tmp_path / "x.vkz").exists(), (name, err)


def _mnist_test_images() -> np.ndarray:
    path = SHARED / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"MNIST not found at {path}")
    with gzip.open(path) as f:
        return np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)


@pytest.mark.heavy
def test_mnist_test_set_round_trips(tmp_path):
    """The 10,000 MNIST test images, 8-bit, through a logistic-mixture model: bit for bit."""
    images = _mnist_test_images()
    run = _untrained(tmp_path / "run", (1, 28, 28), "logistic-mixture", mixtures=2)
    vaekit.compress(run, images, tmp_path / "m.vkz")
    assert np.array_equal(vaekit.decompress(tmp_path / "m.vkz", run), images)


@pytest.mark.heavy
def test_binarized_mnist_rate_is_within_one_percent_of_the_elbo(tmp_path):
    """Static binarised MNIST's test set, with a model trained for one epoch: the payload rate is within 1% of the
    model's -ELBO plus the initial bits."""
    folder = SHARED / "binarized_mnist"
    if not (folder / "binarized_mnist_test.amat.gz").exists():
        pytest.skip(f"binarized MNIST not found in {folder}")
    root = tmp_path / "data"
    shutil.copytree(folder, root / "binarized_mnist")
    run = vaekit.train("digits", tmp_path / "run", data="binarized-mnist", epochs=1, latent=20, hidden=[200],
                       likelihood="bernoulli", verbose=False, **{"data.root": str(root)})  # fmt: skip
    r = vaekit.compress(run, "test", tmp_path / "b.vkz", report=True)
    expected = r["neg_elbo_bits_per_dim"] + r["initial_bits"] / r["dims"]
    assert r["examples"] == 10_000 and abs(r["payload_bits_per_dim"] - expected) < 0.01 * expected, r
    assert r["bits_per_dim"] < min(r["codecs"].values())
    assert math.isclose(r["bits_per_dim"], 8 * (tmp_path / "b.vkz").stat().st_size / r["dims"])


def _resigned(good: Path, out: Path, change) -> Path:
    """A copy of a .vkz file whose header JSON text is changed by change(text) and whose checksum is made to match:
    what a crafted file looks like."""
    raw = good.read_bytes()
    length = int.from_bytes(raw[10:14], "little")
    text = change(raw[14 : 14 + length].decode())
    body = raw[:10] + len(text.encode()).to_bytes(4, "little") + text.encode() + raw[14 + length : -32]
    out.write_bytes(body + hashlib.sha256(body).digest())
    return out


def _edit(**changes):
    """A header change that sets fields of its parts: _edit(codec={"count": -1})."""

    def change(text: str) -> str:
        header = json.loads(text)
        for part, fields in changes.items():
            header[part].update(fields)
        return json.dumps(header)

    return change


def test_crafted_headers_are_one_line_errors_with_no_output(binary, grey, tmp_path, capsys):
    """A file with a valid checksum but a header that lies (counts, steps, shapes, types, file names that leave the
    folder, deep nesting, another machine's tables) is refused with one line, exit 2, and writes nothing."""
    data, run = binary
    assert run_cli(["compress", run, data, "-o", tmp_path / "good.vkz", "-q"], capsys)[0] == 0
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(DIGITS[:3] * 15):
        Image.fromarray(image).save(folder / f"{i}.png")
    assert run_cli(["compress", grey[1], folder, "-o", tmp_path / "folder.vkz", "-q"], capsys)[0] == 0
    count = len(DIGITS)
    cases = {
        "infinite count": (binary, _edit(codec={"count": float("inf")}), "count"),
        "fractional precision": (binary, _edit(codec={"precision": 16.5}), "precision must be an integer"),
        "negative step": (binary, _edit(codec={"count": -1, "batches": [-1]}), "coding step"),
        "steps that do not add up": (binary, _edit(codec={"batches": [1, 4, 0]}), "coding step"),
        "one huge step": (binary, _edit(codec={"count": 10**9, "batches": [10**9]}), "coding step"),
        "shape of another size": (binary, _edit(data={"shape": [count, 2, 2]}), "does not fit"),
        "shape as text": (binary, _edit(data={"shape": "abc"}), "not a shape"),
        "unknown dtype": (binary, _edit(data={"dtype": "foo"}), "not a NumPy type"),
        "text scale": (binary, _edit(data={"scale": "x"}), "cannot hold"),
        "another layout, same size": (binary, _edit(data={"shape": [count, 64]}), "does not decode"),
        "deep nesting": (binary, lambda t: t[:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}", "header"),
        "no model part": (binary, lambda t: json.dumps({"data": {}, "codec": {}}), "lacks"),
        "other machine": (binary, _edit(data={"sha256": "0" * 64}, environment={"torch": "0.0", "cpu": "NEON"}),
                          "same software"),
        "name outside": (grey, _edit(data={"names": ["../../escaped.png", "a.png", "/tmp/absolute.png"]}), "outside"),
        "names colliding": (grey, _edit(data={"names": ["a.jpg", "a.jpg.png", "b.png"]}), "both be written"),
        "too few names": (grey, _edit(data={"names": ["a.png"]}), "names 1 files"),
        "unprintable name": (grey, _edit(data={"names": ["a\a.png", "b.png", "c.png"]}),
                             ": the file name 'a\\x07.png' cannot be written back\n"),
        "no coding steps": (binary, _edit(codec={"batches": []}), ": the header has no coding steps\n"),
        "other levels": (binary, _edit(codec={"levels": 3}), ": the codec settings do not fit this model\n"),
        "no seed word skipped": (binary, _edit(codec={"seed_skipped": 0}), "does not decode to the original data"),
        "no data checksum": (binary, _edit(data={"sha256": None}), ": the header has no checksum of the data\n"),
        "names not a list": (grey, _edit(data={"names": 7}), ": the header names 0 files for 3 images\n"),
        "another coder": (binary, _edit(codec={"method": "rANS"}), ": the data were coded by 'rANS', which this vaekit "
                          "does not decode\n"),
    }  # fmt: skip
    for name, ((_, model_run), change, says) in cases.items():
        source = tmp_path / ("folder.vkz" if model_run == grey[1] else "good.vkz")
        crafted = _resigned(source, tmp_path / "crafted.vkz", change)
        out = tmp_path / "out" / "x"
        code, _, err = run_cli(["decompress", crafted, "--run", model_run, "-o", out, "-q"], capsys)
        assert_one_line_error(code, err)
        assert says in err, (name, err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.png").exists(), name
    # A header and its checksum with no coded words: whole, but its counts are those of a longer file.
    raw = (tmp_path / "good.vkz").read_bytes()
    body = raw[: 14 + int.from_bytes(raw[10:14], "little")]
    (tmp_path / "no words.vkz").write_bytes(body + hashlib.sha256(body).digest())
    code, _, err = run_cli(["decompress", tmp_path / "no words.vkz", "--run", run, "-o", tmp_path / "x.npy"], capsys)
    assert_one_line_error(code, err)
    assert err.endswith("has an invalid header: the header's counts do not match the file\n"), err


def test_folders_whose_names_would_collide_are_refused(grey, tmp_path, capsys):
    """c.jpg comes back as c.jpg.png, so a folder that also holds c.jpg.png cannot be written back: refused."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(DIGITS[0] * 15).save(folder / "c.jpg", quality=100)
    Image.fromarray(DIGITS[1] * 15).save(folder / "c.jpg.png")
    code, _, err = run_cli(["compress", grey[1], folder, "-o", tmp_path / "c.vkz"], capsys)
    assert_one_line_error(code, err)
    assert "c.jpg.png" in err and not (tmp_path / "c.vkz").exists()


def test_floats_in_the_unit_interval_are_8bit_levels_even_when_all_0_or_1(tmp_path):
    """Images scaled to [0, 1] that happen to hold only 0.0 and 1.0 are levels 0 and 255 for an 8-bit model."""
    run = _untrained(tmp_path / "run", (1, 4, 4), "logistic-mixture")
    values = np.random.default_rng(2).integers(0, 2, size=(30, 4, 4)).astype(np.float32)
    vaekit.compress(run, values, tmp_path / "x.vkz")
    header, _ = compression.read_file(tmp_path / "x.vkz")
    assert header["data"]["scale"] == 255
    assert vaekit.decompress(tmp_path / "x.vkz", run).tobytes() == values.tobytes()


@pytest.mark.parametrize("name", ["compression", "compression-8bit"])
def test_compression_presets_build_models_that_code(name):
    """The compression presets resolve, build on MNIST's shape and can code data (a discrete likelihood, one layer)."""
    cfg = vaekit.make_config(name)
    model = VAE((1, 28, 28), cfg.model)
    levels = codec.check_model(model).levels
    assert levels == (2 if cfg.model.likelihood == "bernoulli" else 256)
    x = np.random.default_rng(0).integers(0, levels, size=(3, 1, 28, 28))
    coded, _ = codec.encode(model, x)
    assert np.array_equal(codec.decode(model, coded)[0], x)


@pytest.mark.parametrize("latent", [1, 8, 64, 1000, 10_000, 100_000])
@pytest.mark.parametrize("precision", [2, 16, codec.MAX_PRECISION])
def test_the_seed_holds_the_first_examples_latents_twice_over(latent, precision):
    """The seed the stack starts on is a whole number of words with room for two draws of a latent code at the coding
    precision."""
    assert isinstance(codec.seed_size(latent, precision), int)
    assert codec.seed_size(latent, precision) * 32 >= 2 * latent * precision
    assert codec.seed_size(latent, precision) >= codec.SEED_WORDS


def _coded_digits(n: int) -> tuple[VAE, np.ndarray, codec.Coded]:
    """A small untrained Bernoulli model, n binary digits as levels, and their code."""
    torch.manual_seed(0)
    model = VAE((1, 8, 8), ModelConfig(hidden=[16], latent=2))
    levels = (DIGITS[:n, None] >= 8).astype(np.int64)
    return model, levels, codec.encode(model, levels)[0]


def test_a_message_cut_short_is_a_corrupt_file_not_other_examples():
    """Decoding words with the end cut off does not give examples: it says the file is corrupt."""
    model, levels, coded = _coded_digits(20)
    assert np.array_equal(codec.decode(model, coded)[0], levels)
    coded.words = coded.words[: len(coded.words) // 2]
    corrupt = "^the compressed data do not decode to a complete message: the file is corrupt$"
    with pytest.raises(vaekit.VaekitError, match=corrupt):
        codec.decode(model, coded)


@pytest.mark.parametrize("progress", [False, True])
def test_progress_bars_show_on_a_terminal_only_when_asked(progress, monkeypatch):
    """Coding, decoding and the likelihood estimate draw a bar on a terminal with progress, and nothing without."""
    model, levels, coded = _coded_digits(5)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    codec.encode(model, levels)  # by default, no bar
    codec.decode(model, coded)
    assert terminal.text == ""
    codec.encode(model, levels, progress=progress)
    codec.decode(model, coded, progress=progress)
    for name in ("compress", "decompress"):  # each bar names its work and counts towards the number of images
        assert bool(re.search(f"(^|\r){name}: .*\\| 0/5 \\[00:00<\\?, \\?img/s\\]", terminal.text)) == progress
    vaekit.log_likelihood(model, torch.from_numpy(levels).float(), k=10, progress=progress)
    assert ("compress" in terminal.text and "decompress" in terminal.text and "evaluate" in terminal.text) == progress
    assert (terminal.text == "") != progress
    assert "\n" not in terminal.text  # each bar clears its line when done


def test_negative_zeros_cannot_be_restored_and_are_refused(binary, tmp_path, capsys):
    """-0.0 is not 0.0 bit for bit: floats with a sign bit set are refused, not silently made positive."""
    _, run = binary
    x = (DIGITS[:10] >= 8).astype(np.float32)
    x[0, 0, 0] = -0.0
    np.save(tmp_path / "signed.npy", x)
    code, _, err = run_cli(["compress", run, tmp_path / "signed.npy", "-o", tmp_path / "s.vkz"], capsys)
    assert_one_line_error(code, err)
    assert "bit for bit" in err and not (tmp_path / "s.vkz").exists()


def test_a_two_layer_model_is_refused_by_the_codec_saying_why():
    """Bits-back coding here codes one latent layer; a model with two is refused, naming the reason."""
    model = VAE((1, 8, 8), ModelConfig(hidden=[16], latent=4, hidden2=[8], latent2=2))
    with pytest.raises(
        vaekit.VaekitError, match="^bits-back coding supports one stochastic layer; this model has two$"
    ):
        codec.check_model(model)


def test_a_coding_step_holds_as_many_examples_as_the_table_memory_allows(monkeypatch):
    """Each step codes as many examples as fit in the memory for distribution-function values: the data tables of a
    step hold at most TABLE_ELEMENTS values, and one example more would not fit."""
    sizes = []
    cdf = Bernoulli.cdf

    def measured(self, logits, boundaries):
        values = cdf(self, logits, boundaries)
        sizes.append(values.numel())
        return values

    monkeypatch.setattr(Bernoulli, "cdf", measured)
    monkeypatch.setattr(codec, "TABLE_ELEMENTS", 1000)
    model, levels, coded = _coded_digits(12)
    per_example = sizes[0] // coded.batches[0]
    assert len(coded.batches) > 1 and sum(coded.batches) == 12
    assert max(sizes) <= 1000 < max(sizes) + per_example


def test_no_examples_code_to_an_empty_message():
    """Coding no examples stores no words and decodes to no examples of the model's shape."""
    model, levels, _ = _coded_digits(1)
    coded, _ = codec.encode(model, levels[:0])
    assert coded.count == 0 and len(coded.words) == 0 and coded.batches == []
    assert codec.decode(model, coded)[0].shape == (0, 1, 8, 8)


def test_a_name_the_file_system_refuses_is_one_error_naming_why(tmp_path):
    """Writing images under a name longer than the file system allows names the folder and the system's reason, and
    leaves neither the folder nor its temporary twin behind."""
    longest = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else -1
    if longest <= 0:
        pytest.skip("this file system states no longest file name")
    with pytest.raises(vaekit.VaekitError) as refused:
        compression._write_folder(tmp_path / "out", np.zeros((1, 1, 8, 8), np.uint8), ["a" * longest + ".png"])
    assert str(refused.value) == f"cannot write {tmp_path / 'out'}: {os.strerror(errno.ENAMETOOLONG)}"
    assert list(tmp_path.iterdir()) == []


def test_the_stack_starts_on_the_words_of_a_fixed_hash():
    """The seed words are part of the file format: the SHAKE-256 of b"vaekit bits-back seed", little-endian, with
    zeros made ones, so that every version and machine decodes what another wrote."""
    digest = np.frombuffer(hashlib.shake_256(b"vaekit bits-back seed").digest(4 * 1000), dtype="<u4")
    assert np.array_equal(codec.seed_words(1000), np.maximum(digest, 1)) and codec.seed_words(1000).dtype == np.uint32


def test_levels_in_any_numeric_dtype_code_to_the_same_words():
    """Levels held as uint8 or as whole-number floats code exactly as the same levels in int64 do."""
    model, levels, coded = _coded_digits(20)
    for same in (levels.astype(np.uint8), levels.astype(np.float64), np.asfortranarray(levels.astype(np.float32))):
        assert np.array_equal(codec.encode(model, same)[0].words, coded.words)


def test_a_seed_too_short_for_the_first_latents_is_one_clear_error(monkeypatch):
    """A stack that runs out of seed while drawing latents is refused with the reason and what to change."""
    model, levels, _ = _coded_digits(3)
    monkeypatch.setattr(codec, "seed_size", lambda latent, precision: 1)
    with pytest.raises(vaekit.VaekitError, match=r"^the seed of the bits-back chain ran out \(posteriors wider than "
                       r"the prior\): lower --precision$"):  # fmt: skip
        codec.encode(model, levels)


def test_a_coding_step_may_hold_one_example_and_no_fewer(tmp_path):
    """batch_size = 1 codes an example per step and comes back exactly; 0 is refused in one line."""
    run = _untrained(tmp_path / "run", (1, 5, 4), "bernoulli")
    values = np.random.default_rng(1).integers(0, 2, size=(3, 5, 4)).astype(np.uint8)
    vaekit.compress(run, values, tmp_path / "x.vkz", batch_size=1)
    raw = (tmp_path / "x.vkz").read_bytes()
    assert json.loads(raw[14 : 14 + int.from_bytes(raw[10:14], "little")])["codec"]["batches"] == [1, 1, 1]
    assert np.array_equal(vaekit.decompress(tmp_path / "x.vkz", run, tmp_path / "y.npy"), values)
    with pytest.raises(vaekit.VaekitError, match="^the batch size must be at least 1, got 0$"):
        vaekit.compress(run, values, tmp_path / "z.vkz", batch_size=0)


def test_symbols_are_coded_with_constrictions_current_categorical_model():
    """A symbol of two stages is coded as its fine part, then its coarse part, each with constriction's recommended
    categorical model (perfect=False) over the masses of the distribution function, not its legacy one."""
    import constriction

    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.full(4, 0.3), size=50)  # skewed distributions over 4 symbols, one per value
    table = torch.from_numpy(np.concatenate([np.zeros((50, 1)), p.cumsum(1)], 1))
    symbols = np.array([rng.choice(4, p=row) for row in p])
    ans = constriction.stream.stack.AnsCoder()
    codec.Stages(2).push(ans, lambda b: torch.gather(table, 1, b.expand(50, -1)), symbols)
    coarse, fine = symbols >> 1, symbols & 1
    c = table.numpy()
    coarse_masses = np.ascontiguousarray(c[:, [2, 4]] - c[:, [0, 2]])
    fine_masses = np.ascontiguousarray(np.stack([c[np.arange(50), 2 * coarse + i + 1] - c[np.arange(50), 2 * coarse + i]
                                                 for i in (0, 1)], 1))  # fmt: skip
    words = {}
    for perfect in (False, True):
        ref = constriction.stream.stack.AnsCoder()
        model = constriction.stream.model.Categorical(perfect=perfect)
        ref.encode_reverse(fine.astype(np.int32), model, fine_masses)
        ref.encode_reverse(coarse.astype(np.int32), model, coarse_masses)
        words[perfect] = ref.get_compressed()
    assert np.array_equal(ans.get_compressed(), words[False]) and not np.array_equal(words[False], words[True])


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_on_any_device_codes_on_the_cpu_in_float64(device):
    """The coder copies the model to the CPU in float64 wherever it lives: the words are those of the CPU model."""
    model, levels, coded = _coded_digits(10)
    assert np.array_equal(codec.encode(model.to(device), levels)[0].words, coded.words)


def test_image_folders_need_a_square_image_model_with_their_size(tmp_path, capsys):
    """An image folder is coded only by a model of square images of its size: a model of other examples, of
    non-square images or of another size is refused in one line; black-and-white images suit a binary model."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(DIGITS[:4]):
        Image.fromarray(np.where(image >= 8, 255, 0).astype(np.uint8)).save(folder / f"{i}.png")
    binary = _untrained(tmp_path / "binary", (1, 8, 8), "bernoulli")
    assert run_cli(["compress", binary, folder, "-o", tmp_path / "bw.vkz", "-q"], capsys)[0] == 0
    assert run_cli(["decompress", tmp_path / "bw.vkz", "--run", binary, "-o", tmp_path / "back", "-q"], capsys)[0] == 0
    for i in range(4):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "back" / f"{i}.png")), np.asarray(Image.open(folder / f"{i}.png"))
        )
    for shape in [(64,), (1, 8, 6), (2, 8, 8), (1, 9, 9)]:
        run = _untrained(tmp_path / "-".join(map(str, shape)), shape, "bernoulli")
        code, _, err = run_cli(["compress", run, folder, "-o", tmp_path / "x.vkz", "-q"], capsys)
        assert_one_line_error(code, err)
        says = (f"{folder / '0.png'} is a 8x8 L image; this takes 9x9 grey 8-bit images as they are, with no resizing "
                "or conversion" if shape[-1] == 9 else f"{folder} is an image folder, but the model takes examples of "
                f"shape {shape}")  # fmt: skip
        assert err == f"vaekit: error: {says}\n" and not (tmp_path / "x.vkz").exists()


def test_rows_code_with_a_model_of_rows_and_the_standard_codecs_are_in_bits_per_value(tmp_path):
    """A table of binary rows (N, D) round-trips through a model of rows; the rates the report sets beside it are bits
    per value, which for 8-bit images lie between 0 and 8."""
    run = _untrained(tmp_path / "run", (20,), "bernoulli")
    rows = np.random.default_rng(3).integers(0, 2, size=(30, 20)).astype(np.uint8)
    vaekit.compress(run, rows, tmp_path / "rows.vkz")
    assert np.array_equal(vaekit.decompress(tmp_path / "rows.vkz", run, tmp_path / "rows.npy"), rows)
    grey = _untrained(tmp_path / "grey", (1, 8, 8), "logistic-mixture")
    codecs = vaekit.compress(grey, DIGITS[:200] * 15, tmp_path / "grey.vkz", report=True)["codecs"]
    assert set(codecs) == {"gzip -9", "bzip2 -9", "xz -9e (LZMA)", "PNG (optimised)"}
    assert all(0.5 < rate < 8 for rate in codecs.values()), codecs


def _small_file(tmp_path: Path) -> tuple[Path, Path]:
    """An untrained Bernoulli run of 8x8 images and a .vkz file of 20 black-and-white digits it compressed."""
    run = _untrained(tmp_path / "run", (1, 8, 8), "bernoulli")
    vaekit.compress(run, DIGITS[:20] >= 8, tmp_path / "small.vkz")
    return run, tmp_path / "small.vkz"


def _refusal(run: Path, crafted: Path, out: Path) -> str:
    """The error that decoding crafted with run gives; nothing is written to out."""
    with pytest.raises(vaekit.VaekitError) as refused:
        vaekit.decompress(crafted, run, out)
    assert not out.exists()
    return str(refused.value)


def test_a_bad_seed_skipped_field_is_refused_naming_the_seed(tmp_path):
    """A header whose seed_skipped is below 0 is refused with a message naming the seed and its allowed range."""
    run, good = _small_file(tmp_path)
    seed = compression.read_file(good)[0]["codec"]["seed_words"]
    crafted = _resigned(good, tmp_path / "crafted.vkz", _edit(codec={"seed_skipped": -1}))
    assert _refusal(run, crafted, tmp_path / "out.npy") == (
        f"{crafted} has an invalid header: the seed must be an integer from 0 to {seed}, got -1"
    )


def test_seed_sizes_of_zero_and_one_word_are_refused_each_with_its_reason(tmp_path):
    """A seed of 0 words is not a seed size (1 or more); a seed of 1 word is one, but not this model's."""
    run, good = _small_file(tmp_path)
    says = {0: "the seed size must be an integer from 1 to 1073741824, got 0",
            1: "the codec settings do not fit this model"}  # fmt: skip
    for words, reason in says.items():
        crafted = _resigned(good, tmp_path / "crafted.vkz", _edit(codec={"seed_words": words}))
        with pytest.raises(vaekit.VaekitError) as refused:
            vaekit.decompress(crafted, run)
        assert str(refused.value) == f"{crafted} has an invalid header: {reason}", words


def test_a_npy_file_of_values_the_model_cannot_code_is_named_in_the_error(tmp_path):
    """Grey values in a .npy file given to a binary model are refused with a message that names the file."""
    run = _untrained(tmp_path / "run", (1, 8, 8), "bernoulli")
    path = tmp_path / "grey.npy"
    np.save(path, (np.arange(4 * 64) % 3).reshape(4, 8, 8).astype(np.uint8))  # 0, 1 and 2
    with pytest.raises(vaekit.VaekitError) as refused:
        vaekit.compress(run, path, tmp_path / "x.vkz")
    assert str(refused.value) == f"{path} holds values from 0 to 2; this model codes 0 or 1 (a binary model)"
    assert not (tmp_path / "x.vkz").exists()


def test_a_file_that_fails_its_data_checksum_on_the_same_machine_says_it_is_corrupt(tmp_path):
    """Made here but decoding to data with another checksum, a file is reported as corrupt in so many words."""
    run, good = _small_file(tmp_path)
    crafted = _resigned(good, tmp_path / "crafted.vkz", _edit(data={"sha256": "0" * 64}))
    assert _refusal(run, crafted, tmp_path / "out.npy") == (
        f"{crafted} does not decode to the original data (the file is corrupt); nothing was written"
    )


def test_a_folder_file_naming_a_path_up_out_of_the_folder_writes_nothing(tmp_path):
    """A folder's file whose names include ../ parts, with a data checksum that matches those names, is refused as
    leading outside the folder, and no image is written anywhere."""
    run = _untrained(tmp_path / "run", (1, 8, 8), "logistic-mixture")
    source = tmp_path / "pngs"
    source.mkdir()
    for i, image in enumerate(DIGITS[:3] * 15):
        Image.fromarray(image).save(source / f"{i}.png")
    vaekit.compress(run, source, tmp_path / "folder.vkz")
    pixels = (DIGITS[:3, None] * 15).astype(np.uint8)
    for name in ("a/../../../escaped.png", "../escaped.png"):
        names = [name, "1.png", "2.png"]
        # The checksum the README describes: the dtype and shape, the values, and the names joined by NULs.
        digest = hashlib.sha256(b"|u1(3, 1, 8, 8)" + pixels.tobytes() + "\0".join(names).encode()).hexdigest()
        crafted = _resigned(tmp_path / "folder.vkz", tmp_path / "crafted.vkz",
                            _edit(data={"names": names, "sha256": digest}))  # fmt: skip
        out = tmp_path / "out" / "x"
        with pytest.raises(vaekit.VaekitError) as refused:
            vaekit.decompress(crafted, run, out)
        assert str(refused.value) == (
            f"{crafted} has an invalid header: the file name {name!r} leads outside the folder"
        )
        assert not list(tmp_path.rglob("escaped.png")) and not out.exists(), name


def test_compress_reports_the_size_of_the_file_it_wrote(tmp_path):
    """The bytes compress returns are the size of the .vkz file on disk, and its bits per dimension follow from it."""
    run = _untrained(tmp_path / "run", (1, 8, 8), "bernoulli")
    r = vaekit.compress(run, DIGITS[:20] >= 8, tmp_path / "x.vkz")
    size = (tmp_path / "x.vkz").stat().st_size
    assert r["bytes"] == size and r["bits_per_dim"] == 8 * size / (20 * 64)


def test_a_model_with_tables_over_half_the_memory_bound_codes_one_example_per_step():
    """A model whose one example's tables take more than half of TABLE_ELEMENTS codes one example per step (not
    none, and not two); a slightly smaller one fits two."""
    big = VAE((5_600_000,), ModelConfig(hidden=[1], latent=1, likelihood="bernoulli"))  # 3 boundaries per value
    assert 2 * 3 * 5_500_000 <= codec.TABLE_ELEMENTS < 2 * 3 * 5_600_000
    assert codec.step_limit(big) == 1 and codec.step_limit(big, 9) == 1
    smaller = VAE((5_500_000,), ModelConfig(hidden=[1], latent=1, likelihood="bernoulli"))
    assert codec.step_limit(smaller) == 2


def test_the_first_coding_step_codes_a_single_example():
    """The seed lends the first step only one example's latents: the first step codes one example, and the steps
    grow only after it."""
    model, levels, coded = _coded_digits(20)
    assert coded.batches[0] == 1 and len(coded.batches) > 1 and sum(coded.batches) == 20
    assert np.array_equal(codec.decode(model, coded)[0], levels)


def test_a_seed_leaving_exactly_64_valid_bits_after_the_first_latents_is_enough(monkeypatch):
    """A seed of 3 words leaves exactly 64 valid bits once a digit's latents are drawn at precision 15: coding goes
    on and the message decodes; at precision 16 (fewer than 64 bits left) it is refused."""
    import constriction

    model, levels, _ = _coded_digits(1)
    levels = (DIGITS[1:4, None] >= 8).astype(np.int64)
    monkeypatch.setattr(codec, "seed_size", lambda latent, precision: 3)
    left = {}
    for precision in (15, 16):
        coder = codec._Coder(model, precision)
        ans = constriction.stream.stack.AnsCoder(codec.seed_words(3))
        coder.buckets.pop(ans, coder.posterior(levels[:1]), (1, 2))
        left[precision] = ans.num_valid_bits()
    assert left[15] == 64 and left[16] < 64, left
    coded, _ = codec.encode(model, levels, precision=15)
    assert np.array_equal(codec.decode(model, coded)[0], levels)
    with pytest.raises(vaekit.VaekitError, match="the seed of the bits-back chain ran out"):
        codec.encode(model, levels, precision=16)


def test_the_highest_latent_precision_codes_and_one_more_is_refused():
    """Latents at MAX_PRECISION bits round-trip; one bit more is refused with the allowed range."""
    model, levels, _ = _coded_digits(1)
    levels = levels.repeat(3, 0)
    coded, _ = codec.encode(model, levels, precision=codec.MAX_PRECISION)
    assert coded.precision == codec.MAX_PRECISION
    assert np.array_equal(codec.decode(model, coded)[0], levels)
    with pytest.raises(vaekit.VaekitError, match=f"^the latent precision must be 2 to {codec.MAX_PRECISION} bits, "
                       f"got {codec.MAX_PRECISION + 1}$"):  # fmt: skip
        codec.encode(model, levels, precision=codec.MAX_PRECISION + 1)
