"""TensorBoard logs of a run (train.tensorboard = true): each epoch's losses and learning rate, the KL of every latent
dimension, and for images a grid of reconstructions and one of samples, in RUN/tensorboard next to metrics.jsonl."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import VaekitError
from .files import record
from .model import VAE, kl_normal

# Held-out examples whose KL per dimension is logged (the first ones of the split), and images in each grid.
KL_EXAMPLES, IMAGES = 1000, 16


def check_installed() -> None:
    """Refuse train.tensorboard where TensorBoard is not installed, before a run starts."""
    try:
        import tensorboard  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise VaekitError("train.tensorboard needs TensorBoard: pip install 'vaekit[tensorboard]'") from None


class Board:
    """A TensorBoard writer for one run, its steps the epochs; examples are what the model is shown (held out)."""

    def __init__(self, folder: Path, epoch: int, examples: torch.Tensor) -> None:
        check_installed()
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what it had logged after its checkpoint's epoch: those epochs are trained again.
        self.writer = SummaryWriter(str(folder), purge_step=epoch + 1 if epoch else None)
        self.examples = examples[:KL_EXAMPLES]

    @torch.no_grad()
    def epoch(self, row: dict[str, Any], model: VAE) -> None:
        """Log an epoch's metrics row, and what the model makes of the examples."""
        step, w = row["epoch"], self.writer
        for key, value in row.items():
            if key.endswith("_loss") and value is not None:
                w.add_scalar(f"loss/{key.removesuffix('_loss')}", value, step)
        w.add_scalar("lr", row["lr"], step)
        w.add_scalar("skipped", row["skipped"], step)
        first = self.examples.to(model.device)
        kl = kl_normal(*model.encode(first)).mean(0)
        for i, value in enumerate(kl.tolist()):
            w.add_scalar(f"kl/{i:03d}", value, step)
        if len(model.shape) == 3 and model.shape[0] in (1, 3):
            from torchvision.utils import make_grid

            shown = first[:IMAGES]
            pairs = torch.stack([shown, model.decode(model.encode(shown)[0])], 1).flatten(0, 1)
            w.add_image("reconstructions", make_grid(pairs.clamp(0, 1).cpu(), nrow=8), step)
            samples = model.sample(IMAGES, torch.Generator(model.device).manual_seed(0))
            w.add_image("samples", make_grid(samples.clamp(0, 1).cpu(), nrow=8), step)
        w.flush()
        for written in Path(w.log_dir).iterdir():
            record(written)

    def close(self) -> None:
        """Write what is pending and close the log."""
        self.writer.close()


@contextmanager
def opened(folder: Path, epoch: int, examples: torch.Tensor, on: bool) -> Iterator[Board | None]:
    """A Board for a run that starts after `epoch` epochs, closed at the end; None when on is false."""
    board = Board(folder, epoch, examples) if on else None
    try:
        yield board
    finally:
        if board is not None:
            board.close()
