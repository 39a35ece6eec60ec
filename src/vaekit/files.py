"""Writing outputs: every file goes to a temporary name beside its target and is renamed when complete."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import VaekitError


def _umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_groups: list[list[tuple[Path, Path]]] = []  # the renames that open `together` blocks hold back, innermost last


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Every file written inside the block appears at its end, all of them or none: a command's outputs are
    complete, or absent (an interrupt during the final renames is held until they are done)."""
    group: list[tuple[Path, Path]] = []
    _groups.append(group)
    try:
        yield
    except BaseException:
        for tmp, _ in group:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        _groups.remove(group)
    blocked = {signal.SIGINT, signal.SIGTERM}
    held = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if held else None
    try:
        for tmp, path in group:
            os.replace(tmp, path)
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside path; on success it is renamed to path, on failure removed."""
    path = Path(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        # mkstemp makes the file private (0600); outputs get the usual permissions that the umask allows.
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise VaekitError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        if _groups:
            _groups[-1].append((Path(tmp), path))
        else:
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise VaekitError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def check_writable(*paths: str | Path | None) -> None:
    """Refuse output paths that name a folder, a device or anything else that is not a regular file."""
    for path in paths:
        if path is not None and Path(path).exists() and not Path(path).is_file():
            raise VaekitError(f"cannot write {path}: it exists and is not a regular file")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write text to path atomically."""
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path, missing: str) -> Any:
    """The JSON value in a file; a missing file raises VaekitError(missing), an unreadable one names its problem."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VaekitError(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VaekitError(f"cannot read {path}: {e}") from None


def read_arrays(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a .npy file, or every member of a .npz file, read whole; any failure (a missing or damaged file,
    a member with a bad checksum, an object array, which would need unpickling) is a VaekitError."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except FileNotFoundError:
        raise VaekitError(f"file not found: {path}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise VaekitError(f"cannot read {path} as a NumPy array file: {str(e).splitlines()[0]}") from None


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Write value as JSON atomically; NaN and infinity, which JSON cannot hold, are refused before anything is
    written."""
    try:
        text = json.dumps(value, indent=indent, allow_nan=False) + "\n"
    except ValueError:
        raise VaekitError(f"cannot write {path}: the results hold NaN or infinite values (a broken model?)") from None
    write_text(path, text)


def save_array(path: str | Path, array: torch.Tensor | None = None, **named: torch.Tensor) -> Path:
    """Write one array as .npy, or named arrays as .npz."""
    buffer = io.BytesIO()
    if array is not None:
        np.save(buffer, array.detach().cpu().numpy())
    else:
        arrays: dict[str, Any] = {k: v.detach().cpu().numpy() for k, v in named.items()}
        np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())
    return Path(path)


def is_image(shape: tuple[int, ...]) -> bool:
    """Whether examples of this shape are grey or RGB images (C, H, W)."""
    return len(shape) == 3 and shape[0] in (1, 3)


def require_images(shape: tuple[int, ...]) -> None:
    """Refuse to draw examples that are not grey or RGB images."""
    if not is_image(shape):
        raise VaekitError("this model's data are not grey or RGB images, so there is no picture to draw; use --npy")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid."""
    require_images(tuple(images.shape[1:]))
    from PIL import Image

    from .images import grid

    pixels = (grid(images, nrow) * 255 + 0.5).clip(0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="png")
    return Path(path)
