"""Tests of vaekit.load_data on every kind of source, built from files written here with known contents."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit
from vaekit import DataConfig, VaekitError, load_data
from vaekit.data import Split, _split

N_DIGITS = 1797  # the size of scikit-learn's bundled digits data set


# ---------------------------------------------------------------- torchvision IDX files


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


def _write_mnist_like(root: Path, folder: str, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write torchvision's four uncompressed IDX files under root/folder/raw and return what was written."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    written = {}
    for split, prefix, n in (("train", "train", 20), ("test", "t10k", 7)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[split] = (images, labels)
    return written


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")], ids=["mnist", "fashion-mnist"]
)
def test_torchvision_idx_files_load_with_their_pixels_and_labels(tmp_path, name, folder):
    """IDX files in torchvision's folder layout load as (N, 1, 28, 28) floats equal to bytes / 255, with labels."""
    written = _write_mnist_like(tmp_path, folder, seed=len(folder))
    data = load_data(DataConfig(name=name, root=str(tmp_path), download=False))
    assert set(data.splits) == {"train", "test"}
    assert data.shape == (1, 28, 28)
    for split, n in (("train", 20), ("test", 7)):
        images, labels = written[split]
        s = data.split(split)
        assert s.x.shape == (n, 1, 28, 28)
        assert s.x.dtype == torch.float32
        np.testing.assert_allclose(s.x.numpy()[:, 0], images.astype(np.float64) / 255, rtol=0, atol=1e-7)
        assert s.y is not None
        assert s.y.tolist() == labels.tolist()


def test_fashion_mnist_does_not_read_the_mnist_folder(tmp_path):
    """fashion-mnist looks in FashionMNIST/raw only, so files in MNIST/raw do not satisfy it."""
    _write_mnist_like(tmp_path, "MNIST", seed=1)
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False))
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)


def test_mnist_in_empty_root_without_download_names_the_raw_folder(tmp_path):
    """An empty root with download off raises a VaekitError that names the raw folder to fill."""
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)
    assert "\n" not in str(err.value)
    # Why, in words, and the last line of torchvision's own message.
    assert "download is switched off (Dataset not found" in str(err.value)


# ---------------------------------------------------------------- binarized MNIST .amat files


def _amat_text(bits: np.ndarray) -> str:
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in bits.reshape(len(bits), -1))


def test_binarized_mnist_reads_plain_and_gzipped_amat_files(tmp_path):
    """Plain and gzipped .amat files load as (N, 1, 28, 28) splits holding exactly the 0/1 values written."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    written = {}
    for split, n in (("train", 5), ("valid", 3), ("test", 4)):
        bits = rng.integers(0, 2, size=(n, 784))
        written[split] = bits
        text = _amat_text(bits).encode()
        if split == "test":
            (folder / f"binarized_mnist_{split}.amat.gz").write_bytes(gzip.compress(text))
        else:
            (folder / f"binarized_mnist_{split}.amat").write_bytes(text)
    data = load_data(DataConfig(name="binarized-mnist", root=str(tmp_path), download=False))
    assert set(data.splits) == {"train", "valid", "test"}
    for split, bits in written.items():
        x = data.split(split).x
        assert x.shape == (len(bits), 1, 28, 28)
        np.testing.assert_array_equal(x.numpy().reshape(len(bits), 784), bits.astype(np.float32))
    with pytest.raises(VaekitError, match="^data 'binarized-mnist' has its own validation split; leave data.validation "
                       "at 0$"):  # fmt: skip
        load_data(DataConfig(name="binarized-mnist", root=str(tmp_path), download=False, validation=2))


def test_binarized_mnist_rejects_a_line_of_783_values(tmp_path):
    """An .amat file with a line one value short raises VaekitError naming that file."""
    rng = np.random.default_rng(4)
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"binarized_mnist_{split}.amat").write_text(_amat_text(rng.integers(0, 2, size=(3, 784))))
    bad = folder / "binarized_mnist_valid.amat"
    lines = bad.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:783])
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name="binarized-mnist", root=str(tmp_path), download=False))
    assert str(bad) in str(err.value)


def test_binarized_mnist_accepts_a_last_line_without_newline(tmp_path):
    """An .amat file whose last line lacks a trailing newline still loads all of its lines."""
    rng = np.random.default_rng(9)
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    written = {}
    for split in ("train", "valid", "test"):
        written[split] = rng.integers(0, 2, size=(3, 784))
        (folder / f"binarized_mnist_{split}.amat").write_text(_amat_text(written[split]).rstrip("\n"))
    data = load_data(DataConfig(name="binarized-mnist", root=str(tmp_path), download=False))
    for split, bits in written.items():
        np.testing.assert_array_equal(data.split(split).x.numpy().reshape(3, 784), bits.astype(np.float32))


def test_binarized_mnist_missing_files_without_download(tmp_path):
    """Missing .amat files with download off raise VaekitError naming the folder to fill."""
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name="binarized-mnist", root=str(tmp_path), download=False))
    folder = tmp_path / "binarized_mnist"
    assert str(err.value) == (
        f"binarized_mnist_train.amat (or binarized_mnist_train.amat.gz) not found in {folder}; download is switched "
        "off, so put the Larochelle binarized MNIST files there, or train with --data-dir pointing to their parent"
    )


# ---------------------------------------------------------------- .npy and .npz arrays


def _combined(data: vaekit.Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    tr, te = data.split("train"), data.split("test")
    y = None if tr.y is None else torch.cat([tr.y, te.y])
    return torch.cat([tr.x, te.x]), y


def test_npy_uint8_images_gain_a_channel_are_scaled_and_split(tmp_path):
    """An (N, H, W) uint8 .npy loads as (N, 1, H, W) / 255, each example once, test_fraction of them held out."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(50, 6, 5), dtype=np.uint8)
    a[:, 0, 0] = np.arange(50)  # pixel (0, 0) tells the examples apart
    path = tmp_path / "images.npy"
    np.save(path, a)
    data = load_data(DataConfig(name=str(path), test_fraction=0.2))
    assert data.shape == (1, 6, 5)
    assert len(data.split("test").x) == 10
    assert len(data.split("train").x) == 40
    x, y = _combined(data)
    assert y is None
    assert x.shape == (50, 1, 6, 5)
    index = np.rint(x[:, 0, 0, 0].numpy() * 255).astype(int)
    assert sorted(index.tolist()) == list(range(50))
    np.testing.assert_allclose(x.numpy()[:, 0], a[index].astype(np.float64) / 255, rtol=0, atol=1e-7)


def test_npy_split_follows_test_fraction(tmp_path):
    """A larger test_fraction holds out more examples of the same .npy file."""
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((40, 4, 4), dtype=np.uint8))
    assert len(load_data(DataConfig(name=str(path), test_fraction=0.5)).split("test").x) == 20
    assert len(load_data(DataConfig(name=str(path), test_fraction=0.25)).split("test").x) == 10


def test_npz_with_given_splits_keeps_them_and_their_labels(tmp_path):
    """An .npz with x_train/x_test/y_train/y_test keeps exactly that split, in order, with its labels."""
    rng = np.random.default_rng(6)
    arrays = {
        "x_train": rng.integers(0, 256, size=(9, 7, 7), dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(4, 7, 7), dtype=np.uint8),
        "y_train": rng.integers(0, 3, size=9),
        "y_test": rng.integers(0, 3, size=4),
    }
    path = tmp_path / "split.npz"
    np.savez(path, **arrays)
    data = load_data(DataConfig(name=str(path)))
    for split in ("train", "test"):
        s = data.split(split)
        assert s.x.shape == (len(arrays[f"x_{split}"]), 1, 7, 7)
        np.testing.assert_allclose(s.x.numpy()[:, 0], arrays[f"x_{split}"] / 255, rtol=0, atol=1e-7)
        assert s.y.tolist() == arrays[f"y_{split}"].tolist()


@pytest.mark.parametrize(
    ("member", "labels", "said"),
    [("y_train", np.arange(8), "must be 9 integer labels, got shape (8,) and dtype int64"),
     ("y_test", np.zeros(4), "must be 4 integer labels, got shape (4,) and dtype float64")],
)  # fmt: skip
def test_npz_labels_that_do_not_fit_their_split_are_refused_naming_the_member(tmp_path, member, labels, said):
    """Labels of the wrong count or of a non-integer type are refused in a message that names the file and member."""
    arrays = {"x_train": np.zeros((9, 4), np.float32), "x_test": np.zeros((4, 4), np.float32), member: labels}
    path = tmp_path / "split.npz"
    np.savez(path, **arrays)
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name=str(path)))
    assert str(err.value) == f"{path}:{member} {said}"


def test_npy_tabular_floats_stay_flat(tmp_path):
    """An (N, D) float .npy in [0, 1] loads as (N, D) with the same values, split between train and test."""
    rng = np.random.default_rng(7)
    a = rng.random((30, 5))
    a[:, 0] = np.arange(30) / 29  # column 0 tells the rows apart
    path = tmp_path / "table.npy"
    np.save(path, a)
    data = load_data(DataConfig(name=str(path)))
    assert data.shape == (5,)
    x, _ = _combined(data)
    assert x.shape == (30, 5)
    index = np.rint(x[:, 0].numpy() * 29).astype(int)
    assert sorted(index.tolist()) == list(range(30))
    np.testing.assert_allclose(x.numpy(), a[index], rtol=1e-6, atol=1e-7)


def test_npy_channels_last_images_move_channels_first(tmp_path):
    """An (N, H, W, 3) uint8 .npy loads as (N, 3, H, W) with each channel's values kept."""
    a = np.zeros((10, 6, 6, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 10, 100, 250
    path = tmp_path / "rgb.npy"
    np.save(path, a)
    data = load_data(DataConfig(name=str(path)))
    assert data.shape == (3, 6, 6)
    x, _ = _combined(data)
    assert x[:, 0].unique().tolist() == pytest.approx([10 / 255])
    assert x[:, 1].unique().tolist() == pytest.approx([100 / 255])
    assert x[:, 2].unique().tolist() == pytest.approx([250 / 255])


@pytest.mark.parametrize(("shape", "expected"), [((5, 6, 7, 1), (1, 6, 7)), ((5, 4, 6, 3), (3, 4, 6))])
def test_channels_last_grey_and_rgb_images_of_any_height_move_channels_first(tmp_path, shape, expected):
    """Channels-last images move their channels first whether grey (one channel) or RGB, and whatever their height
    (4 here, a channel count some formats use)."""
    a = (np.arange(np.prod(shape)) % 256).astype(np.uint8).reshape(shape)
    path = tmp_path / "images.npy"
    np.save(path, a)
    data = load_data(DataConfig(name=str(path), test_fraction=0.4))
    assert data.shape == expected
    x, _ = _combined(data)
    moved = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    # The splits shuffle the examples; each one's first value tells them apart.
    x, moved = (t[t.flatten(1)[:, 0].argsort()] for t in (x, moved))
    torch.testing.assert_close(x, moved, rtol=0, atol=1e-7)


def test_an_archive_that_cannot_be_unpacked_is_refused_by_name(tmp_path):
    """A downloaded data set's archive that is not gzip is refused in a message that names it, before any download."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert str(err.value).startswith(f"cannot unpack {raw / 'train-images-idx3-ubyte.gz'}: ")


def _nan_array() -> np.ndarray:
    a = np.full((10, 4), 0.5)
    a[3, 2] = np.nan
    return a


def _pickled(path: Path) -> None:
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: np.save(p, _nan_array()),
        lambda p: np.save(p, np.full((10, 4), 1.5)),
        lambda p: np.save(p, np.full((10, 4), -0.1)),
        lambda p: np.save(p, np.zeros((4, 1, 3, 3, 3))),
        _pickled,
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"this is not a numpy file at all"),
    ],
    ids=["nan", "above-one", "below-zero", "five-dims", "pickled-objects", "empty-file", "garbage"],
)
def test_bad_npy_files_raise_vaekit_error(tmp_path, write):
    """Unusable .npy contents raise VaekitError rather than another exception."""
    path = tmp_path / "bad.npy"
    write(path)
    with pytest.raises(VaekitError):
        load_data(DataConfig(name=str(path)))


def _npz_with_bad_crc(path: Path) -> None:
    """An .npz whose member's bytes were changed after its CRC was written."""
    np.savez(path, x=np.full((10, 4), 0.25))
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"x.npy") + 200] ^= 0xFF  # inside the stored member's data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "write",
    [lambda p: np.savez(p, x=np.array([{}] * 60, dtype=object)), _npz_with_bad_crc],
    ids=["object-member", "member-with-bad-crc"],
)
def test_bad_npz_members_raise_vaekit_error(tmp_path, write):
    """A member that cannot be read (an object array, which would need unpickling, or one with a bad checksum) is a
    VaekitError, not a traceback from deep inside numpy or zipfile."""
    path = tmp_path / "bad.npz"
    write(path)
    with pytest.raises(VaekitError, match="bad.npz"):
        load_data(DataConfig(name=str(path)))


def test_missing_npy_file_raises_vaekit_error(tmp_path):
    """A .npy path that does not exist raises VaekitError naming it."""
    path = tmp_path / "missing.npy"
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name=str(path)))
    assert str(path) in str(err.value)


def test_unknown_data_name_raises_vaekit_error():
    """A name that is no source, array file or folder raises VaekitError naming it."""
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name="no-such-data-set"))
    assert "no-such-data-set" in str(err.value)


# ---------------------------------------------------------------- image folders


# (folder, file name, size (width, height), mode, fill): each image is one flat colour so it can be recognised.
IMAGES = [
    ("cat", "a.png", (10, 12), "L", 20),
    ("cat", "b.png", (20, 20), "RGB", (200, 40, 90)),
    ("cat", "c.png", (10, 12), "L", 140),
    ("dog", "d.png", (20, 20), "L", 60),
    ("dog", "e.png", (10, 12), "RGB", (30, 220, 170)),
    ("dog", "f.png", (20, 20), "RGB", (250, 250, 5)),
]
CLASSES = ["cat", "dog"]  # sorted sub-folder names give the labels


def _write_images(root: Path) -> None:
    for folder, name, size, mode, fill in IMAGES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, fill).save(root / folder / name)


def _expected(channels: int) -> list[tuple[tuple[float, ...], int]]:
    """Per written image: its flat colour in [0, 1] after conversion to the wanted mode (by PIL), and its label."""
    mode = "L" if channels == 1 else "RGB"
    out = []
    for folder, _, _, m, fill in IMAGES:
        pixel = Image.new(m, (1, 1), fill).convert(mode).getpixel((0, 0))
        pixel = pixel if isinstance(pixel, tuple) else (pixel,)
        out.append((tuple(v / 255 for v in pixel), CLASSES.index(folder)))
    return out


@pytest.mark.parametrize(("channels", "want"), [(0, 3), (1, 1), (3, 3)], ids=["auto", "grey", "rgb"])
def test_image_folder_resizes_and_labels_by_sub_folder(tmp_path, channels, want):
    """Images of mixed sizes and modes load as (N, C, 16, 16), each once, labelled by their sorted sub-folder."""
    _write_images(tmp_path)
    data = load_data(DataConfig(name=str(tmp_path), image_size=16, channels=channels))
    assert data.shape == (want, 16, 16)
    x, y = _combined(data)
    assert x.shape == (len(IMAGES), want, 16, 16)
    assert y is not None
    found = []
    for image, label in zip(x, y, strict=True):
        colour = image.flatten(1)
        # each image was one flat colour, so every pixel of a channel must hold the same value
        assert torch.equal(colour, colour[:, :1].expand_as(colour))
        found.append((tuple(colour[:, 0].tolist()), int(label)))
    expected = _expected(want)
    matched = []
    for colour, label in found:
        hits = [i for i, (c, _) in enumerate(expected) if np.allclose(c, colour, atol=1e-6)]
        assert len(hits) == 1, f"loaded colour {colour} matches {len(hits)} written images"
        assert expected[hits[0]][1] == label
        matched.append(hits[0])
    assert sorted(matched) == list(range(len(IMAGES)))


def test_image_folder_of_only_grey_images_is_one_channel(tmp_path):
    """A folder of grey images only loads as one channel when channels is left on auto."""
    for i, size in enumerate([(8, 8), (12, 9), (9, 12)]):
        Image.new("L", size, 40 * i).save(tmp_path / f"{i}.png")
    data = load_data(DataConfig(name=str(tmp_path), image_size=16))
    assert data.shape == (1, 16, 16)
    x, y = _combined(data)
    assert y is None  # images directly in the folder have no class
    assert sorted(round(v * 255) for v in x[:, 0, 0, 0].tolist()) == [0, 40, 80]


def test_corrupt_png_in_image_folder_names_the_file(tmp_path):
    """A .png file of random bytes raises VaekitError naming that file."""
    _write_images(tmp_path)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(8).integers(0, 256, size=300, dtype=np.uint8).tobytes())
    with pytest.raises(VaekitError) as err:
        load_data(DataConfig(name=str(tmp_path), image_size=16))
    assert str(bad) in str(err.value)


def test_empty_image_folder_raises_vaekit_error(tmp_path):
    """A folder holding no images raises VaekitError."""
    (tmp_path / "notes.txt").write_text("nothing to see")
    with pytest.raises(VaekitError):
        load_data(DataConfig(name=str(tmp_path)))


# ---------------------------------------------------------------- digits: binarisation and the default split


def test_binarize_fixes_test_split_and_leaves_train_grey():
    """With binarize, the test split is one fixed 0/1 draw consistent with its grey levels; train stays grey."""
    grey = load_data(DataConfig(name="digits"))
    first = load_data(DataConfig(name="digits", binarize=True))
    second = load_data(DataConfig(name="digits", binarize=True))
    test = first.split("test").x
    assert set(test.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(test, second.split("test").x)
    assert torch.equal(first.split("test").y, grey.split("test").y)
    g = grey.split("test").x
    assert torch.all(test[g == 0] == 0)  # probability 0 never draws 1
    assert torch.all(test[g == 1] == 1)  # probability 1 always draws 1
    middle = (g > 0) & (g < 1)
    assert 0 < test[middle].mean().item() < 1
    assert torch.equal(first.split("train").x, grey.split("train").x)
    assert len(first.split("train").x.unique()) > 2


def _rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Each example with its label as bytes, sorted: the data set as a multiset of rows."""
    table = np.concatenate([x.reshape(len(x), -1), y[:, None]], 1).astype(np.float32)
    return sorted(row.tobytes() for row in table)


def test_digits_default_split_is_deterministic_and_partitions_the_data():
    """Two loads of digits give the same split, and train plus test are exactly the 1797 digits with their labels."""
    from sklearn.datasets import load_digits

    a, b = load_data(DataConfig(name="digits")), load_data(DataConfig(name="digits"))
    for split in ("train", "test"):
        assert torch.equal(a.split(split).x, b.split(split).x)
        assert torch.equal(a.split(split).y, b.split(split).y)
    n_train, n_test = len(a.split("train").x), len(a.split("test").x)
    assert n_train + n_test == N_DIGITS
    assert n_test == round(N_DIGITS * 0.2)
    assert a.shape == (1, 8, 8)

    x, y = _combined(a)
    bunch = load_digits()
    assert _rows(x.numpy(), y.numpy()) == _rows(bunch.images / 16.0, bunch.target)


def test_image_modes_keep_their_values(tmp_path):
    """16-bit grey keeps its full range, palette and RGBA images give their true colours (values set by hand)."""
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.fromarray(np.full((6, 6), 1000, np.uint16)).save(folder / "a_low16.png")
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(folder / "b_high16.png")
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(folder / "c_palette.png")
    Image.new("RGBA", (6, 6), (10, 20, 30, 128)).save(folder / "d_rgba.png")
    data = vaekit.load_data(vaekit.DataConfig(name=str(folder), image_size=4, test_fraction=0.25))
    x = torch.cat([data.split("train").x, data.split("test").x])
    assert x.shape == (4, 3, 4, 4)
    colours = {tuple(round(v, 4) for v in img[:, 0, 0].tolist()) for img in x}
    expected = {
        (round(1000 / 65535, 4),) * 3,
        (round(40000 / 65535, 4),) * 3,
        (round(200 / 255, 4), round(100 / 255, 4), round(50 / 255, 4)),
        (round(10 / 255, 4), round(20 / 255, 4), round(30 / 255, 4)),
    }
    assert colours == expected


def test_an_image_over_pillows_size_bound_is_a_vaekit_error(tmp_path, monkeypatch):
    """An image far above Pillow's pixel bound (a decompression bomb) is refused by name, not with Pillow's error."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (30, 30)).save(tmp_path / "big.png")
    with pytest.raises(VaekitError, match="big.png"):
        load_data(DataConfig(name=str(tmp_path), image_size=8))


def test_a_damaged_mnist_archive_leaves_nothing_behind(mnist_root):
    """An archive that is not gzip is refused and leaves no empty unpacked file, so putting the good archive back is
    enough; a leftover empty file from before is unpacked anew."""
    raw = mnist_root / "MNIST" / "raw"
    for unpacked in raw.glob("*-ubyte"):
        unpacked.unlink()
    good = (raw / "t10k-images-idx3-ubyte.gz").read_bytes()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    cfg = DataConfig(name="mnist", root=str(mnist_root), download=False)
    with pytest.raises(VaekitError, match="t10k-images"):
        load_data(cfg)
    assert not (raw / "t10k-images-idx3-ubyte").exists()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(good)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"")  # as an older version could leave it
    assert load_data(cfg).split("test").x.shape == (10_000, 1, 28, 28)


@pytest.mark.parametrize(
    ("n", "channels", "nrow", "padding", "pad_value"),
    [(10, 1, 4, 2, 0.0), (7, 3, 8, 1, 1.0), (3, 1, 1, 0, 0.5), (16, 3, 4, 3, 0.2)],
)
def test_image_grids_match_torchvisions_make_grid(n, channels, nrow, padding, pad_value):
    from torchvision.utils import make_grid

    from vaekit.images import grid

    images = torch.rand(n, channels, 5, 7, generator=torch.Generator().manual_seed(n))
    expected = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value).permute(1, 2, 0).numpy()
    assert np.array_equal(grid(images, nrow, padding, pad_value), expected)


def test_the_bundled_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    from vaekit.data import _digits_arrays

    images, target = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((np.arange(30).reshape(30, 1) % 3 == 0) * np.ones((1, 4), np.int16), (np.arange(30) % 3 == 0)),
        (np.arange(30).reshape(30, 1) % 2 == 1, np.arange(30) % 2 == 1),
    ],
    ids=["int16", "bool"],
)
def test_integer_and_boolean_arrays_load_as_their_values(tmp_path, values, expected):
    """Integers other than 8-bit ones (here 0 and 1) and booleans are read as the numbers they are (only uint8 is
    scaled by 255)."""
    np.save(tmp_path / "a.npy", values)
    x, _ = _combined(load_data(DataConfig(name=str(tmp_path / "a.npy"))))
    assert x.dtype == torch.float32 and x.shape[1:] == values.shape[1:]
    assert sorted(x[:, 0].tolist()) == sorted(expected.astype(float).tolist())


def test_an_npz_of_one_array_under_any_name_is_its_examples_and_y_is_its_labels(tmp_path):
    """An .npz holding a single array takes it as the examples whatever its name; next to x, y holds the labels."""
    x = np.arange(40, dtype=np.float32).reshape(20, 2) / 40
    np.savez(tmp_path / "one.npz", measurements=x)
    data = load_data(DataConfig(name=str(tmp_path / "one.npz")))
    got, labels = _combined(data)
    assert labels is None and sorted(got[:, 0].tolist()) == sorted(x[:, 0].tolist())
    np.savez(tmp_path / "two.npz", x=x, y=np.arange(20) % 3)
    got, labels = _combined(load_data(DataConfig(name=str(tmp_path / "two.npz"))))
    assert labels is not None
    assert (labels == torch.from_numpy((got[:, 0].numpy() * 40).round().astype(int) // 2 % 3)).all()
    np.savez(tmp_path / "three.npz", a=x, b=x)
    with pytest.raises(VaekitError, match="must hold an array 'x'"):
        load_data(DataConfig(name=str(tmp_path / "three.npz")))


def test_classes_of_data_without_labels_is_an_error_that_says_so(tmp_path):
    """data.classes keeps the examples of some labels: on data without labels it is refused, saying why."""
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((20, 3)))
    with pytest.raises(VaekitError, match="data.classes needs labels, and data '.*a.npy' has none"):
        load_data(DataConfig(name=str(tmp_path / "a.npy"), classes=[1]))


def test_a_table_with_text_labels_keeps_their_names(tmp_path):
    """A CSV whose label column is text gives numeric labels and the names they stand for, in sorted order."""
    rows = [f"{i / 10},{(i * 7 % 10) / 10},{'ab'[i % 2]}" for i in range(10)]
    (tmp_path / "t.csv").write_text("u,v,kind\n" + "\n".join(rows) + "\n")
    data = load_data(DataConfig(name=str(tmp_path / "t.csv"), label_column="kind"))
    assert data.label_names == ["a", "b"]
    x, y = _combined(data)
    assert x.shape == (10, 2) and sorted(y.tolist()) == [0] * 5 + [1] * 5


def test_splits_of_different_shapes_are_refused_naming_the_odd_one(tmp_path):
    """An .npz whose x_test has another example shape than x_train is refused, naming the split and its shape; a
    split asked of such a file for scoring names the data when it is missing."""
    np.savez(tmp_path / "odd.npz", x_train=np.zeros((4, 3, 5), np.float32), x_test=np.zeros((4, 3, 6), np.float32))
    with pytest.raises(VaekitError) as refused:
        load_data(DataConfig(name=str(tmp_path / "odd.npz")))
    assert str(refused.value) == f"data '{tmp_path / 'odd.npz'}': split 'test' has examples of shape (1, 3, 6)"
    np.savez(tmp_path / "two.npz", x_train=np.zeros((4, 6), np.float32), x_test=np.zeros((2, 6), np.float32))
    with pytest.raises(VaekitError, match=f"data set '{tmp_path / 'two.npz'}' has no split 'valid'"):
        vaekit.data.load_examples(DataConfig(name=str(tmp_path / "two.npz")), split="valid")


def test_a_split_taken_by_slice_or_by_positions_keeps_each_examples_name():
    """take gives the examples at a slice or at a tensor of positions, each with its label and file name."""
    split = vaekit.data.Split(torch.arange(4.0).view(4, 1), torch.tensor([0, 1, 0, 1]), ["a", "b", "c", "d"])
    sliced, picked = split.take(slice(1, 3)), split.take(torch.tensor([3, 0]))
    assert sliced.names == ["b", "c"] and sliced.x.flatten().tolist() == [1.0, 2.0] and sliced.y.tolist() == [1, 0]
    assert picked.names == ["d", "a"] and picked.x.flatten().tolist() == [3.0, 0.0]


def test_downloads_go_where_vaekit_data_says_or_into_the_users_cache(tmp_path, monkeypatch):
    """VAEKIT_DATA names the folder for downloaded data sets; without it they go to $XDG_CACHE_HOME/vaekit."""
    monkeypatch.setenv("VAEKIT_DATA", str(tmp_path / "data"))
    assert vaekit.data.default_root() == tmp_path / "data"
    monkeypatch.delenv("VAEKIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert vaekit.data.default_root() == tmp_path / "cache" / "vaekit"


def test_missing_files_are_downloaded_into_the_data_root_when_download_is_on(tmp_path, monkeypatch):
    """With download on, missing MNIST files are fetched through torchvision and missing binarized MNIST files into
    ROOT/binarized_mnist; the network is stood in for by a download that fails, as it does offline, and that failure
    is the error's reason."""
    import torchvision.datasets
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("no network here")

    fetched = []

    def record(url, folder, name):
        fetched.append((url, folder, name))
        offline()

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", record)
    with pytest.raises(VaekitError, match=r"MNIST files not found in .* and the download failed \(no network here\)"):
        load_data(DataConfig("mnist", root=str(tmp_path), download=True))
    with pytest.raises(VaekitError) as refused:
        load_data(DataConfig("binarized-mnist", root=str(tmp_path), download=True))
    folder = tmp_path / "binarized_mnist"
    assert str(refused.value) == f"could not download binarized_mnist_train.amat into {folder}: no network here"
    assert fetched == [(vaekit.data.BINARIZED_MNIST_URL + "binarized_mnist_train.amat", str(folder),
                        "binarized_mnist_train.amat")]  # fmt: skip


def test_validation_takes_all_but_at_least_one_training_example(tmp_path):
    """data.validation may hold out every training example but one; all of them is refused, saying how many there
    are."""
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(2).random((10, 3), dtype=np.float32))  # 8 training, 2 test examples
    data = load_data(DataConfig(name=str(path), validation=7))
    assert len(data.split("train").x) == 1 and len(data.split("valid").x) == 7
    with pytest.raises(VaekitError, match=r"^data.validation = 8 leaves no training examples \(the training split "
                       r"has 8\)$"):  # fmt: skip
        load_data(DataConfig(name=str(path), validation=8))


def test_a_memory_mapped_file_is_read_where_it_lies(tmp_path):
    """Mapped, the examples are the file's own pages: what is written into the file afterwards is what training
    reads; a mapped file that does not exist is named."""
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((10, 3), dtype=np.float32))
    data = load_data(DataConfig(name=str(path), memory_map="on"))
    file = np.load(path, mmap_mode="r+")
    file[0, 1] = 0.5
    file.flush()
    assert data.split("train").x[0, 1] == 0.5
    with pytest.raises(VaekitError, match=f"^data file not found: {re.escape(str(tmp_path / 'gone.npy'))}$"):
        load_data(DataConfig(name=str(tmp_path / "gone.npy"), memory_map="on"))


def test_channels_first_images_three_wide_stay_channels_first(tmp_path):
    """An (N, 1, H, 3) array is one-channel images three pixels wide, not channels-last: its shape is kept."""
    path = tmp_path / "narrow.npy"
    np.save(path, np.random.default_rng(4).random((10, 1, 8, 3), dtype=np.float32))
    assert load_data(DataConfig(name=str(path))).shape == (1, 8, 3)


def test_a_split_leaves_at_least_one_training_example():
    """Two examples split into one for training and one for testing; a test fraction that would take every example
    for testing is refused, saying so."""
    x = torch.rand(2, 3)
    splits = _split(Split(x), 0.5)
    assert len(splits["train"].x) == len(splits["test"].x) == 1
    with pytest.raises(VaekitError, match=r"^3 examples with test_fraction 0.9 leave none for training; lower "
                       r"data.test_fraction$"):  # fmt: skip
        _split(Split(torch.rand(3, 3)), 0.9)
