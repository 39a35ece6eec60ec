"""Image folders: PNG and JPEG files read into one tensor, resized, with labels from sub-folder names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import VaekitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


EXACT_MODES = {1: ("1", "L"), 3: ("RGB",)}  # modes whose pixels convert to 8-bit grey or RGB without loss
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _pixels(im, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """One PIL image as a (channels, H, W) float tensor in [0, 1], resized."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit and float images would be clipped to 8 bits by convert(); scale them to [0, 1] first.
        scale = 65535.0 if im.mode.startswith("I") else 1.0
        grey = Image.fromarray(np.asarray(im, dtype=np.float32) / scale, mode="F").resize(
            size, Image.Resampling.BILINEAR
        )
        return torch.from_numpy(np.array(grey, dtype=np.float32)).unsqueeze(0).repeat(channels, 1, 1)
    pixels = np.array(im.convert("L" if channels == 1 else "RGB").resize(size, Image.Resampling.BILINEAR))
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], channels)).permute(2, 0, 1).float() / 255


def grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.0) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] tiled nrow to a row with padding between them, as one (H, W, 3) float array:
    torchvision's make_grid, without the three seconds that importing torchvision costs every command."""
    x = images.detach().cpu().clamp(0, 1).float().numpy()
    x = np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x
    n, _, h, w = x.shape
    cols, rows = min(nrow, n), -(-n // min(nrow, n))
    out = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), pad_value, dtype=np.float32)
    for i, image in enumerate(x):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        out[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    return out


def read_folder(
    path: Path, channels: int, image_size: int, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[str], list[str] | None]:
    """Every image under path in sorted order, as (N, C, H, W) in [0, 1], with file names relative to path, and
    labels with their names, the sub-folders (when every image sits in one); channels 0 picks 3 if any image has
    colour, else 1. exact refuses any image that would need resizing or a lossy colour conversion."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise VaekitError(f"no PNG or JPEG images found in {path}")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
                if exact and (im.size != (image_size, image_size) or im.mode not in EXACT_MODES[channels]):
                    raise VaekitError(
                        f"{f} is a {im.size[0]}x{im.size[1]} {im.mode} image; this takes {image_size}x{image_size} "
                        f"{'grey' if channels == 1 else 'RGB'} 8-bit images as they are, with no resizing or conversion"
                    )
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as e:
            raise VaekitError(f"cannot read image {f}: {e}") from None
    channels = channels or (3 if any(im.mode not in GREY_MODES for im in images) else 1)
    size = (image_size, image_size)
    x = torch.stack([_pixels(im, channels, size) for im in images])
    # Labels come from sub-folder names, as in torchvision's ImageFolder, when every image sits in one.
    parents = [f.parent for f in files]
    y, classes = None, None
    if all(p != path for p in parents):
        classes = sorted({p.relative_to(path).parts[0] for p in parents})
        y = torch.tensor([classes.index(f.relative_to(path).parts[0]) for f in files])
    return x, y, [f.relative_to(path).as_posix() for f in files], classes
