"""Every docstring example (``>>>``) prints what its docstring shows, in this precision.

The examples are part of the documentation's claims; run in float32 and in float64
(``JAX_ENABLE_X64=1``) like the rest of the suite, so an output that only one precision
gives is caught.
"""

import doctest
import importlib
import pkgutil

import pytest

import latentem

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(latentem.__path__, prefix="latentem.")
    if not info.name.endswith("__main__")  # the command line itself, no examples
)


def test_every_module_is_collected():
    assert {"latentem._em", "latentem.models.gaussian_mixture", "latentem.sklearn"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    if name == "latentem.models._gaussian_kernel" and module.pl is None:
        pytest.skip("this JAX has no Pallas Triton backend (the kernel is not used)")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):  # in the module's namespace, as pytest runs them
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, (
        f"{results.failed} of {results.attempted} examples in {name} failed (see stdout)"
    )
