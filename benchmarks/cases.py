"""The benchmark table as pytest parameters.

The cases themselves are defined once, in ``normkit/_bench_cases.py`` (shared with
``python -m normkit bench``); this module only turns them into ``pytest.param`` objects:

* a case of tier ``quick`` carries the ``quick`` marker, a case of tier ``full`` the
  ``full`` marker (``-m quick``: the quick subset; ``-m "not full"``: the default set of
  ``python -m normkit bench``; no ``-m``: everything);
* the implementations are every *known* normkit backend (a backend that cannot load here
  is skipped with its reason), the copy floor, and the peers ``plain-numpy``, ``torch``
  and ``onnxruntime`` (skipped with a note when not installed or not applicable).
"""
from __future__ import annotations

import pytest

from normkit._bench_cases import CASES, CATEGORIES, Case  # noqa: F401  (re-exported)
from normkit.backends import KNOWN_BACKENDS

PEERS = ("plain-numpy", "torch", "onnxruntime")
IMPLS = tuple(KNOWN_BACKENDS) + ("copy",) + PEERS

_TIER_MARKS = {"quick": [pytest.mark.quick], "default": [], "full": [pytest.mark.full]}


def params(category):
    """(case, impl) pairs of one category, case-major (so each case's data is made once)."""
    out = []
    for case in CASES:
        if case.category != category:
            continue
        for impl in IMPLS:
            out.append(pytest.param(case, impl, id=f"{case.name}-{impl}",
                                    marks=_TIER_MARKS[case.tier]))
    return out
