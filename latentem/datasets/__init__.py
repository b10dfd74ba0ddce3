"""Small embedded datasets and a plain CSV reader."""

from __future__ import annotations

import csv
import os
from importlib import resources

import numpy as np

__all__ = ["load_faithful", "read_csv"]


def read_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a numeric CSV file with a header row into ``(data, column_names)``.

    Raises ``ValueError`` with the offending line and column for a non-numeric cell
    (empty cells and ``nan`` are read as NaN, which the fitting functions reject by row),
    and ``FileNotFoundError`` for a missing file.

    Example:
      >>> from latentem.datasets import read_csv
      >>> import latentem.datasets as d, importlib.resources as r
      >>> data, names = read_csv(r.files(d) / "faithful.csv")
      >>> data.shape, names
      ((272, 2), ['eruptions', 'waiting'])
    """
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path} is empty; expected a header row and numeric rows.")
    names = [name.strip() for name in rows[0]]
    data = np.empty((len(rows) - 1, len(names)), dtype=np.float64)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(names):
            raise ValueError(
                f"{path}, line {line}: {len(row)} values but the header has {len(names)} columns."
            )
        for column, cell in enumerate(row):
            text = cell.strip()
            try:
                data[line - 2, column] = float(text) if text else np.nan
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}, column {names[column]!r}: {text!r} is not a number; "
                    "every column must be numeric."
                ) from None
    return data, names


def load_faithful() -> np.ndarray:
    """The Old Faithful geyser data: 272 eruptions, columns (eruption minutes, waiting minutes).

    Returns:
      A float64 NumPy array of shape ``(272, 2)``.

    References:
      Azzalini & Bowman (1990), A look at some data on the Old Faithful geyser.
      Applied Statistics 39, 357-365.

    Example:
      >>> from latentem.datasets import load_faithful
      >>> load_faithful().shape
      (272, 2)
    """
    data, _ = read_csv(resources.files(__name__) / "faithful.csv")
    return data
