"""Writing outputs: every file goes to a temporary name beside its target and is renamed when complete."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
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
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(images.detach().cpu(), tmp, nrow=nrow, padding=2, format="png")
    return Path(path)
