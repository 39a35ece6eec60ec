"""Stopping on SIGINT and SIGTERM: the temporary files being written, and the handler that removes them and exits.

The command's handler never raises into the code it interrupts: an exception thrown at an arbitrary point of a
library's import or of a drawing can leave that library broken and end in a traceback (or worse) instead of a clean
stop. It removes the temporary files being written, says one line and exits at once. Training replaces it with its
own handler, which saves a checkpoint first.

The command imports this module first, before anything heavy, so it imports little itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
MESSAGES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}

_pending: set[Path] = set()  # temporary files and folders being written, which a stop must remove


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class held:
    """SIGINT and SIGTERM wait until the block ends (in the main thread; elsewhere they cannot be handled anyway)."""

    def __enter__(self) -> None:
        self._previous = None
        if hasattr(signal, "pthread_sigmask") and _in_main_thread():
            self._previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous)


def track(path: Path) -> None:
    """Remember a temporary file or folder being written (call it with signals held, as it is created)."""
    _pending.add(path)


def untrack(path: Path) -> None:
    """Forget a temporary file or folder: renamed into place, or removed."""
    _pending.discard(path)


def discard() -> None:
    """Remove every temporary file and folder being written."""
    import shutil

    for path in list(_pending):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:  # noqa: SIM105 (contextlib is one more import before the handlers are in place)
                path.unlink()
            except OSError:
                pass
        _pending.discard(path)


def _stop(signum: int, frame: object) -> None:
    discard()
    try:  # noqa: SIM105 (as above). Output printed so far still reaches a pipe, unless stdout is mid-write.
        sys.stdout.flush()
    except Exception:
        pass
    os.write(2, f"vaekit: {MESSAGES[signal.Signals(signum)]}\n".encode())
    os._exit(128 + signum)


class handled:
    """Within the block, SIGINT and SIGTERM remove the temporary files, print one line and exit with 128 + the
    signal (in the main thread only: elsewhere a handler cannot be installed)."""

    def __enter__(self) -> None:
        self._previous = {s: signal.signal(s, _stop) for s in SIGNALS} if _in_main_thread() else {}

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def main() -> int:
    """The `vaekit` command, with SIGINT and SIGTERM handled from before anything else is imported to the process's
    end: a signal while the command starts (importing torch takes a second or two) or while Python shuts down after
    it ends the process as cleanly as one in between."""
    if _in_main_thread():
        for s in SIGNALS:
            signal.signal(s, _stop)
    from .cli import main as command

    return command()
