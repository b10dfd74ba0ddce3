"""The command line: ``python -m latentem [fit] [FILE.csv] [options]``.

Fits a Gaussian mixture by EM to a CSV file (numeric columns, a header row optional) or, with
no file, to the embedded Old Faithful data, and prints a summary: the fitted weights,
means and covariances, the mean log-likelihood, BIC, AIC, iterations and status.

- ``--n-components K`` fits K components; ``--select 1-10`` fits each number of
  components in the range (all in one compiled program, by
  :func:`latentem.select_n_components`) and keeps the best by ``--criterion`` (BIC by
  default), printing the table of candidates.
- ``--output result.json`` writes the model description, parameters, log-likelihood,
  BIC, AIC, status and labels as JSON; ``--plot figure.png`` draws the clusters, the
  log-likelihood history and (with ``--select``) the selection curve (needs
  matplotlib).
- A progress line shows on a terminal for fits that take more than a moment; it
  comes from inside the compiled EM loop (``callback=`` of :func:`latentem.fit`).

Errors in the input (a missing file, a non-numeric column, NaN values, too few rows, a
bad option) are reported in one line on stderr with exit status 2, without traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
CRITERIA = ("bic", "aic")


class _UsageError(Exception):
    """An error in the user's input, reported in one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become one-line usage errors instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see python -m latentem --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m latentem",
        usage="python -m latentem [fit] [FILE.csv] [--n-components K | --select A-B] [options]",
        description=(
            "Fit a Gaussian mixture by EM to a CSV file of numeric columns, with or without a header row "
            "(default data: Old Faithful, 272 x 2)."
        ),
    )
    parser.add_argument(
        "file",
        nargs="?",
        help="comma-separated numeric columns; a first row that is not all numbers is the header",
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--n-components", "-k", type=int, default=None, metavar="K", help="number of components (default 2)"
    )
    choice.add_argument(
        "--select",
        metavar="A-B",
        default=None,
        help="fit A, A+1, ..., B components (or a list such as 1,2,4) and keep the best by --criterion",
    )
    parser.add_argument(
        "--criterion", default="bic", choices=CRITERIA, help="model-selection criterion (default bic)"
    )
    parser.add_argument(
        "--covariance-type",
        default="full",
        choices=COVARIANCE_TYPES,
        help="covariance structure (default full)",
    )
    parser.add_argument("--n-init", type=int, default=5, metavar="N", help="number of restarts (default 5)")
    parser.add_argument(
        "--max-iter", type=int, default=200, metavar="N", help="maximum EM iterations (default 200)"
    )
    parser.add_argument(
        "--tol", type=float, default=1e-6, metavar="TOL", help="convergence tolerance (default 1e-6)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="SEED", help="random seed (default 0)")
    parser.add_argument("--output", "-o", metavar="FILE.json", help="write the result as JSON")
    parser.add_argument("--plot", metavar="FIGURE.png", help="draw clusters and log-likelihood history")
    parser.add_argument(
        "--progress",
        default="auto",
        choices=("auto", "on", "off"),
        help="progress display on stderr (default auto: on a terminal, for fits longer than a moment)",
    )
    return parser


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------


def _candidates(text: str) -> list[int]:
    """``"1-10"`` or ``"1,2,4"`` as a sorted list of distinct positive ints."""
    try:
        if "-" in text and "," not in text:
            low, high = (int(part) for part in text.split("-"))
            values = list(range(low, high + 1))
        else:
            values = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise _UsageError(f"--select takes a range A-B or a list A,B,C of integers; got {text!r}.") from None
    if not values or min(values) < 1:
        raise _UsageError(f"--select needs numbers of components >= 1 with A <= B; got {text!r}.")
    return values


def _check_options(args: argparse.Namespace) -> None:
    if args.n_components is not None and args.n_components < 1:
        raise _UsageError(f"--n-components must be at least 1; got {args.n_components}.")
    if args.n_init < 1:
        raise _UsageError(f"--n-init must be at least 1; got {args.n_init}.")
    if args.max_iter < 1:
        raise _UsageError(f"--max-iter must be at least 1; got {args.max_iter}.")
    if not args.tol >= 0:
        raise _UsageError(f"--tol must be non-negative; got {args.tol}.")
    if not 0 <= args.seed < 2**32:
        # JAX keys from seeds of 2**32 and more repeat smaller seeds' keys in 32-bit mode.
        raise _UsageError(f"--seed must be an integer from 0 to {2**32 - 1}; got {args.seed}.")
    for option, path in (("--output", args.output), ("--plot", args.plot)):
        if path is not None and not os.path.isdir(os.path.dirname(path) or "."):
            raise _UsageError(f"{option} {path}: the folder {os.path.dirname(path)} does not exist.")


def _load(path: str | None) -> tuple[np.ndarray, list[str], str]:
    from latentem import datasets

    if path is None:
        return datasets.load_faithful(), ["eruptions", "waiting"], "Old Faithful (embedded)"
    if not os.path.exists(path):
        raise _UsageError(f"no such file: {path}")
    if os.path.isdir(path):
        raise _UsageError(f"{path} is a directory; give a CSV file.")
    try:
        data, names, lines = datasets._read_csv(path)
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise _UsageError(str(error).splitlines()[0]) from None
    finite = np.isfinite(data)
    if not finite.all():
        count, where = _rows_and_columns(~finite, lines, names)
        raise _UsageError(
            f"{path} has {count} row(s) with missing, NaN or infinite values ({where}); "
            "remove or impute them."
        )
    import jax

    computed = np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
    beyond = np.abs(data) > np.finfo(computed).max
    if beyond.any():  # finite here, infinite once in JAX's 32-bit floats
        count, where = _rows_and_columns(beyond, lines, names)
        raise _UsageError(
            f"{path} has {count} row(s) with values beyond {computed}'s range, magnitudes up to "
            f"{np.finfo(computed).max:.4g} ({where}); rescale them, or set JAX_ENABLE_X64=1 to "
            "compute in float64."
        )
    return data, names, path


def _rows_and_columns(cells: np.ndarray, lines: np.ndarray, names: list[str]) -> tuple[int, str]:
    """The number of rows with a True cell, and "line a, b; column 'x'" naming them."""
    rows, columns = np.nonzero(cells)
    rows = np.unique(rows)
    shown = ", ".join(str(lines[row]) for row in rows[:5]) + (", ..." if rows.size > 5 else "")
    column_names = ", ".join(repr(names[c]) for c in np.unique(columns)[:5])
    return rows.size, f"line {shown}; column {column_names}"


def _check_enough_rows(data: np.ndarray, source: str, needed: int, option: str) -> None:
    if data.shape[0] == 0:
        raise _UsageError(f"{source} has no data rows; it needs at least {needed}, after its header row.")
    if data.shape[0] < needed:
        raise _UsageError(
            f"{source} has {data.shape[0]} row(s) but {option} needs at least {needed}; "
            "use fewer components or more data."
        )


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


class Progress:
    """A one-line progress display fed from inside the compiled EM loop.

    ``callback(iteration, objective)`` is what :func:`latentem.fit` calls through
    ``jax.debug.callback``; under the restarts' ``vmap`` it may be called once per
    restart or with batched arrays, so it keeps the furthest iteration seen. Nothing is
    shown before ``delay`` seconds, so fast fits stay quiet; on a terminal the line is
    redrawn in place, elsewhere a line is written at most every ``interval`` seconds.
    """

    def __init__(self, stream: TextIO, max_iter: int, *, delay: float = 0.5, interval: float = 0.2):
        self.stream = stream
        self.max_iter = max_iter
        self.delay = delay
        self.interval = interval if stream.isatty() else max(interval, 1.0)
        self.terminal = stream.isatty()
        self.iteration = 0
        self.objective = math.nan
        self.started = time.monotonic()
        self.shown_at = -math.inf
        self.width = 0

    def note(self, text: str) -> None:
        """A line saying what is running, for work that reports no iterations."""
        self.stream.write(("\r" + text.ljust(self.width)) if self.terminal else text + "\n")
        self.width = max(self.width, len(text)) if self.terminal else 0
        self.stream.flush()

    def __call__(self, iteration: Any, objective: Any) -> None:
        try:
            iterations = np.ravel(np.asarray(iteration))
            objectives = np.ravel(np.asarray(objective, dtype=np.float64))
            furthest = int(np.argmax(iterations))
            if int(iterations[furthest]) >= self.iteration:
                self.iteration = int(iterations[furthest])
                self.objective = float(objectives[furthest])
            now = time.monotonic()
            if now - self.started >= self.delay and now - self.shown_at >= self.interval:
                self.shown_at = now
                self.show()
        except Exception:  # a broken display must never break the fit
            pass

    def show(self) -> None:
        text = f"iteration {self.iteration}/{self.max_iter}, mean log-likelihood {self.objective:.6f}"
        if self.terminal:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = max(self.width, len(text))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Erase the line on a terminal, so that the summary starts clean."""
        if self.terminal and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


# ---------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------


def _fit(args: argparse.Namespace) -> int:
    _check_options(args)
    candidates = _candidates(args.select) if args.select is not None else [args.n_components or 2]
    data, names, source = _load(args.file)
    option = "--select" if args.select is not None else "--n-components"
    _check_enough_rows(data, source, max(candidates), f"{option} {max(candidates)}")
    if args.plot is not None:
        _pyplot()  # fail before fitting if matplotlib is missing

    import jax

    import latentem as lem

    data = np.asarray(data, dtype=jax.dtypes.canonicalize_dtype(np.float64))
    show_progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    progress = Progress(sys.stderr, args.max_iter, delay=0.0 if args.progress == "on" else 0.5)
    key = jax.random.key(args.seed)
    selection = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lem.ConvergenceWarning)
        try:
            if args.select is not None:
                if show_progress:  # one compiled program for all candidates: no iterations to show
                    progress.note(f"fitting {len(candidates)} candidates in one compiled program ...")
                selection = lem.select_n_components(
                    key,
                    data,
                    candidates,
                    covariance_type=args.covariance_type,
                    criterion=args.criterion,
                    n_init=args.n_init,
                    max_iter=args.max_iter,
                    tol=args.tol,
                )
                fitted = _fitted_from_selection(lem, selection, args.criterion, data)
            else:
                model = lem.gaussian_mixture(candidates[0], args.covariance_type)
                result = lem.fit(
                    model,
                    key,
                    data,
                    n_init=args.n_init,
                    max_iter=args.max_iter,
                    tol=args.tol,
                    callback=progress if show_progress else None,
                )
                fitted = _fitted_from_result(lem, model, result, candidates[0], data)
        except ValueError as error:
            raise _UsageError(str(error).splitlines()[0]) from None
        finally:
            progress.close()

    n_components = fitted["n_components"]
    print(f"data: {source}, {data.shape[0]} samples x {data.shape[1]} features")
    chosen = f", chosen by {args.criterion.upper()}" if selection is not None else ""
    print(
        f"model: Gaussian mixture, {n_components} components{chosen}, {args.covariance_type} "
        f"covariances, best of {args.n_init} restart(s)"
    )
    if selection is not None:
        print()
        print(_format_selection(selection, args.criterion))
    print()
    print(_format_params(fitted["params"], names, args.covariance_type))
    print()
    print(_format_fit(fitted, data.shape[0]))
    for warning in caught:
        print(f"warning: {str(warning.message).splitlines()[0]}", file=sys.stderr)

    if args.output is not None:
        _write_json(args, fitted, selection, names, source, data.shape)
        print(f"wrote {args.output}")
    if args.plot is not None:
        _write_plot(args, fitted, selection, data, names)
        print(f"wrote {args.plot}")
    return 0


def _fitted_from_result(lem: Any, model: Any, result: Any, n_components: int, data: np.ndarray) -> dict:
    """What the summary, the JSON and the plots report about one fit."""
    return {
        "n_components": n_components,
        "params": result.params,
        "result": result,
        "log_likelihood": float(result.log_likelihood),
        "bic": float(lem.bic(model, result.params, data)),
        "aic": float(lem.aic(model, result.params, data)),
        "n_iter": int(result.n_iter),
        "converged": bool(result.converged),
        "status": lem.Status(int(result.status)).name,
        "labels": np.asarray(lem.predict(model, result.params, data)),
    }


def _fitted_from_selection(lem: Any, selection: Any, criterion: str, data: np.ndarray) -> dict:
    """The chosen candidate of a selection, reported with the numbers of its table."""
    n_components, covariance_type, params = selection.chosen()
    model = lem.gaussian_mixture(n_components, covariance_type)
    best = int(selection.best)
    values = {"bic": lem.bic, "aic": lem.aic}
    values = {name: float(function(model, params, data)) for name, function in values.items()}
    values[criterion] = float(selection.score[best])  # exactly the number in the table
    status = lem.Status(int(selection.status[best]))
    return {
        "n_components": n_components,
        "params": params,
        "result": None,  # the selection keeps no per-iteration history
        "log_likelihood": float(selection.log_likelihood[best]),
        "bic": values["bic"],
        "aic": values["aic"],
        "n_iter": None,
        "converged": status in (lem.Status.CONVERGED, lem.Status.EMPTY_COMPONENT),
        "status": status.name,
        "labels": np.asarray(lem.predict(model, params, data)),
    }


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _format_params(params: Any, names: list[str], covariance_type: str) -> str:
    weights = np.asarray(params.weights)
    means = np.asarray(params.means)
    covariances = np.asarray(params.covariances)
    n_components, n_features = means.shape
    if covariance_type == "full":
        variances = np.diagonal(covariances, axis1=1, axis2=2)
    elif covariance_type == "tied":
        variances = np.broadcast_to(np.diag(covariances), (n_components, n_features))
    elif covariance_type == "diag":
        variances = covariances
    else:
        variances = np.broadcast_to(covariances[:, None], (n_components, n_features))
    header = ["component", "weight", *(f"mean {n}" for n in names), *(f"sd {n}" for n in names)]
    rows = [
        [
            str(k),
            f"{weights[k]:.3f}",
            *(f"{m:.4g}" for m in means[k]),
            *(f"{s:.4g}" for s in np.sqrt(variances[k])),
        ]
        for k in range(n_components)
    ]
    lines = [_table(header, rows)]
    if covariance_type in ("full", "tied") and n_features > 1:
        lines.append(f"covariances ({covariance_type}):")
        lines.append(np.array2string(covariances, precision=4, suppress_small=True))
    return "\n".join(lines)


def _format_fit(fitted: dict, n_samples: int) -> str:
    log_likelihood = fitted["log_likelihood"]
    rows = [
        ["mean log-likelihood", f"{log_likelihood:.6f}  (total {log_likelihood * n_samples:.4f})"],
        ["BIC", f"{fitted['bic']:.4f}"],
        ["AIC", f"{fitted['aic']:.4f}"],
        *([["iterations", str(fitted["n_iter"])]] if fitted["n_iter"] is not None else []),
        ["status", fitted["status"]],
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _format_selection(selection: Any, criterion: str) -> str:
    name = criterion.upper()
    header = ["n_components", name, "mean log-likelihood", "parameters", "status", ""]
    table = [
        [
            str(row["n_components"]),
            f"{row['score']:.4f}",
            f"{row['log_likelihood']:.6f}",
            str(row["n_parameters"]),
            row["status"],
            f"<- lowest {name}" if row["best"] else "",
        ]
        for row in selection.table()
    ]
    return _table(header, table)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_array(array: Any) -> Any:
    """Nested lists of floats, with None (JSON null) for NaN or infinite values."""
    values = np.asarray(array)
    if values.dtype == np.float32:
        # The shortest decimal that reads back as the same float32, not its float64 digits.
        plain = np.array([float(str(value)) for value in values.ravel()], dtype=object).reshape(values.shape)
    else:
        plain = values.astype(np.float64).astype(object)
    plain[~np.isfinite(values)] = None
    return plain.tolist()


def _write_json(args, fitted, selection, names, source, shape) -> None:
    params = fitted["params"]
    document = {
        "data": {"source": source, "n_samples": shape[0], "n_features": shape[1], "columns": names},
        # The description latentem.save takes; latentem.gaussian_mixture(**options) rebuilds it.
        "model": {
            "model": "gaussian_mixture",
            "options": {"n_components": fitted["n_components"], "covariance_type": args.covariance_type},
        },
        "fit": {"n_init": args.n_init, "max_iter": args.max_iter, "tol": args.tol, "seed": args.seed},
        "params": {field: _json_array(value) for field, value in zip(params._fields, params, strict=True)},
        "log_likelihood": _finite_or_none(fitted["log_likelihood"]),
        "bic": _finite_or_none(fitted["bic"]),
        "aic": _finite_or_none(fitted["aic"]),
        "n_iter": fitted["n_iter"],
        "converged": fitted["converged"],
        "status": fitted["status"],
        "labels": fitted["labels"].astype(int).tolist(),
    }
    if selection is not None:
        rows = selection.table()
        document["selection"] = {
            "criterion": args.criterion,
            "candidates": [row["n_components"] for row in rows],
            "score": [_finite_or_none(row["score"]) for row in rows],
            "log_likelihood": [_finite_or_none(row["log_likelihood"]) for row in rows],
            "n_parameters": [row["n_parameters"] for row in rows],
            "status": [row["status"] for row in rows],
            "best": fitted["n_components"],
        }
    text = json.dumps(document, indent=2, allow_nan=False)
    try:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    except OSError as error:
        raise _UsageError(f"cannot write {args.output}: {error.strerror or error}") from None


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise _UsageError("--plot needs matplotlib: pip install 'latentem[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as pyplot

    return pyplot


def _write_plot(args, fitted, selection, data, names) -> None:
    from latentem import plot

    pyplot = _pyplot()
    panels = ["clusters"]
    panels += ["history"] if fitted["result"] is not None else []
    panels += ["selection"] if selection is not None else []
    figure, axes = pyplot.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), layout="constrained")
    for ax, panel in zip(np.atleast_1d(axes), panels, strict=True):
        if panel == "clusters":
            plot.clusters(
                data,
                fitted["params"],
                labels=fitted["labels"],
                covariance_type=args.covariance_type,
                feature_names=names,
                ax=ax,
            )
        elif panel == "history":
            plot.history(fitted["result"], labels=[f"EM, {fitted['n_components']} components"], ax=ax)
        else:
            plot.selection(selection, criterion=args.criterion, ax=ax)
    try:
        figure.savefig(args.plot, dpi=120)
    except (OSError, ValueError) as error:
        raise _UsageError(f"cannot write {args.plot}: {error}") from None
    finally:
        pyplot.close(figure)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for an input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        argv = argv[1:]
    try:
        args = _parser().parse_args(argv)
        return _fit(args)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
