"""Stopping on SIGINT and SIGTERM: the temporary files being written, and the handler that removes them and exits.

The command's handler never raises into the code it interrupts: an exception thrown at an arbitrary point of a
library's import or of a drawing can leave that library broken and end in a traceback (or worse) instead of a clean
stop. It removes the temporary files being written, says one line and exits at once. Training replaces it with its
own handler, which saves a checkpoint first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
MESSAGES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}

_pending: set[Path] = set()  # temporary files and folders being written, which a stop must remove


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (in the main thread; elsewhere they cannot be handled anyway)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def track(path: Path) -> None:
    """Remember a temporary file or folder being written (call it with signals held, as it is created)."""
    _pending.add(path)


def untrack(path: Path) -> None:
    """Forget a temporary file or folder: renamed into place, or removed."""
    _pending.discard(path)


def discard() -> None:
    """Remove every temporary file and folder being written."""
    for path in list(_pending):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        _pending.discard(path)


def _stop(signum: int, frame: Any) -> None:
    discard()
    with contextlib.suppress(Exception):  # output printed so far still reaches a pipe, unless stdout is mid-write
        sys.stdout.flush()
    os.write(2, f"vaekit: {MESSAGES[signal.Signals(signum)]}\n".encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM remove the temporary files, print one line and exit with 128 + the
    signal (in the main thread only: elsewhere a handler cannot be installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
