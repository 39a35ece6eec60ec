"""Tables from CSV files: numeric feature columns, an optional label column, and standardisation whose statistics are
computed on the training split, stored in the run and applied identically to every table scored later.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import VaekitError
from .files import read_json, write_json

MISSING = {"", "na", "nan", "n/a", "null", "none"}  # cells read as missing values, in any capitalisation


@dataclass
class Table:
    """The feature columns of a CSV file as floats (N, D), in file order, with the labels of its label column."""

    x: torch.Tensor
    columns: list[str]
    y: torch.Tensor | None = None
    label_names: list[str] | None = None  # what each label number stands for, when the labels were text


def _number(cell: str) -> float | None:
    """The cell as a number, or None when it is not one."""
    try:
        return float(cell)
    except ValueError:
        return None


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of a CSV file, each row checked to have one cell per column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise VaekitError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VaekitError(f"cannot read {path} as a CSV file: {e}") from None
    if not rows:
        raise VaekitError(f"{path} is empty")
    header = [name.strip() for name in rows[0]]
    if all(_number(name) is not None for name in header):
        raise VaekitError(f"{path} has no header row: its first line must name the columns")
    if len(set(header)) != len(header) or "" in header:
        raise VaekitError(f"{path}: every column needs a name of its own in the header")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise VaekitError(f"{path}, line {i}: {len(row)} cells where the header names {len(header)} columns")
    if len(rows) < 2:
        raise VaekitError(f"{path} has a header but no rows")
    return header, [[cell.strip() for cell in row] for row in rows[1:]]


def _list(items: list, most: int = 5) -> str:
    """The first items, and how many more there are."""
    shown = ", ".join(str(i) for i in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def read_csv(path: str | Path, label_column: str = "", one_hot: bool = False) -> Table:
    """Read a CSV file with a header: numeric columns become features; text columns are refused, or one-hot encoded
    with one_hot; the label column (if named) is kept apart; missing or non-finite values are refused with their
    rows and columns."""
    path = Path(path)
    header, rows = _rows(path)
    if label_column and label_column not in header:
        raise VaekitError(f"{path} has no column '{label_column}' (columns: {_list(header, 10)})")
    features = [c for c in header if c != label_column]
    if not features:
        raise VaekitError(f"{path} has no feature columns besides the label column '{label_column}'")
    cells = {c: [row[header.index(c)] for row in rows] for c in header}
    missing = [(r + 2, c) for c in features for r, cell in enumerate(cells[c]) if cell.lower() in MISSING]
    if missing:
        lines, columns = sorted({r for r, _ in missing}), sorted({c for _, c in missing}, key=header.index)
        raise VaekitError(
            f"{path} has {len(missing)} missing values (lines {_list(lines)}; columns {_list(columns)}); "
            "fill or remove them first: vaekit never drops rows silently"
        )
    text = [c for c in features if any(_number(cell) is None for cell in cells[c])]
    if text and not one_hot:
        raise VaekitError(
            f"{path}: the columns {_list(text)} are not numeric; remove them, or one-hot encode them "
            "with --set data.one_hot=true"
        )
    names: list[str] = []
    values: list[list[float]] = []
    for c in features:
        if c in text:
            levels = sorted(set(cells[c]))
            names += [f"{c}={level}" for level in levels]
            values += [[float(cell == level) for cell in cells[c]] for level in levels]
        else:
            names.append(c)
            values.append([float(cell) for cell in cells[c]])
    x = torch.tensor(values, dtype=torch.float64).T.contiguous()
    if not torch.isfinite(x).all():
        bad = sorted({int(r) + 2 for r in (~torch.isfinite(x)).any(1).nonzero().flatten()})
        raise VaekitError(f"{path} has infinite values on lines {_list(bad)}")
    y, label_names = _labels(path, cells[label_column]) if label_column else (None, None)
    return Table(x.float(), names, y, label_names)


def _labels(path: Path, cells: list[str]) -> tuple[torch.Tensor, list[str] | None]:
    """Labels as integers: integer cells as they are, text as its index among the sorted distinct values."""
    empty = [i + 2 for i, cell in enumerate(cells) if cell.lower() in MISSING]
    if empty:
        raise VaekitError(f"{path}: the label column has missing values on lines {_list(empty)}")
    numbers = [_number(cell) for cell in cells]
    if all(n is not None and n == int(n) for n in numbers):
        return torch.tensor([int(n) for n in numbers if n is not None]), None
    names = sorted(set(cells))
    return torch.tensor([names.index(cell) for cell in cells]), names


@dataclass
class Scaler:
    """Per-column standardisation (x - mean) / std, with the column names it was computed for."""

    columns: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, x: torch.Tensor, columns: list[str]) -> Scaler:
        """The statistics of x (N, D); a constant column keeps a deviation of 1, so that it stays 0."""
        x64 = x.double()
        std = [s if s > 0 and math.isfinite(s) else 1.0 for s in x64.std(0, unbiased=False).tolist()]
        return cls(list(columns), x64.mean(0).tolist(), std)

    def apply(self, x: torch.Tensor, columns: list[str], what: str) -> torch.Tensor:
        """Standardise a table whose columns must be the ones the statistics were computed for."""
        if columns != self.columns:
            gone = [c for c in self.columns if c not in columns]
            new = [c for c in columns if c not in self.columns]
            detail = f"missing {_list(gone)}" if gone else f"not seen in training {_list(new)}" if new else "reordered"
            raise VaekitError(f"{what} does not have the columns the model was trained on ({detail})")
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return ((x.double() - mean) / std).float()

    def save(self, path: str | Path) -> None:
        """Write the statistics as JSON, atomically."""
        write_json(path, {"format": "vaekit-scaler", **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> Scaler:
        """Read statistics written by save."""
        raw = read_json(path, f"{path} is missing: the run's table statistics are needed to scale new tables")
        try:
            if raw.pop("format") != "vaekit-scaler":
                raise ValueError("not a vaekit scaler")
            scaler = cls(**raw)
            if not len(scaler.columns) == len(scaler.mean) == len(scaler.std):
                raise ValueError("columns, means and deviations differ in number")
            return scaler
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise VaekitError(f"{path} is not a vaekit table scaler ({e})") from None
