"""EM against gradient ascent (Adam, L-BFGS) on the same objective, from the same starts.

For each problem and each seed, one start is drawn (``init="random_from_data"``: the
centres are distinct random samples, then one M-step), and EM (``fit_em``), Adam and
L-BFGS (``fit_gradient`` with ``optax.adam`` and ``optax.lbfgs``) all run from it, in
float64, until the objective changes by less than ``TOL`` or the step budget runs out.
The script prints one Markdown table with, per problem and method (medians over seeds):

- **final**: the final mean log-likelihood (median), and the **best final** of the
  method over all seeds;
- **iterations** and **time** to get within 1e-3 of the best final mean log-likelihood
  any of the three methods reached *from that start*: the iterations are read from the
  fit's history; the time is measured by running the compiled fit for exactly that many
  iterations (``tol=0``) after a warm-up call, best of ``REPEATS``, with
  ``block_until_ready``. Runs that never get there count as not reached;
- **worse (same start)**: how many seeds end more than 1e-3 below the best of the three
  methods from the same start;
- **worse (overall)**: how many seeds end more than 1e-3 below the best mean
  log-likelihood found on that problem by any method from any seed: a worse local
  optimum (or, for a method that ran out of steps, not there yet; see **stopped**).

Usage::

    python benchmarks/em_vs_gradient.py           # 20 seeds, the README table
    python benchmarks/em_vs_gradient.py --quick   # 2 seeds, smaller budgets: a smoke run
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import latentem as lem  # noqa: E402

TOL = 1e-10
TARGET = 1e-3
REPEATS = 3
ADAM_LEARNING_RATE = 0.05


class Problem(NamedTuple):
    name: str
    n_components: int
    make_data: Callable[[np.random.Generator], np.ndarray]


def _clusters(rng: np.random.Generator, centres: np.ndarray, n_per_cluster: int) -> np.ndarray:
    """Gaussian clusters with random covariances (eigenvalues in [0.5, 1.5]) around centres."""
    n_features = centres.shape[1]
    parts = []
    for centre in centres:
        rotation, _ = np.linalg.qr(rng.standard_normal((n_features, n_features)))
        scales = np.sqrt(rng.uniform(0.5, 1.5, n_features))
        noise = rng.standard_normal((n_per_cluster, n_features)) * scales[None, :]
        parts.append(centre[None, :] + noise @ rotation.T)
    return rng.permutation(np.concatenate(parts))


PROBLEMS = (
    Problem(
        "well-separated 2-D (k=3, n=600)",
        3,
        lambda rng: _clusters(rng, np.array([[0.0, 0.0], [8.0, 0.0], [4.0, 7.0]]), 200),
    ),
    Problem(
        "overlapping 2-D (k=3, n=600)",
        3,
        lambda rng: _clusters(rng, np.array([[0.0, 0.0], [1.5, 0.0], [0.75, 1.3]]), 200),
    ),
    Problem(
        "16-D (k=8, n=2000)",
        8,
        lambda rng: _clusters(rng, 2.0 * rng.standard_normal((8, 16)), 250),
    ),
)


class Run(NamedTuple):
    final: float
    history: np.ndarray
    n_iter: int
    status: int


@functools.cache
def _em_program(model, max_iter: int):
    """fit_em compiled once per model and iteration budget (``tol`` stays an argument)."""
    return jax.jit(lambda params, x, tol: lem.fit_em(model, params, x, max_iter=max_iter, tol=tol))


def _run(method: str, model, params, x, budget: int, tol: float) -> lem.EMResult | lem.GradientResult:
    """One compiled fit; ``tol=0`` runs exactly ``budget`` iterations."""
    if method == "EM":
        return _em_program(model, budget)(params, x, tol)
    with warnings.catch_warnings():  # statuses are reported in the table, not warned
        warnings.simplefilter("ignore", lem.ConvergenceWarning)
        return lem.fit_gradient(model, params, x, OPTIMIZERS[method], num_steps=budget, tol=tol)


# Built once: fit_gradient's compiled program is cached per optimizer object.
OPTIMIZERS = {"Adam": optax.adam(ADAM_LEARNING_RATE), "L-BFGS": optax.lbfgs()}
METHODS = ("EM", "Adam", "L-BFGS")


def _timed(call: Callable[[], object]) -> float:
    """Seconds for a compiled call: one warm-up (compiles), then the best of ``REPEATS``
    (a single timed call once one takes longer than 50 ms, where noise is small)."""
    jax.block_until_ready(call())
    best = np.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - start)
        if best > 0.05:
            break
    return best


def _fit(method: str, model, params, x, budget: int) -> Run:
    result = _run(method, model, params, x, budget, TOL)
    n_iter = int(result.n_iter if method == "EM" else result.n_steps)
    return Run(float(result.log_likelihood), np.asarray(result.history), n_iter, int(result.status))


def _iterations_to(run: Run, target: float) -> int | None:
    """First iteration whose objective is within TARGET of ``target``; None if never."""
    reached = np.flatnonzero(run.history[: run.n_iter] >= target - TARGET)
    return int(reached[0]) + 1 if reached.size else None


def benchmark(problem: Problem, n_seeds: int, budgets: dict[str, int]) -> dict[str, dict[str, float]]:
    x = jnp.asarray(problem.make_data(np.random.default_rng(0)))
    model = lem.gaussian_mixture(problem.n_components, "full", init="random_from_data")
    init = jax.jit(model.init)
    ones = jnp.ones(x.shape[0], x.dtype)
    starts = [init(jax.random.key(seed), x, ones) for seed in range(n_seeds)]
    runs = {method: [_fit(method, model, p, x, budgets[method]) for p in starts] for method in METHODS}

    overall_best = max(run.final for method in METHODS for run in runs[method] if np.isfinite(run.final))
    rows = {}
    for method in METHODS:
        iterations, seconds, worse_same, worse_overall, stopped = [], [], 0, 0, 0
        for seed, run in enumerate(runs[method]):
            same_start_best = max(runs[m][seed].final for m in METHODS)
            worse_same += run.final < same_start_best - TARGET
            worse_overall += run.final < overall_best - TARGET
            stopped += run.status == lem.Status.MAX_ITER
            needed = _iterations_to(run, same_start_best)
            if needed is not None:
                iterations.append(needed)
                params = starts[seed]
                seconds.append(_timed(lambda m=method, p=params, k=needed: _run(m, model, p, x, k, 0.0)))
        rows[method] = {
            "final": float(np.median([run.final for run in runs[method]])),
            "best": float(np.nanmax([run.final for run in runs[method]])),
            "iterations": float(np.median(iterations)) if iterations else np.nan,
            "reached": len(iterations),
            "milliseconds": 1e3 * float(np.median(seconds)) if seconds else np.nan,
            "worse_same": worse_same,
            "worse_overall": worse_overall,
            "stopped": stopped,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds and smaller budgets (smoke run)")
    arguments = parser.parse_args()
    n_seeds = 2 if arguments.quick else 20
    budgets = (
        {"EM": 200, "Adam": 300, "L-BFGS": 100}
        if arguments.quick
        else {"EM": 1000, "Adam": 3000, "L-BFGS": 500}
    )
    print(
        f"float64, full covariances, {n_seeds} seeds (starts from init='random_from_data'), "
        f"tol={TOL:g}; budgets: EM {budgets['EM']} iterations, Adam (learning rate "
        f"{ADAM_LEARNING_RATE}) {budgets['Adam']} steps, L-BFGS (optax defaults) "
        f"{budgets['L-BFGS']} steps; jax {jax.__version__} on {jax.devices()[0].device_kind}.\n"
    )
    print(
        "| problem | method | final mean log-lik (median) | best final (any seed) "
        "| iterations to best - 1e-3 (median) | time to best - 1e-3 (median, ms) | reached "
        "| worse than same-start best "
        "| worse than overall best | stopped at budget |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for problem in PROBLEMS:
        rows = benchmark(problem, n_seeds, budgets)
        for method, row in rows.items():
            print(
                f"| {problem.name} | {method} | {row['final']:.4f} | {row['best']:.4f} | "
                f"{row['iterations']:.0f} | "
                f"{row['milliseconds']:.2f} | {row['reached']}/{n_seeds} | "
                f"{row['worse_same']}/{n_seeds} | {row['worse_overall']}/{n_seeds} | "
                f"{row['stopped']}/{n_seeds} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
