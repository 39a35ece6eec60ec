"""The run report: one self-contained HTML file, opened from disk with no server and no network request, holding a run's
settings, loss curves, evaluation, the results of its uses, its images, and a latent explorer whose decoder runs in
the page.

`page_data` gathers what the page shows of one run as plain JSON-ready data (tensors as base64 strings); `report`
writes the page: the template `report.html` with the page's own script `report.js` and that data inlined. MLP
decoders with a Bernoulli or Gaussian likelihood are exported layer by layer and run in JavaScript; other decoders
come with a grid of images decoded over the latent plane, which the page shows the nearest of.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import VaekitError
from ..files import grid_png, is_image, read_json, write_text
from ..model import VAE, encode_all
from ..nets import MLPDecoder, Tanh
from ..run import Run, open_run
from .generation import interpolate

POINTS = 1500  # test examples in the latent explorer: enough to see the classes, small enough for a light page
GRID = 16  # decoded images per side of the plane, for decoders the page cannot run
PARITY = 8  # latents at which the page checks its decoder against PyTorch's

# Activations the page's decoder knows, by the class that nets uses, with their parameters.
ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    Tanh: "tanh",
    nn.ELU: "elu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.LeakyReLU: "leaky_relu",
    nn.Softplus: "softplus",
}
OUTPUTS = {"bernoulli": "sigmoid", "gaussian": "identity"}  # the likelihood's mean, as the page computes it


def _b64(array: np.ndarray | torch.Tensor, dtype: Any) -> str:
    """An array's values as base64 of the given dtype (little-endian), flattened."""
    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
    return base64.b64encode(np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def _pixels(x: torch.Tensor) -> str:
    """Images in [0, 1] as base64 bytes 0..255."""
    return _b64((x.clamp(0, 1) * 255 + 0.5).floor(), np.uint8)


def _png(images: torch.Tensor, nrow: int) -> str:
    """A grid of images (N, C, H, W) in [0, 1] as a PNG data URI."""
    return "data:image/png;base64," + base64.b64encode(grid_png(images, nrow)).decode()


def _decoder_layers(model: VAE) -> list[dict[str, Any]] | None:
    """The decoder as the page runs it (dense layers with activations between them), or None if it cannot."""
    if not isinstance(model.decoder, MLPDecoder) or model.config.likelihood not in OUTPUTS:
        return None
    layers: list[dict[str, Any]] = []
    for module in model.decoder.net:
        if isinstance(module, nn.Linear):
            rows, cols = module.weight.shape
            layers.append(
                {"rows": rows, "cols": cols, "w": _b64(module.weight, np.float32), "b": _b64(module.bias, np.float32)}
            )
        elif type(module) in ACTIVATIONS:
            layers[-1]["act"] = ACTIVATIONS[type(module)]
            layers[-1]["slope"] = getattr(module, "negative_slope", 0.01)
        else:
            return None
    return layers


def _plane(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D coordinates of the posterior means, and the plane's origin and axes in latent space, so that the latent at
    plane point p is origin + p @ axes (exactly the means' projection: PCA for more than two dimensions)."""
    d = mean.shape[1]
    if d <= 2:
        axes = torch.eye(2, d)
        return mean @ axes.T, torch.zeros(d), axes
    origin = mean.mean(0)
    centred = (mean - origin).double()
    # The covariance's eigenvectors: two of them however few the examples are (an SVD of one example gives one).
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    axes = vectors[:, [-1, -2]].T.float()
    # A sign convention, so that the same run always gives the same picture: each axis points to its largest entry.
    axes = axes * torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return (mean - origin) @ axes.T, origin, axes


def page_data(run: Run | str | Path, points: int = POINTS) -> dict[str, Any]:
    """Everything the report shows of one run, as JSON-ready data."""
    run = open_run(run)
    model = run.model_on(torch.device("cpu"))
    test = run.examples("test")
    n = min(points, len(test.x))
    x, y = test.x[:n], test.y
    image = is_image(model.shape)
    with torch.no_grad():
        mean, _ = encode_all(model, x)
        coords, origin, axes = _plane(mean)
        loss = model.loss(x, torch.Generator().manual_seed(0))
        layers = _decoder_layers(model)
        spread = torch.randn(PARITY, 2, generator=torch.Generator().manual_seed(0)) * coords.std(0, correction=0)
        probe = origin + spread @ axes  # latents on the plane, where the map's points lie
        explorer: dict[str, Any] = {
            "n": n,
            # Which examples the map shows: maps of the same examples are aligned and share their selection.
            "key": hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16],
            "shape": list(model.shape),
            "image": image,
            "coords": _b64(coords, np.float32),
            "labels": None if y is None else y[:n].tolist(),
            "loss": [round(v, 3) if math.isfinite(v) else None for v in loss.tolist()],
            "origin": origin.tolist(),
            "axes": axes.tolist(),
            "decoder": None if layers is None else {"layers": layers, "output": OUTPUTS[model.config.likelihood]},
            "parity": {"latents": probe.tolist(), "outputs": _b64(model.decode(probe), np.float32)},
        }
        if image:
            explorer["inputs"] = _pixels(x)
            if layers is None:
                explorer["recons"] = _pixels(model.decode(mean))
                explorer["grid"] = _grid(model, coords, origin, axes)
        images = _images(model, x) if image else {}
    return {
        "name": run.dir.name,
        "path": str(run.dir),
        "settings": run.config.to_toml(),
        "curves": _curves_svg(run.metrics),
        "tables": _tables(run),
        "images": images,
        "explorer": explorer,
    }


def _grid(model: VAE, coords: torch.Tensor, origin: torch.Tensor, axes: torch.Tensor) -> dict[str, Any]:
    """Images decoded at GRID x GRID points spanning the explorer's plane, for decoders the page cannot run."""
    low, high = coords.min(0).values, coords.max(0).values
    steps = [torch.linspace(low[i].item(), high[i].item(), GRID) for i in range(2)]
    plane = torch.cartesian_prod(steps[1], steps[0]).flip(1)  # row by row, x fastest
    return {
        "size": GRID,
        "low": low.tolist(),
        "high": high.tolist(),
        "images": _pixels(model.decode(origin + plane @ axes)),
    }


def _images(model: VAE, x: torch.Tensor) -> dict[str, str]:
    """Samples, reconstructions and interpolations as PNG data URIs."""
    g = torch.Generator().manual_seed(0)
    n = min(16, len(x))
    shown = {"samples from the prior": _png(model.sample(32, g), 8)}
    shown["originals (top) and reconstructions"] = _png(torch.cat([x[:n], model.decode(model.encode(x[:n])[0])]), n)
    pairs = min(4, len(x) // 2)
    if pairs:
        shown["interpolations between test pairs"] = _png(
            interpolate(model, x[:pairs], x[pairs : 2 * pairs], 10).flatten(0, 1), 10
        )
    return shown


def _tables(run: Run) -> dict[str, dict[str, Any]]:
    """The JSON results the run holds (evaluations of every split, anomaly calibration and report, compression), by
    title."""
    found = {f"evaluation ({p.name})": p for p in sorted(run.dir.glob("evaluation*.json"))}
    found["anomaly calibration"] = run.path("anomaly")
    found["compression (the last compress --report)"] = run.path("compression")
    found.update({f"anomaly report: {p.stem}": p for p in sorted(run.path("anomaly-report").glob("*.json"))})
    tables = {}
    for title, path in found.items():
        if path.is_file():
            # A damaged result is shown as such: the rest of the report, and the training that writes it, go on.
            try:
                data = read_json(path, f"{path} is missing")
                json.dumps(data, allow_nan=False)
            except VaekitError as e:
                data = {"unreadable": str(e)}
            except ValueError:
                data = {"unreadable": f"{path} holds a number that is not finite"}
            tables[title] = _flat(data) if isinstance(data, dict) else {"unreadable": f"{path} is not a JSON table"}
    return tables


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as one, their keys joined by dots; lists longer than 64 values are left out."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif not isinstance(value, list) or len(value) <= 64:
            flat[f"{prefix}{key}"] = value
    return flat


def _curves_svg(metrics: list[dict[str, Any]], width: int = 560, height: int = 240) -> str:
    """The loss curves (train, valid, test per epoch) as an inline SVG chart."""
    found = {k: [(m["epoch"], m.get(f"{k}_loss")) for m in metrics] for k in ("train", "valid", "test")}
    series: dict[str, list[tuple[int, float]]] = {}
    for k, rows in found.items():
        if any(v is not None for _, v in rows):
            series[k] = [(e, v) for e, v in rows if v is not None]
    if not series:
        return ""
    values = [v for s in series.values() for _, v in s]
    epochs = [e for s in series.values() for e, _ in s]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
    left, right, top, bottom = 56, 100, 12, 28

    def point(e: float, v: float) -> str:
        px = left + (e - e0) / (e1 - e0) * (width - left - right)
        py = top + (hi - v) / (hi - lo) * (height - top - bottom)
        return f"{px:.1f},{py:.1f}"

    colours = {"train": "#1f77b4", "valid": "#2ca02c", "test": "#d62728"}
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
        f'<text x="4" y="{top + 8}" class="axis">{hi:.1f}</text>',
        f'<text x="4" y="{height - bottom}" class="axis">{lo:.1f}</text>',
        f'<text x="{left}" y="{height - 8}" class="axis">epoch {e0}</text>',
        f'<text x="{width - right}" y="{height - 8}" class="axis" text-anchor="end">{e1}</text>',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>',
    ]
    for i, (name, s) in enumerate(series.items()):
        path = " ".join(point(e, v) for e, v in s)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colours[name]}" stroke-width="2"/>')
        parts.append(
            f'<text x="{width - right + 8}" y="{top + 14 + 16 * i}" fill="{colours[name]}">'
            f"{name}: {s[-1][1]:.2f}</text>"
        )
    return "".join(parts) + "</svg>"


def _align(pages: list[dict[str, Any]], runs: list[Run]) -> None:
    """Rotate, reflect and scale each later run's map onto the first's (orthogonal Procrustes) where both show the
    same test examples, changing its plane (and its decoded grid) so that a point still maps to the latent it shows."""
    first = pages[0]["explorer"]
    a = _coords(first)
    for page, run in zip(pages[1:], runs[1:], strict=True):
        e = page["explorer"]
        b = _coords(e)
        if e["key"] != first["key"] or len(b) < 2:
            continue
        ma, mb = a.mean(0), b.mean(0)
        u, s, vt = np.linalg.svd((b - mb).T @ (a - ma))
        rotation = u @ vt
        spread = ((b - mb) ** 2).sum()
        scale = s.sum() / spread if spread > 1e-12 else 0.0
        if not (math.isfinite(scale) and scale > 1e-12):  # all points in one place: nothing to align
            continue
        aligned = (b - mb) @ rotation * scale + ma
        e["coords"] = _b64(aligned, np.float32)
        # latent = origin + p @ axes with p = (p' - ma) @ rotation.T / scale + mb, for a point p' of the aligned map.
        axes, origin = np.array(e["axes"]), np.array(e["origin"])
        back = rotation.T / scale
        e["origin"] = (origin + (mb - ma @ back) @ axes).tolist()
        e["axes"] = (back @ axes).tolist()
        e["aligned"] = len(b)
        if "grid" in e:  # decoded anew over the aligned plane, whose axes the page's lookup follows
            model = run.model_on(torch.device("cpu"))
            plane = (torch.tensor(v, dtype=torch.float32) for v in (aligned, e["origin"], e["axes"]))
            with torch.no_grad():
                e["grid"] = _grid(model, *plane)


def _coords(explorer: dict[str, Any]) -> np.ndarray:
    """The explorer's 2-D coordinates as an (n, 2) array."""
    return np.frombuffer(base64.b64decode(explorer["coords"]), dtype="<f4").reshape(-1, 2).astype(np.float64)


def report(
    runs: Run | str | Path | list[Run | str | Path], out: str | Path | None = None, *, points: int = POINTS
) -> Path:
    """Write the HTML report of one run (to RUN/report.html unless out is given) or of several side by side."""
    many = runs if isinstance(runs, list) else [runs]
    if not many:
        raise VaekitError("name at least one run to report on")
    if points < 1:
        raise VaekitError(f"the number of points must be at least 1, got {points}")
    opened = [open_run(r) for r in many]
    if out is None:
        if len(opened) > 1:
            raise VaekitError("a report of several runs needs -o FILE.html: it belongs to no single run")
        out = opened[0].path("report")
    pages = [page_data(r, points) for r in opened]
    if len(pages) > 1:
        _align(pages, opened)
    write_text(Path(out), render(pages))
    return Path(out)


def render(pages: list[dict[str, Any]]) -> str:
    """The report page for these runs' data: the template with its script, styles and data inlined."""
    files = resources.files("vaekit.uses")
    template = files.joinpath("report.html").read_text(encoding="utf-8")
    try:
        data = json.dumps(pages, allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise VaekitError("the model gives latents that are not finite numbers, so there is no map to draw") from None
    # No "<" in the data: "</script>" or "<!--" there would end or change the script element that holds it.
    parts = {
        "title": html.escape(", ".join(page["name"] for page in pages)),
        "data": data.replace("<", "\\u003c"),
        "script": files.joinpath("report.js").read_text(encoding="utf-8"),
    }
    return re.sub(r"\{\{(title|data|script)\}\}", lambda m: parts[m[1]], template)
