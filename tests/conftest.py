"""Shared fixtures for the normkit test suite.

``backend`` runs a test once per backend that loads here (``normkit.available_backends()``),
so a backend registered later (numba, cython) inherits every test that uses it.
``rng`` is a fresh, seeded NumPy generator per test.
"""
import numpy as np
import pytest
from _cases import BACKENDS


@pytest.fixture(scope="session", params=BACKENDS, ids=BACKENDS)
def backend(request):
    """Name of a working backend; pass it as ``backend=backend`` to every normkit call."""
    return request.param


@pytest.fixture
def rng():
    """A seeded generator, so every test is reproducible on its own."""
    return np.random.default_rng(12345)
