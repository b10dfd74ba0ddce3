"""The README's code runs as written, and its custom model recovers synthetic rates."""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np

import latentem as lem

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section_title):
    """The ```python blocks of one README section, in order."""
    text = README.read_text()
    start = text.index(f"## {section_title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_quickstart_runs():
    namespace = {}
    for block in python_blocks("Quickstart"):
        exec(compile(block, "README.md (Quickstart)", "exec"), namespace)
    result = namespace["result"]
    assert int(result.status) == lem.Status.CONVERGED
    # scikit-learn's GaussianMixture(2, n_init=5) reaches -4.15538 on Old Faithful.
    np.testing.assert_allclose(float(result.log_likelihood), -4.15538, atol=1e-4)


def test_poisson_mixture_example_recovers_rates():
    namespace = {}
    for block in python_blocks("Your own model"):
        exec(compile(block, "README.md (Your own model)", "exec"), namespace)
    result = namespace["result"]
    assert int(result.status) == lem.Status.CONVERGED
    # Sums of four Poisson(3) and four Poisson(12) counts hardly overlap, so the fitted
    # mixture must match the maximum-likelihood fit that knows the true labels: the
    # per-class means and proportions (a sampling-independent reference). The example
    # stops at the default tol=1e-3 on the mean log-likelihood, which leaves rates up to
    # ~0.03 short of the optimum in float32 (seen over 30 keys), hence atol=0.05.
    x, z = np.asarray(namespace["x"]), np.asarray(namespace["z"])
    expected_rates = np.stack([x[~z].mean(0), x[z].mean(0)])
    expected_weights = np.array([1 - z.mean(), z.mean()])
    order = np.argsort(np.asarray(result.params.rates)[:, 0])
    np.testing.assert_allclose(np.asarray(result.params.rates)[order], expected_rates, atol=0.05)
    np.testing.assert_allclose(np.asarray(result.params.weights)[order], expected_weights, atol=2e-3)


def run_every_other_section():
    """The remaining code blocks, in order, in one namespace, as a reader would paste them
    into a fresh interpreter (run in the current directory: the saving example writes
    model.npz)."""
    import matplotlib

    matplotlib.use("Agg")
    # The suite's promotion rules (tests/conftest.py), which this fresh process lacks.
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    namespace = {}
    for block in python_blocks("Quickstart") + python_blocks("Your own model")[:1]:
        exec(compile(block, "README.md", "exec"), namespace)
    sections = [
        "More models",
        "EM and gradient descent",
        "Many datasets at once",
        "Choosing the number of components",
        "scikit-learn, the command line, plots, saving",
        "Several devices and hosts",
    ]
    for section in sections:
        for block in python_blocks(section):
            exec(compile(block, f"README.md ({section})", "exec"), namespace)
    assert pathlib.Path("model.npz").exists()
    assert namespace["n_components"] == 2
    np.testing.assert_allclose(float(namespace["lbfgs"].log_likelihood), -4.1554, atol=1e-3)
    assert namespace["x_padded"].shape[0] == 3 and namespace["results"].status.shape == (1000,)
    assert namespace["x_sharded"].shape == namespace["x"].shape
    assert namespace["sharded_results"].status.tolist() == [lem.Status.CONVERGED] * 64
    print("README sections ran")


def test_every_other_section_runs(tmp_path):
    # In a fresh interpreter, as a reader runs them. (In the suite's long-lived xdist
    # workers this test was where XLA's compiler crashed, a SIGABRT or SIGSEGV inside
    # backend_compile_and_load, in 4 of about 14 suite runs of 2026-12-07, each time
    # compiling a different program; run alone it passed 26 of 26 times, so the crash
    # needs what earlier tests left in the process. Cause not found: see the closing
    # notes of the twenty-second and twenty-third sessions.)
    script = (
        f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
        "import test_readme; test_readme.run_every_other_section()"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-5000:]
    assert completed.stdout.strip().endswith("README sections ran")
