"""The command line: ``python -m latentem [fit] [FILE.csv] --n-components K ...``.

With no file it fits the embedded Old Faithful data. It prints the fitted parameters,
the mean log-likelihood, BIC and the number of iterations. Errors in the input are
reported in one line with a non-zero exit status, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import numpy as np


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m latentem",
        description="Fit a Gaussian mixture by EM (default data: Old Faithful, 272 x 2).",
    )
    parser.add_argument("file", nargs="?", help="CSV file with a header row and numeric columns")
    parser.add_argument("--n-components", "-k", type=int, default=2, help="number of components (default 2)")
    parser.add_argument(
        "--covariance-type",
        default="full",
        choices=("full", "tied", "diag", "spherical"),
        help="covariance structure (default full)",
    )
    parser.add_argument("--n-init", type=int, default=5, help="number of restarts (default 5)")
    parser.add_argument("--max-iter", type=int, default=200, help="maximum EM iterations (default 200)")
    parser.add_argument("--tol", type=float, default=1e-6, help="convergence tolerance (default 1e-6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


class _UsageError(Exception):
    """An error in the user's input, reported in one line."""


def _load(path: str | None) -> tuple[np.ndarray, list[str], str]:
    from latentem import datasets

    if path is None:
        return datasets.load_faithful(), ["eruptions", "waiting"], "Old Faithful (embedded)"
    try:
        data, names = datasets.read_csv(path)
    except FileNotFoundError:
        raise _UsageError(f"no such file: {path}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise _UsageError(str(error)) from None
    return data, names, path


def _format_params(params, names: list[str], covariance_type: str) -> str:
    lines = []
    weights = np.asarray(params.weights)
    means = np.asarray(params.means)
    covariances = np.asarray(params.covariances)
    width = max(10, *(len(n) for n in names))
    header = "component  weight  " + "  ".join(f"{n:>{width}}" for n in names)
    lines.append(header)
    for k in range(weights.shape[0]):
        row = f"{k:>9}  {weights[k]:6.3f}  " + "  ".join(f"{m:>{width}.4g}" for m in means[k])
        lines.append(row)
    lines.append(f"covariances ({covariance_type}):")
    lines.append(np.array2string(covariances, precision=4, suppress_small=True))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        argv = argv[1:]
    args = _parser().parse_args(argv)
    try:
        return _fit(args)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _fit(args: argparse.Namespace) -> int:
    import jax

    import latentem as lem

    data, names, source = _load(args.file)
    try:
        model = lem.gaussian_mixture(args.n_components, args.covariance_type)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", lem.ConvergenceWarning)
            result = lem.fit(
                model,
                jax.random.key(args.seed),
                data,
                n_init=args.n_init,
                max_iter=args.max_iter,
                tol=args.tol,
            )
    except ValueError as error:
        raise _UsageError(str(error)) from None
    x = np.asarray(data, dtype=np.asarray(result.params.means).dtype)
    print(f"data: {source}, {data.shape[0]} samples x {data.shape[1]} features")
    print(
        f"model: Gaussian mixture, {args.n_components} components, {args.covariance_type} covariances, "
        f"best of {args.n_init} restarts"
    )
    print(_format_params(result.params, names, args.covariance_type))
    print(f"mean log-likelihood: {float(result.log_likelihood):.6f}")
    print(f"BIC: {float(lem.bic(model, result.params, x)):.4f}")
    print(f"iterations: {int(result.n_iter)}  status: {lem.Status(int(result.status)).name}")
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
