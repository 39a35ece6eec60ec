"""Writing outputs: every file goes to a temporary name beside its target and is renamed when complete."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import stopping
from .errors import VaekitError, first_line


def _umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_groups: list[list[tuple[Path, Path]]] = []  # the renames that open `together` blocks hold back, innermost last


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Every file written inside the block appears at its end, all of them or none: a command's outputs are
    complete, or absent (an interrupt during the final renames is held until they are done). Inside another such
    block, the files join the outer one's."""
    if _groups:
        yield
        return
    group: list[tuple[Path, Path]] = []
    _groups.append(group)
    try:
        yield
    except BaseException:
        for tmp, _ in group:
            _remove(tmp)
        raise
    finally:
        _groups.remove(group)
    with stopping.held():
        for tmp, path in group:
            os.replace(tmp, path)
            stopping.untrack(tmp)


def _remove(tmp: Path) -> None:
    """Remove a temporary file that will not be renamed into place."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    stopping.untrack(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside path; on success it is renamed to path, on failure removed."""
    path = Path(path)
    check_writable(path)
    _record(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with stopping.held():  # a stop between creating the file and tracking it would leave it behind
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=f".tmp{path.suffix}")
            tmp = Path(name)
            stopping.track(tmp)
        os.close(fd)
        # mkstemp makes the file private (0600); outputs get the usual permissions that the umask allows.
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise VaekitError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        if _groups:
            _groups[-1].append((tmp, path))
        else:
            with stopping.held():
                os.replace(tmp, path)
                stopping.untrack(tmp)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise VaekitError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def check_writable(*paths: str | Path | None) -> None:
    """Refuse output paths that name a folder, a device or anything else that is not a regular file, and files in a
    run that vaekit did not write there."""
    for path in paths:
        if path is None or not Path(path).exists():
            continue
        if not Path(path).is_file():
            raise VaekitError(f"cannot write {path}: it exists and is not a regular file")
        if not written_here(path):
            raise VaekitError(f"{path} is not a file vaekit wrote in this run, so it is left alone: move it away first")


RECORD = "written.txt"  # in a run directory: every file vaekit wrote there, one path (relative to the run) per line


def _record_of(path: Path) -> Path | None:
    """The record of the run directory path lies in (None outside runs, and in runs made before runs kept one)."""
    for folder in list(path.parents)[:3]:  # RUN/file, RUN/plots/file, RUN/anomaly-report/file, RUN/best/file
        if (folder / RECORD).is_file():
            return folder / RECORD
    return None


def _entry(path: Path, record: Path) -> str:
    return Path(os.path.relpath(path, record.parent)).as_posix()


def _recorded(record: Path) -> set[str]:
    try:
        return set(record.read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError as e:
        raise VaekitError(f"cannot read {record}: {e.strerror or e}") from None


def written_here(path: str | Path) -> bool:
    """Whether vaekit may replace or remove the file at path: it wrote it, or path is not in a run that keeps a
    record."""
    record = _record_of(Path(path))
    return record is None or _entry(Path(path), record) in _recorded(record)


def start_record(run_dir: Path) -> None:
    """Begin the record of what vaekit writes in a new run directory."""
    (run_dir / RECORD).touch()


def _record(path: Path) -> None:
    """Add path to its run's record before the file is written, so that a file never exists unrecorded."""
    record = _record_of(path)
    if record is not None and _entry(path, record) not in _recorded(record):
        # One short append: lines are never rewritten, and two processes writing into one run lose none.
        try:
            with open(record, "a", encoding="utf-8") as f:
                f.write(_entry(path, record) + "\n")
        except OSError as e:
            raise VaekitError(f"cannot write {record}: {e.strerror or e}") from None


def record(path: str | Path) -> None:
    """Add a file that a library wrote into a run (TensorBoard's event files) to the run's record."""
    _record(Path(path))


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
        raise VaekitError(f"cannot read {path} as a NumPy array file: {first_line(e)}") from None


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


def require_images(shape: tuple[int, ...], instead: str = "use --npy for the values") -> None:
    """Refuse to draw examples that are not grey or RGB images, saying what to do instead."""
    if not is_image(shape):
        raise VaekitError(f"this model's data are not grey or RGB images, so there is no picture to draw; {instead}")


def grid_png(images: torch.Tensor, nrow: int = 8) -> bytes:
    """Images (N, C, H, W) in [0, 1] as the bytes of one PNG grid."""
    import io

    from PIL import Image

    from .images import grid

    buffer = io.BytesIO()
    Image.fromarray((grid(images, nrow) * 255 + 0.5).clip(0, 255).astype(np.uint8)).save(buffer, format="png")
    return buffer.getvalue()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid."""
    require_images(tuple(images.shape[1:]))
    write_bytes(path, grid_png(images, nrow))
    return Path(path)
