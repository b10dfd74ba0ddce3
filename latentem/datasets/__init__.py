"""Small embedded datasets and a plain CSV reader."""

from __future__ import annotations

import csv
import os
from importlib import resources

import numpy as np

__all__ = ["load_faithful", "read_csv"]


def read_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a numeric, comma-separated file into ``(data, column_names)``.

    The first row is the header, unless every cell of it is a number (or empty): then
    the file has no header (``np.savetxt(path, x, delimiter=",")`` writes none), the first row
    is data, and the columns are named ``"1"``, ``"2"``, ... by position.

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
    data, names, _ = _read_csv(path)
    return data, names


def _read_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray]:
    """:func:`read_csv`, with the line number in the file of each row of ``data``."""
    # utf-8-sig drops the byte-order mark that spreadsheets write at the start of a
    # "CSV UTF-8" file; read as text it would glue onto the first cell.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        # Blank lines are skipped, but counted in the line numbers of the messages.
        rows = [
            (line, row) for line, row in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in row)
        ]
    if not rows:
        raise ValueError(f"{path} is empty; expected rows of comma-separated numbers.")
    first = [cell.strip() for cell in rows[0][1]]
    if all(cell == "" or _is_number(cell) for cell in first):  # a missing value is not a name
        names = [str(column + 1) for column in range(len(first))]
    else:
        names, rows = first, rows[1:]
    data = np.empty((len(rows), len(names)), dtype=np.float64)
    for index, (line, row) in enumerate(rows):
        if len(row) != len(names):
            raise ValueError(f"{path}, line {line}: {len(row)} values but the first row has {len(names)}.")
        for column, cell in enumerate(row):
            text = cell.strip()
            try:
                data[index, column] = float(text) if text else np.nan
            except ValueError:
                hint = " (the file must be comma-separated)" if (";" in text or "\t" in text) else ""
                raise ValueError(
                    f"{path}, line {line}, column {names[column]!r}: {text!r} is not a number; "
                    f"every column must be numeric{hint}."
                ) from None
    return data, names, np.asarray([line for line, _ in rows], dtype=np.int64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
