"""Compressing files with a run's model: inputs and outputs in their own form, the .vkz file format, rate reports.

A .vkz file is MAGIC, the format version (uint16, little-endian), the length of a UTF-8 JSON header (uint32), the
header, the coded words (uint32, little-endian) and the SHA-256 of everything before it. The header names the
model (SHA-256 of its weights and description), the data (form, shape, dtype, count, file names, SHA-256 of the
original values) and the codec's parameters; the README documents every field.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from .. import stopping
from ..errors import VaekitError
from ..files import atomic_path, check_writable, read_arrays, together, write_bytes, write_json
from ..images import read_folder
from ..model import VAE, log_weights
from ..run import Run, open_run
from . import codec

MAGIC = b"\x89VKZ\r\n\x1a\n"  # as PNG's: a non-ASCII first byte, and line endings that a text transfer would mangle
VERSION = 1
METHOD = "bits-back ANS (constriction AnsCoder, 32-bit words, 24-bit probabilities)"  # the only coder this reads
SPLITS = ("train", "valid", "test")
_PREFIX = struct.Struct("<HI")  # version, header length


def model_fingerprint(run: Run) -> str:
    """SHA-256 of the run's weights and model description: what a compressed file must be decoded with."""
    digest = hashlib.sha256()
    for name in ("weights", "description"):
        try:
            digest.update(run.path(name).read_bytes())
        except OSError as e:
            raise VaekitError(f"cannot read {run.path(name)}: {e.strerror or e}") from None
    return digest.hexdigest()


def _to_levels(a: np.ndarray, levels: int, shape: tuple[int, ...], what: str) -> tuple[np.ndarray, dict[str, Any]]:
    """An array's values as integer levels in the model's layout (N, *shape), and how to restore the array exactly."""
    if a.dtype.kind not in "biuf":
        raise VaekitError(f"{what} has dtype {a.dtype}; compression takes numbers")
    if a.ndim < 2 or len(a) == 0:
        raise VaekitError(f"{what} has shape {a.shape}; compression takes a non-empty array of examples")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise VaekitError(f"{what} holds NaN or infinite values")
    # Floats hold levels either as they are (0, 1, 2, ...) or scaled to [0, 1] (k / (levels - 1)); for 8-bit data,
    # floats within [0, 1] are read as scaled even when they are all 0 and 1.
    scaled = a.dtype.kind == "f" and levels > 2 and (a.max() <= 1 or not np.array_equal(a, np.round(a)))
    scale = levels - 1 if scaled else 1
    values = np.rint(a * scale) if a.dtype.kind == "f" else a
    if levels == 2 and a.dtype.kind == "f" and not np.array_equal(values, a):
        raise VaekitError(f"{what} holds values other than 0 and 1; this model codes binary data")
    if values.min() < 0 or values.max() > levels - 1:
        kind = "0 or 1 (a binary model)" if levels == 2 else f"0 to {levels - 1} (an 8-bit model)"
        raise VaekitError(f"{what} holds values from {a.min()} to {a.max()}; this model codes {kind}")
    x = values.astype(np.int64)
    channels_last = x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3)
    if channels_last:
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1:] != shape and not (x.ndim <= len(shape) and math.prod(x.shape[1:]) == math.prod(shape)):
        raise VaekitError(f"{what} has examples of shape {a.shape[1:]}, but the model was trained on {shape}")
    layout = {"shape": list(a.shape), "dtype": a.dtype.str, "scale": scale, "channels_last": channels_last}
    if not np.array_equal(_restore(x, layout), a) or a.dtype.kind == "f" and np.signbit(a).any():
        raise VaekitError(f"{what} cannot be restored bit for bit from {levels} levels: store it as integers")
    return np.ascontiguousarray(x.reshape(len(x), *shape)), layout


def _restore(x: np.ndarray, layout: dict[str, Any]) -> np.ndarray:
    """The original array from its integer levels: its shape, dtype and scale."""
    shape, dtype = layout["shape"], np.dtype(layout["dtype"])
    if layout["channels_last"]:
        x = x.reshape(shape[0], shape[3], shape[1], shape[2]).transpose(0, 2, 3, 1)
    x = x.reshape(shape)
    if dtype.kind == "f" and layout["scale"] != 1:
        return x.astype(dtype) / dtype.type(layout["scale"])
    return x.astype(dtype)


def _digest(values: np.ndarray, names: list[str] | None) -> str:
    """SHA-256 of the data as restored: the array's dtype, shape and bytes, and for folders the file names."""
    digest = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    digest.update(np.ascontiguousarray(values).tobytes())
    if names is not None:
        digest.update("\0".join(names).encode("utf-8"))
    return digest.hexdigest()


def _read_input(run: Run, data: str | Path | np.ndarray, levels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The examples to compress as integer levels, and the header's description of their original form."""
    shape = run.model.shape
    if isinstance(data, np.ndarray):
        x, layout = _to_levels(data, levels, shape, "the array")
        return x, {"form": "array", **layout, "sha256": _digest(data, None)}
    path = Path(data)
    if path.is_dir():
        if len(shape) != 3 or shape[0] not in (1, 3) or shape[1] != shape[2]:
            raise VaekitError(f"{path} is an image folder, but the model takes examples of shape {shape}")
        pixels, _, names, _ = read_folder(path, shape[0], shape[1], exact=True)
        values = torch.round(pixels * 255).to(torch.uint8).numpy()
        if levels == 2 and not np.isin(values, (0, 255)).all():
            raise VaekitError(f"{path} holds grey pixels; this model codes black-and-white images (0 and 255)")
        x = (values // 255 if levels == 2 else values).astype(np.int64)
        _output_names(names)
        return x, {"form": "folder", "names": names, "count": len(x), "sha256": _digest(values, names)}
    if path.suffix.lower() == ".npy" and path.is_file():
        a = read_arrays(path)
        if not isinstance(a, np.ndarray):
            raise VaekitError(f"{path} holds several arrays; compression takes a .npy file of one")
        x, layout = _to_levels(a, levels, shape, str(path))
        return x, {"form": "npy", **layout, "sha256": _digest(a, None)}
    if str(data) in SPLITS and not path.exists():
        a = run.examples(str(data)).x.numpy()
        x, layout = _to_levels(a, levels, shape, f"the {data} split of {run.config.data.name}")
        return x, {"form": "npy", **layout, "sha256": _digest(a, None)}
    what = f"cannot compress {data}" if path.exists() else f"{data}: not found"
    raise VaekitError(f"{what}; give a .npy file, an image folder or a split of the run's data ({', '.join(SPLITS)})")


def _output_names(names: list[str]) -> list[str]:
    """The file names a folder's images are written back under (PNG), refusing names that would leave the folder
    or land on one another."""
    out = []
    for name in names:
        if not isinstance(name, str) or not name or "\\" in name or "\0" in name or not name.isprintable():
            raise VaekitError(f"the file name {name!r} cannot be written back")
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or any(p in ("..", ".") for p in parts):
            raise VaekitError(f"the file name {name!r} leads outside the folder")
        out.append(name if name.lower().endswith(".png") else name + ".png")
    if len(set(out)) != len(out):
        twice = next(n for n in out if out.count(n) > 1)
        raise VaekitError(f"two images would both be written back as {twice}; rename one")
    return out


def _write_file(path: Path, header: dict[str, Any], words: np.ndarray) -> int:
    """Write a .vkz file atomically; its size in bytes."""
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body = MAGIC + _PREFIX.pack(VERSION, len(text)) + text + words.astype("<u4").tobytes()
    write_bytes(path, body + hashlib.sha256(body).digest())
    return len(body) + 32


def read_file(path: str | Path) -> tuple[dict[str, Any], np.ndarray]:
    """The header and coded words of a .vkz file, after checking its form, length and checksum."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise VaekitError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw.startswith(MAGIC):
        raise VaekitError(f"{path} is not a vaekit compressed file (.vkz)")
    start = len(MAGIC) + _PREFIX.size
    if len(raw) < start:
        raise VaekitError(f"{path} is truncated: {len(raw)} bytes, not even a whole header")
    version, length = _PREFIX.unpack_from(raw, len(MAGIC))
    if version != VERSION:
        raise VaekitError(f"{path} has format version {version}; this vaekit reads version {VERSION}")
    if len(raw) < start + length + 32:
        raise VaekitError(f"{path} is truncated: {len(raw)} bytes, shorter than its {length}-byte header")
    if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        raise VaekitError(f"{path} is corrupt or truncated: its checksum does not match its contents")
    try:
        header = json.loads(raw[start : start + length].decode("utf-8"))
        words = np.frombuffer(raw[start + length : -32], dtype="<u4").astype(np.uint32)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise VaekitError(f"{path} has an unreadable header: {e}") from None
    return header, words


def _standard_codecs(x: np.ndarray, levels: int, image: bool) -> dict[str, float]:
    """Bits per dimension of gzip, bz2, LZMA and PNG, each at its strongest setting, on all examples as one stream.

    Binary data go to gzip, bz2 and LZMA both as one byte per value and packed eight values to a byte; each codec
    is credited with the smaller of the two.
    """
    from PIL import Image

    values = x.astype(np.uint8)
    streams = [values.tobytes()] + ([np.packbits(values).tobytes()] if levels == 2 else [])
    coders = {
        "gzip -9": lambda b: gzip.compress(b, 9, mtime=0),
        "bzip2 -9": lambda b: bz2.compress(b, 9),
        "xz -9e (LZMA)": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
    }
    bits = {name: 8 * min(len(f(s)) for s in streams) for name, f in coders.items()}
    if image:
        n, c, h, w = x.shape
        tall = values.transpose(0, 2, 3, 1).reshape(n * h, w, c)  # every image under the one before
        pixels = (tall[..., 0] if c == 1 else tall) * (255 // (levels - 1))
        picture = Image.fromarray(pixels).convert("1") if levels == 2 and c == 1 else Image.fromarray(pixels)
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", optimize=True)
        bits["PNG (optimised)"] = 8 * len(buffer.getvalue())
    return {name: b / x.size for name, b in bits.items()}


def _neg_elbo(model: VAE, x: np.ndarray, levels: int) -> float:
    """The model's negative ELBO on the examples, in bits per dimension (closed-form KL, one draw per example)."""
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for batch in torch.from_numpy(x).split(1000):
            total -= (
                log_weights(model, batch.float() / (levels - 1), 1, analytic=True, generator=g).double().sum().item()
            )
    return total / (x.size * math.log(2))


def _environment() -> dict[str, str]:
    """What computed the probability tables: decoding is reliable where these are the same."""
    from importlib.metadata import version

    return {"torch": torch.__version__, "constriction": version("constriction"),
            "cpu": torch.backends.cpu.get_cpu_capability()}  # fmt: skip


def compress(
    run: Run | str | Path,
    data: str | Path | np.ndarray,
    out: str | Path,
    *,
    precision: int = codec.PRECISION,
    batch_size: int = 1000,
    report: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Compress data (a .npy file, an image folder, a split name or an array) losslessly to a .vkz file with the run's
    model; returns the rates, and with report=True also the model's -ELBO, standard codecs and a checked decode, which
    it also records in RUN/compression.json."""
    run = open_run(run)
    likelihood = codec.check_model(run.model)
    if report:
        check_writable(run.path("compression"))
    x, form = _read_input(run, data, likelihood.levels)
    if batch_size < 1:
        raise VaekitError(f"the batch size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    coded, network = codec.encode(run.model, x, precision, batch_size, progress)
    seconds = time.perf_counter() - start
    dims = x.size
    result: dict[str, Any] = {
        "examples": len(x),
        "dims": dims,
        "payload_bits_per_dim": 32 * len(coded.words) / dims,
        "initial_bits": coded.initial_bits,
        "compress_seconds": seconds,
        "compress_per_second": len(x) / seconds,
        "network_share": network / seconds,
    }
    if report:  # checked before the file is written, so that a failed check leaves no file
        start = time.perf_counter()
        decoded, _ = codec.decode(run.model, coded, progress)
        result["decompress_seconds"] = time.perf_counter() - start
        result["decompress_per_second"] = len(x) / result["decompress_seconds"]
        if not np.array_equal(decoded, x):
            raise VaekitError("the compressed data did not decode to the input: please report this as a bug")
        result["neg_elbo_bits_per_dim"] = _neg_elbo(run.model, x, likelihood.levels)
        result["codecs"] = _standard_codecs(x, likelihood.levels, len(x.shape) == 4)
    header = {
        "model": {"sha256": model_fingerprint(run), "likelihood": run.model.config.likelihood,
                  "latent": run.model.config.latent, "shape": list(run.model.shape)},
        "data": form,
        "codec": {"method": METHOD,
                  "precision": precision, "levels": likelihood.levels, "grid": codec.GRID, "count": coded.count,
                  "batches": coded.batches, "seed_words": coded.seed, "seed_skipped": coded.seed_skipped,
                  "words": len(coded.words)},
        "environment": _environment(),
    }  # fmt: skip
    with together():  # the file and, with report, the run's record of its rates appear together
        size = _write_file(Path(out), header, coded.words)
        result.update(bytes=size, bits_per_dim=8 * size / dims)
        if report:
            source = "an array in memory" if isinstance(data, np.ndarray) else str(data)
            write_json(run.path("compression"), {"input": source, "file": str(out), **result})
    return result


def _write_folder(out: Path, values: np.ndarray, names: list[str]) -> None:
    """Write images (N, C, H, W, uint8) as PNG files under the given names into a new folder, all or nothing."""
    from PIL import Image

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VaekitError(f"{out} exists and is not an empty folder; choose another output")
    out.parent.mkdir(parents=True, exist_ok=True)
    with stopping.held():
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        stopping.track(tmp)
    try:
        for image, name in zip(values, names, strict=True):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(target, "PNG")
        with stopping.held():
            with contextlib.suppress(FileNotFoundError):
                out.rmdir()
            os.replace(tmp, out)
            stopping.untrack(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        stopping.untrack(tmp)
        if isinstance(e, OSError):
            raise VaekitError(f"cannot write {out}: {e.strerror or e}") from None
        raise


def _integer(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise VaekitError(f"{what} must be an integer from {low} to {high}, got {value!r}")
    return value


def _check_header(header: Any, words: np.ndarray, model: VAE) -> tuple[codec.Coded, dict[str, Any]]:
    """What decoding needs from a header, every field checked against the model and the payload."""
    if not isinstance(header, dict) or not all(isinstance(header.get(k), dict) for k in ("model", "data", "codec")):
        raise VaekitError("the header lacks its model, data or codec part")
    form, c, levels = header["data"], header["codec"], codec.check_model(model).levels
    if c.get("method") != METHOD:
        raise VaekitError(f"the data were coded by {c.get('method')!r}, which this vaekit does not decode")
    precision = _integer(c.get("precision"), 2, codec.MAX_PRECISION, "the precision")
    seed = _integer(c.get("seed_words"), 1, 1 << 30, "the seed size")
    if seed != codec.seed_size(model.config.latent, precision) or c.get("levels") != levels:
        raise VaekitError("the codec settings do not fit this model")
    batches, limit = c.get("batches"), codec.step_limit(model)
    if not isinstance(batches, list) or not batches:
        raise VaekitError("the header has no coding steps")
    batches = [_integer(n, 1, limit, "a coding step") for n in batches]
    count = _integer(c.get("count"), 1, sum(batches), "the example count")
    if count != sum(batches) or c.get("words") != len(words):
        raise VaekitError("the header's counts do not match the file")
    coded = codec.Coded(words, count, precision, batches, seed, _integer(c.get("seed_skipped"), 0, seed, "the seed"))
    if not isinstance(form.get("sha256"), str):
        raise VaekitError("the header has no checksum of the data")
    if form.get("form") == "folder":
        names = form.get("names")
        if not isinstance(names, list) or len(names) != count:
            raise VaekitError(
                f"the header names {len(names) if isinstance(names, list) else 0} files for {count} images"
            )
        _output_names(names)
    elif form.get("form") in ("array", "npy"):
        shape = form.get("shape")
        if not isinstance(shape, list) or len(shape) < 2 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise VaekitError(f"the header's data shape {shape!r} is not a shape")
        channels_last = form.get("channels_last")
        wrong_layout = not isinstance(channels_last, bool) or (channels_last and len(shape) != 4)
        if shape[0] != count or math.prod(shape[1:]) != math.prod(model.shape) or wrong_layout:
            raise VaekitError(f"the header's data shape {shape} does not fit {count} examples of shape {model.shape}")
        try:
            dtype = np.dtype(form.get("dtype"))
        except TypeError:
            raise VaekitError(f"the header's dtype {form.get('dtype')!r} is not a NumPy type") from None
        if dtype.kind not in "biuf" or form.get("scale") not in (1, levels - 1):
            raise VaekitError(f"the header's dtype {dtype} or scale {form.get('scale')!r} cannot hold the data")
    else:
        raise VaekitError(f"unknown data form {form.get('form')!r}")
    return coded, form


def decompress(
    path: str | Path, run: Run | str | Path, out: str | Path | None = None, progress: bool = False
) -> np.ndarray:
    """The data a .vkz file holds, checked against the checksum of the original; written to out (a .npy file, or a
    folder of PNG files for a compressed folder) if given."""
    run = open_run(run)
    header, words = read_file(path)
    model = header.get("model") if isinstance(header, dict) else None
    if isinstance(model, dict) and model.get("sha256") != model_fingerprint(run):
        raise VaekitError(f"{path} was compressed with another model; decompress it with the run that made it")
    try:
        coded, form = _check_header(header, words, run.model)
    except VaekitError as e:
        raise VaekitError(f"{path} has an invalid header: {e}") from None
    names = form["names"] if form["form"] == "folder" else None
    try:
        levels, _ = codec.decode(run.model, coded, progress)
        if names is not None:
            values = (levels * (255 // (codec.check_model(run.model).levels - 1))).astype(np.uint8)
        else:
            values = _restore(levels, form)
        ok = _digest(values, names) == form["sha256"]
    except VaekitError:
        ok = False
    if not ok:
        made, here = header.get("environment"), _environment()
        why = "the file is corrupt"
        if made != here:
            why = (f"it was compressed with {made} and this machine has {here}: compressed files decode reliably "
                   "only with the same software on the same kind of CPU")  # fmt: skip
        raise VaekitError(f"{path} does not decode to the original data ({why}); nothing was written")
    if out is not None:
        if names is not None:
            _write_folder(Path(out), values, _output_names(names))
        else:
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.save(f, values, allow_pickle=False)
    return values
