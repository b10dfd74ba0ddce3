"""The README's code runs as written, and its custom model recovers synthetic rates."""

import pathlib
import re

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
    rates = np.sort(np.asarray(result.params.rates), axis=0)
    np.testing.assert_allclose(rates, np.array([[3.0] * 4, [12.0] * 4]), atol=0.3)
    weights = np.sort(np.asarray(result.params.weights))
    np.testing.assert_allclose(weights, [0.3, 0.7], atol=0.03)
